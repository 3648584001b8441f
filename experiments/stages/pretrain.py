"""Pretraining: next-token LM on the world's corpus (default) or the user's text.

python -m experiments.main --stages=pretrain
python -m experiments.main --stages=pretrain --config.data.pretrain=text:/path/corpus.txt

Multi-host: every process runs the same command on a shared workdir (gptjax/sharding.py
MeshConfig), e.g. process 1 of 2:
GPTJAX_COORDINATOR_ADDRESS=host0:8476 GPTJAX_NUM_PROCESSES=2 GPTJAX_PROCESS_ID=1 \
    python -m experiments.main --stages=pretrain --workdir=/shared/run
"""

from __future__ import annotations

from experiments import sections, sources
from experiments.loop import run_trainer
from experiments.rundir import StageContext
from gptjax import sampling, sharding
from gptjax.data.iterators import lm_batches
from gptjax.errors import ConfigError
from gptjax.trainer import LMTrainer, check_fits


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read)."""
    if ctx.config.model.get("init_from"):
        raise ConfigError(
            "model.init_from",
            "the pretrain stage trains gptjax's own model from scratch; a run from a "
            "checkpoint starts at sft (--stages=sft,rm,ppo,...)",
        )
    if ctx.config.model.lora_rank:
        raise ConfigError(
            "model.lora_rank",
            "pretraining trains every weight; LoRA adapts a trained model from sft on "
            "(run pretrain with lora_rank=0, then the later stages with it)",
        )
    train, optim, loop = sections.train_config(ctx.section, ctx.name)
    mesh = ctx.mesh()
    check_fits(mesh, train, optim, sources.model_config(ctx.config, None), ctx.name)
    return dict(train=train, optim=optim, loop=loop, mesh=mesh)


def build(ctx: StageContext) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    s = settings(ctx)
    config, workdir, mesh, train_cfg = ctx.config, ctx.workdir, s["mesh"], s["train"]
    train_src, heldout_src = sources.pretrain_sources(config, workdir)
    tokenizer = sources.get_tokenizer(config, workdir, corpus=train_src)
    model_cfg = sources.model_config(config, tokenizer)
    trainer = LMTrainer.build(model_cfg, s["optim"], train_cfg, mesh, config.seeds.init)
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    batches = lm_batches(train_src, tokenizer, seed=config.seeds.data, **kw)
    heldout = lm_batches(heldout_src, tokenizer, seed=0, shuffle=False, **kw)
    eval_batches = sources.fixed_batches(heldout, ctx.section.eval_batches)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=s["loop"],
        batches=batches,
        eval_batches=eval_batches,
        heldout_src=heldout_src,
    )


def sample_prompts(config, workdir: str, heldout_src, n: int = 4) -> list[str]:
    if config.data.pretrain == sources.WORLD:
        probes = sources.world_data(config, workdir)["fact_probes"]
        return [probes[i]["prefix"] for i in range(min(n, len(probes)))]
    return [" ".join(heldout_src[i]["text"].split()[:8]) for i in range(min(n, len(heldout_src)))]


def run(ctx: StageContext) -> dict:
    parts = build(ctx)
    result, summary = run_trainer(ctx, parts)
    prompts = sample_prompts(ctx.config, ctx.workdir, parts["heldout_src"])
    completions = sampling.greedy_completions(
        parts["trainer"].model, result.state["params"], parts["tokenizer"], prompts, 24, 8
    )
    return {**summary, "samples": list(zip(prompts, completions))}
