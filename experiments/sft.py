"""Supervised fine-tuning: next-token loss on demonstrations' replies only.

    python -m experiments.main --stages=sft                 # after pretrain, same workdir
    python -m experiments.main --stages=pretrain,sft --config.data.demos=demos:/path/d.jsonl

Starts from the pretrain stage's final params (or --config.sft.init_from=CHECKPOINT_DIR),
renders each demonstration in the chat template (gptjax/data/chat.py), and trains
lm_train_step with the loss mask on the reply and its EOS (InstructGPT, sec. 3.5).
With sft.ptx_fraction > 0 that share of every batch's rows is pretraining text with the
loss on every token, so fine-tuning does not erase what pretraining taught
(gptjax/data/mixing.py).
"""

from __future__ import annotations

from experiments import common
from gptjax import sharding
from gptjax.data.iterators import lm_batches, sft_batches
from gptjax.data.mixing import ConcatBatches
from gptjax.errors import ConfigError

STAGE = "sft"


def demo_sources(config, workdir: str):
    """(train, held-out) demonstrations from the world or the user's file."""
    spec = config.data.demos
    if spec == common.WORLD:
        world = common.world_data(config, workdir)
        return world["demos"], world["demos_heldout"]
    return common.split_user_file(
        "data.demos",
        spec,
        config.data.demos_heldout_fraction,
        common.data_dir(config, workdir),
        common.max_bad_fraction(config),
    )


def ptx_rows(config, batch_size: int, mesh=None) -> int:
    """Rows of each SFT batch taken from pretraining text (sft.ptx_fraction of them);
    both kinds of rows are split into the same host blocks (sharding.host_block)."""
    frac = config.sft.ptx_fraction
    if not 0.0 <= frac < 1.0:
        raise ConfigError("sft.ptx_fraction", f"must be in [0, 1), got {frac}")
    rows = round(frac * batch_size)
    blocks = sharding.host_block(mesh).count
    if rows % blocks or (batch_size - rows) % blocks:
        raise ConfigError(
            "sft.ptx_fraction",
            f"{rows} pretraining + {batch_size - rows} demonstration rows must each be "
            f"divisible by the {blocks} host blocks",
        )
    return rows


def build(config, workdir: str) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    train_cfg, optim_cfg, loop_cfg = common.stage_train_config(config.sft, STAGE)
    mesh = common.make_mesh(config)
    tokenizer = common.get_tokenizer(config, workdir)
    train_src, heldout_src = demo_sources(config, workdir)
    _, base_params = common.load_stage_params(
        config, workdir, "pretrain", tokenizer, directory=config.sft.init_from or None
    )
    model_cfg = common.model_config(config, tokenizer)
    common.check_fits(train_cfg, optim_cfg, model_cfg, mesh, STAGE)
    trainer = common.LMTrainer.build(
        model_cfg, optim_cfg, train_cfg, mesh, config.seeds.init, init_params=base_params
    )
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        packed=config.sft.packed,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    n_ptx = ptx_rows(config, train_cfg.batch_size, mesh)
    heldout = sft_batches(heldout_src, tokenizer, seed=0, shuffle=False, **kw)
    batches = sft_batches(
        train_src,
        tokenizer,
        seed=config.seeds.data,
        **{**kw, "batch_size": kw["batch_size"] - n_ptx},
    )
    if n_ptx:
        pretrain_src, _ = common.pretrain_sources(config, workdir)
        ptx = lm_batches(
            pretrain_src,
            tokenizer,
            seed=config.seeds.data + 1,  # not the pretraining order
            **{**kw, "batch_size": n_ptx, "packed": True},
        )
        batches = ConcatBatches({"demos": batches, "pretrain": ptx})
    eval_batches = common.fixed_batches(heldout, config.sft.eval_batches)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=loop_cfg,
        batches=batches,
        eval_batches=eval_batches,
    )


def run(config, workdir: str) -> dict:
    _, summary = common.run_lm_stage(STAGE, config, workdir, build(config, workdir))
    return summary
