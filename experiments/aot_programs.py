"""The programs the AOT compile lowers for each stage: the stage's real jitted functions
(built by the library's trainers, as the stages build them) with abstract arguments:
`jax.ShapeDtypeStruct`s carrying their shardings, shapes from `jax.eval_shape`, so no
param is ever materialised (experiments/aot.py compiles them).

Programs per stage: pretrain, sft, rm, dpo: the train step; ppo, grpo, rloo: the rollout
sampler, the scoring pass (RM + reference) and the update step; ppo_ptx: its update step
(its rollout and scoring are ppo's). The BUILD.md table compiles STAGES; the alignment
stages of issue 20 (MORE_STAGES) compile on request (`--stage=grpo,rloo,dpo`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from gptjax import config as config_lib
from gptjax import dpo, grpo, lora, ppo, reward_model, sharding
from gptjax.errors import ConfigError
from gptjax.flops import forward_flops, train_flops
from gptjax.model import Model, from_pipeline
from gptjax.optim import OptimConfig
from gptjax.rl_trainer import RLTrainer
from gptjax.rollout import rollout_config
from gptjax.trainer import LMTrainer, check_fits, section_configs

STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx")
MORE_STAGES = ("grpo", "rloo", "dpo")


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of `tree`'s shapes carrying `shardings` (a tree or one sharding)."""
    if not isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)


def abstract_params(model: Model, mesh):
    return with_shardings(
        model.abstract_params,
        sharding.param_shardings(mesh, model.logical_axes, model.abstract_params),
    )


def abstract_rng(mesh):
    return with_shardings(jax.eval_shape(lambda: jax.random.key(0)), sharding.replicated(mesh))


def abstract_batch(mesh, shapes: dict[str, tuple[tuple[int, ...], object]]):
    return {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh))
        for k, (shape, dtype) in shapes.items()
    }


def bytes_per_chip(tree) -> int:
    """Bytes one chip holds of `tree` (ShapeDtypeStructs with shardings)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass
class Program:
    """One jitted function of a stage, its abstract arguments, and what else is resident."""

    stage: str
    name: str
    fn: object  # jitted
    args: tuple
    resident: object = None  # abstract arrays live on the chips meanwhile, not arguments
    analytic_flops: float = 0.0
    while_trips: int = 1


def _lm_programs(config, stage: str, mesh) -> list[Program]:
    """pretrain / sft / rm: the stage's LMTrainer, built as the stage builds it."""
    train_cfg, optim_cfg = section_configs(config[stage], stage)
    head = "scalar" if stage == "rm" else "lm"
    model_cfg = from_pipeline(config, None, head)
    check_fits(mesh, train_cfg, optim_cfg, model_cfg, stage)
    model = Model(model_cfg)
    make_steps = None
    if stage == "rm":
        make_steps = functools.partial(
            reward_model.make_steps, grad_accum_steps=optim_cfg.grad_accum_steps
        )
    elif stage == "dpo":
        cfg = config_lib.from_dict(
            dpo.DPOConfig, {"beta": config.dpo.beta, "loss": config.dpo.loss}, "dpo"
        )
        make_steps = functools.partial(
            dpo.make_steps, cfg=cfg, grad_accum_steps=optim_cfg.grad_accum_steps
        )
    # Every stage may start from given params (SFT and the RM do); pretraining's random
    # init differs only in init_state, which is not compiled here.
    trainer = LMTrainer.build(
        model_cfg,
        optim_cfg,
        train_cfg,
        mesh,
        config.seeds.init,
        init_params=abstract_params(model, mesh),
        make_steps=make_steps,
    )
    state = with_shardings(jax.eval_shape(trainer.init_state), trainer.shardings)
    b, t = train_cfg.batch_size, train_cfg.seq_len
    i32, f32 = jnp.int32, jnp.float32
    if stage in ("rm", "dpo"):  # comparison batches: K replies per prompt
        k = config[stage].k_max or config.compare.k
        shapes = {
            "tokens": ((b, k, t), i32),
            "segment_ids": ((b, k, t), i32),
            "positions": ((b, k, t), i32),
            "ranks": ((b, k), i32),
            "valid": ((b, k), f32),
        }
        if stage == "rm":
            shapes.update(reward_index=((b, k), i32), ref_logp=((b, k), f32))
        else:
            shapes.update(reply_mask=((b, k, t), f32), ref_seq_logp=((b, k), f32))
        batch = abstract_batch(mesh, shapes)
        flops = train_flops(model, b * k, t)
    else:
        names = ("tokens", "segment_ids", "positions")
        batch = abstract_batch(
            mesh, {**{n: ((b, t), i32) for n in names}, "loss_mask": ((b, t), f32)}
        )
        flops = train_flops(model, b, t)
    step = Program(stage, "train_step", trainer.train_step, (state, batch, abstract_rng(mesh)))
    step.analytic_flops = flops
    return [step]


def _rl_programs(config, stage: str, mesh) -> list[Program]:
    """ppo / ppo_ptx / grpo / rloo: the stage's RLTrainer with abstract SFT and RM params
    (the RM as the reward: a host reward has no device program)."""
    section = config[stage]
    group = section.algorithm != "ppo"
    cfg = (grpo if group else ppo).from_section(section, stage)
    samples = cfg.group_size if group else 1
    ptx = not group and cfg.ptx_coef > 0
    shape = rollout_config(section, stage)
    optim = config_lib.from_dict(OptimConfig, section.optim, f"{stage}.optim")
    policy = Model(from_pipeline(config, None))
    rm = Model(from_pipeline(config, None, "scalar"))
    shape.check(mesh, policy.cfg, cfg.minibatches, ptx, stage, samples)
    sft_params, rm_params = abstract_params(policy, mesh), abstract_params(rm, mesh)
    kw = dict(
        iterations=section.iterations,
        max_new_tokens=shape.max_new_tokens,
        eos_id=1,  # any id: the sampler only compares tokens against it
        sampling_seed=config.seeds.sampling,
    )
    if group:
        trainer = RLTrainer.group(policy, sft_params, rm, rm_params, cfg, optim, mesh, **kw)
    else:
        trainer = RLTrainer.ppo(
            policy, sft_params, rm, rm_params, rm_params, cfg, optim, mesh, **kw
        )
    state = with_shardings(jax.eval_shape(trainer.init_state), trainer.shardings)
    b, p, n = shape.prompts_per_iteration, shape.max_prompt_len, shape.max_new_tokens
    prompts = abstract_batch(mesh, {"tokens": ((b, p), jnp.int32), "mask": ((b, p), jnp.int32)})
    seeds = abstract_batch(mesh, {"s": ((b * samples,), jnp.int32)})["s"]
    b *= samples  # rollout rows
    rollout_args = (state["params"], prompts["tokens"], prompts["mask"], seeds)
    rollout = jax.eval_shape(trainer.rollout, *rollout_args)
    rollout = with_shardings(rollout, sharding.batch_sharding(mesh))
    # A LoRA policy's reference is its own base weights, in the state (gptjax/rl_trainer.py):
    # not resident apart.
    lora_ref = trainer.reference_from_state
    frozen = (rm_params, lora.base(state["params"]) if lora_ref else sft_params)
    apart = (rm_params,) if lora_ref else frozen
    scores = with_shardings(
        jax.eval_shape(trainer.score, *frozen, rollout), sharding.batch_sharding(mesh)
    )
    batch = {**rollout, **scores}
    t = p + n
    ptx_flops = 0.0
    if ptx:
        r, s = shape.ptx_batch_size, shape.ptx_seq_len
        names = ("tokens", "segment_ids", "positions")
        batch["ptx"] = abstract_batch(
            mesh, {**{k: ((r, s), jnp.int32) for k in names}, "loss_mask": ((r, s), jnp.float32)}
        )
        ptx_flops = cfg.epochs * train_flops(policy, r, s)
    # A value head rides on the policy's trunk; GRPO and RLOO have no value model.
    value = rm if not group and not cfg.value_head else None
    both = [policy] + ([value] if value is not None else [])
    update_flops = (
        sum(forward_flops(m, b, t) + cfg.epochs * train_flops(m, b, t) for m in both) + ptx_flops
    )
    not_params = {k: v for k, v in state.items() if k != "params"}
    update = Program(stage, "update", trainer.update, (state, batch, abstract_rng(mesh)), apart)
    update.analytic_flops = update_flops
    if stage == "ppo_ptx":  # rollout and scoring are ppo's
        return [update]
    return [
        Program(
            stage,
            "rollout",
            trainer.rollout,
            rollout_args,
            (not_params, apart),
            forward_flops(policy, b, t, keys=t),
            while_trips=n,
        ),
        Program(
            stage,
            "score",
            trainer.score,
            (*frozen, rollout),
            not_params if lora_ref else state,
            forward_flops(rm, b, t) + forward_flops(policy, b, t),
        ),
        update,
    ]


def stage_programs(config, stage: str, mesh) -> list[Program]:
    if stage not in STAGES + MORE_STAGES:
        raise ConfigError("stage", f"{stage!r} not in {'|'.join(STAGES + MORE_STAGES)}")
    if stage in ("ppo", "ppo_ptx", "grpo", "rloo"):
        return _rl_programs(config, stage, mesh)
    return _lm_programs(config, stage, mesh)
