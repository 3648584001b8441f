"""Pretraining: next-token LM on the world's corpus (default) or the user's text.

python -m experiments.main --stages=pretrain
python -m experiments.main --stages=pretrain --config.data.pretrain=text:/path/corpus.txt

Multi-host: every process runs the same command on a shared workdir (gptjax/sharding.py
MeshConfig), e.g. process 1 of 2:
GPTJAX_COORDINATOR_ADDRESS=host0:8476 GPTJAX_NUM_PROCESSES=2 GPTJAX_PROCESS_ID=1 \
    python -m experiments.main --stages=pretrain --workdir=/shared/run
"""

from __future__ import annotations

from experiments import common
from gptjax import sharding
from gptjax.data.iterators import lm_batches

STAGE = "pretrain"


def build(config, workdir: str):
    """Everything the stage needs, validated and built before anything compiles."""
    train_cfg, optim_cfg, loop_cfg = common.stage_train_config(config.pretrain, STAGE)
    mesh = common.make_mesh(config)
    train_src, heldout_src = common.pretrain_sources(config, workdir)
    tokenizer = common.get_tokenizer(config, workdir, corpus=train_src)
    model_cfg = common.model_config(config, tokenizer)
    common.check_fits(train_cfg, optim_cfg, model_cfg, mesh, STAGE)
    trainer = common.LMTrainer.build(model_cfg, optim_cfg, train_cfg, mesh, config.seeds.init)
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    batches = lm_batches(train_src, tokenizer, seed=config.seeds.data, **kw)
    heldout = lm_batches(heldout_src, tokenizer, seed=0, shuffle=False, **kw)
    eval_batches = common.fixed_batches(heldout, config.pretrain.eval_batches)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=loop_cfg,
        batches=batches,
        eval_batches=eval_batches,
        heldout_src=heldout_src,
    )


def sample_prompts(config, workdir: str, heldout_src, n: int = 4) -> list[str]:
    if config.data.pretrain == common.WORLD:
        probes = common.world_data(config, workdir)["fact_probes"]
        return [probes[i]["prefix"] for i in range(min(n, len(probes)))]
    return [" ".join(heldout_src[i]["text"].split()[:8]) for i in range(min(n, len(heldout_src)))]


def run(config, workdir: str) -> dict:
    parts = build(config, workdir)
    result, summary = common.run_lm_stage(STAGE, config, workdir, parts)
    prompts = sample_prompts(config, workdir, parts["heldout_src"])
    completions = common.greedy_completions(
        parts["trainer"].model, result.state["params"], parts["tokenizer"], prompts, 24, 8
    )
    return {**summary, "samples": list(zip(prompts, completions))}
