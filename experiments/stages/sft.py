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

from experiments import sections, sources
from experiments.loop import run_trainer
from experiments.rundir import StageContext
from gptjax import sharding
from gptjax.data.iterators import lm_batches, sft_batches
from gptjax.data.mixing import ConcatBatches
from gptjax.errors import ConfigError
from gptjax.trainer import LMTrainer, check_fits


def ptx_rows(ctx: StageContext, batch_size: int, mesh) -> int:
    """Rows of each SFT batch taken from pretraining text (ptx_fraction of them); each
    process concatenates its pretraining and demonstration rows, so both kinds divide
    into the host blocks (sharding.host_block)."""
    field = f"{ctx.name}.ptx_fraction"
    frac = ctx.section.ptx_fraction
    if not 0.0 <= frac < 1.0:
        raise ConfigError(field, f"must be in [0, 1), got {frac}")
    rows = round(frac * batch_size)
    for part, what in ((rows, "pretraining"), (batch_size - rows, "demonstration")):
        try:
            sharding.check_host_rows(mesh, part, field)
        except ConfigError as e:
            raise ConfigError(field, f"{what} rows: {e.detail}") from None
    return rows


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read)."""
    train, optim, loop = sections.train_config(ctx.section, ctx.name)
    mesh = ctx.mesh()
    check_fits(mesh, train, optim, sources.model_config(ctx.config, None), ctx.name)
    return dict(
        train=train,
        optim=optim,
        loop=loop,
        mesh=mesh,
        ptx_rows=ptx_rows(ctx, train.batch_size, mesh),
    )


def build(ctx: StageContext) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    s = settings(ctx)
    config, workdir, mesh, train_cfg = ctx.config, ctx.workdir, s["mesh"], s["train"]
    tokenizer = sources.get_tokenizer(config, workdir)
    train_src, heldout_src = sources.demo_sources(config, workdir)
    _, base_params = sources.load_stage_params(
        config, workdir, ctx.inputs["init"], tokenizer, directory=ctx.checkpoints("init"), mesh=mesh
    )
    model_cfg = sources.model_config(config, tokenizer)
    trainer = LMTrainer.build(
        model_cfg, s["optim"], train_cfg, mesh, config.seeds.init, init_params=base_params
    )
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        packed=ctx.section.packed,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    n_ptx = s["ptx_rows"]
    heldout = sft_batches(heldout_src, tokenizer, seed=0, shuffle=False, **kw)
    batches = sft_batches(
        train_src,
        tokenizer,
        seed=config.seeds.data,
        **{**kw, "batch_size": kw["batch_size"] - n_ptx},
    )
    if n_ptx:
        pretrain_src, _ = sources.pretrain_sources(config, workdir)
        ptx = lm_batches(
            pretrain_src,
            tokenizer,
            seed=config.seeds.data + 1,  # not the pretraining order
            **{**kw, "batch_size": n_ptx, "packed": True},
        )
        batches = ConcatBatches({"demos": batches, "pretrain": ptx})
    eval_batches = sources.fixed_batches(heldout, ctx.section.eval_batches)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=s["loop"],
        batches=batches,
        eval_batches=eval_batches,
    )


def run(ctx: StageContext) -> dict:
    _, summary = run_trainer(ctx, build(ctx))
    return summary
