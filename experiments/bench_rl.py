"""The alignment benchmarks of `python -m experiments.bench` (ppo, grpo, rloo, dpo).

ppo: seconds per PPO iteration (the ppo stage's settings, random-init policy and RM),
  split into rollout (KV-cache sampling), scoring (RM + reference log-probs) and update
  (old log-probs, GAE, epochs x minibatches); medians after one compiling iteration,
  whose time is reported as "first". Replies never end (no EOS): every iteration decodes
  max_new_tokens for every row.
grpo, rloo: the same split for the stage's iteration (G replies per prompt from one
  prefill, no value model), measured in the same process beside PPO's: the CPU presets
  sample the same number of reply tokens per iteration (PPO 64 prompts x 1, GRPO/RLOO
  16 prompts x 4), so the ratio is per sampled token.
dpo: seconds per DPO step (the dpo stage's batch of comparisons, K replies each) and of
  the one-off reference pass per batch, beside PPO's iteration.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax
import numpy as np

from configs import pipeline
from gptjax import dpo, grpo, ppo, sharding
from gptjax.config import from_dict
from gptjax.model import Model, from_pipeline
from gptjax.optim import OptimConfig
from gptjax.rl_trainer import RLTrainer
from gptjax.rollout import rollout_config
from gptjax.trainer import LMTrainer, section_configs

CONFIGS = ("tiny", "small_cpu")
PHASES = ("time_rollout_s", "time_score_s", "time_update_s", "time_iteration_s")


def environment() -> dict:
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def bench_mesh(config):
    """The benchmark's mesh: one device, or with `bench --cpu_devices=N` (N > 1) pure data
    parallelism over the N host devices (weights replicated, gradients all-reduced). Not
    the preset's own mesh, which is its TPU slice's (llama_1b's: tensor 4 over hosts)."""
    n = jax.device_count() if CPU_DEVICES["n"] > 1 else 1
    mesh = dict(config.mesh, data=n, fsdp=1, tensor=1, multihost=False)
    return sharding.make_mesh(from_dict(sharding.MeshConfig, mesh, "mesh"), jax.devices()[:n])


CPU_DEVICES = {"n": 1}  # set once by bench's main, before JAX starts its backend


def use_cpu_devices(n: int) -> None:
    """N XLA:CPU devices, one thread each (Eigen's intra-op pool off, so N devices do not
    oversubscribe N cores). Must run before JAX initialises its backend."""
    if n > 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
        )
        jax.config.update("jax_num_cpu_devices", n)
    CPU_DEVICES["n"] = n


def _median_times(step, iterations: int) -> tuple[dict, dict]:
    """(first call's metrics, medians of PHASES over `iterations` later calls)."""
    first = step()
    times = {k: [] for k in PHASES}
    for _ in range(iterations):
        metrics = step()
        for k in PHASES:
            times[k].append(metrics[k])
    return first, {k[len("time_") :]: statistics.median(v) for k, v in times.items()}


def bench_rl(name: str, stage: str, iterations: int, fields: dict | None = None) -> dict:
    """Seconds per iteration of an online RL stage (ppo, ppo_ptx, grpo, rloo) and its
    split, with the stage's own settings (and `fields` over them) and random-init policy
    and RM."""
    config = pipeline.get_config(name)
    section = config[stage]
    section.update(fields or {})
    shape = rollout_config(section, stage)
    optim = from_dict(OptimConfig, section.optim, f"{stage}.optim")
    policy = Model(from_pipeline(config))
    rm = Model(from_pipeline(config, head="scalar"))
    params = jax.jit(policy.init)(jax.random.key(0))
    rm_params = jax.jit(rm.init)(jax.random.key(1))
    kw = dict(
        iterations=iterations + 1,
        max_new_tokens=shape.max_new_tokens,
        eos_id=-1,
        sampling_seed=0,
    )
    mesh = bench_mesh(config)
    if section.algorithm == "ppo":
        cfg = ppo.from_section(section, stage)
        trainer = RLTrainer.ppo(policy, params, rm, rm_params, rm_params, cfg, optim, mesh, **kw)
        group = 1
    else:
        cfg = grpo.from_section(section, stage)
        trainer = RLTrainer.group(policy, params, rm, rm_params, cfg, optim, mesh, **kw)
        group = cfg.group_size
    rng = np.random.default_rng(0)
    b, p, vocab = shape.prompts_per_iteration, shape.max_prompt_len, policy.cfg.vocab_size
    inputs = {"prompts": {"tokens": rng.integers(3, vocab, (b, p), dtype=np.int32)}}
    inputs["prompts"]["mask"] = np.ones((b, p), np.int32)
    if section.algorithm == "ppo" and cfg.ptx_coef > 0:
        rows, t = shape.ptx_batch_size, shape.ptx_seq_len
        inputs["ptx"] = {
            "tokens": rng.integers(3, vocab, (rows, t), dtype=np.int32),
            "segment_ids": np.ones((rows, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (rows, t)).copy(),
            "loss_mask": np.ones((rows, t), np.float32),
        }
    state, key = [trainer.init_state()], jax.random.key(0)

    def step():
        state[0], metrics = trainer.iteration(state[0], inputs, key)
        return metrics

    first, medians = _median_times(step, iterations)  # the first call compiles all phases
    return {
        "config": name,
        "stage": stage,
        "params": policy.param_count(),
        "prompts": b,
        "group": group,
        "prompt_len": p,
        "new_tokens": shape.max_new_tokens,
        "sampled_tokens": b * group * shape.max_new_tokens,
        "epochs": cfg.epochs,
        "minibatches": cfg.minibatches,
        "first_iteration_s": first["time_iteration_s"],
        **medians,
    }


def bench_dpo(name: str, iterations: int) -> dict:
    """Seconds per DPO step on the dpo stage's batch, and per reference pass of a batch."""
    config = pipeline.get_config(name)
    section = config.dpo
    train, optim = section_configs(section, "dpo")
    cfg = from_dict(dpo.DPOConfig, {"beta": section.beta, "loss": section.loss}, "dpo")
    mesh = bench_mesh(config)
    trainer = LMTrainer.build(
        from_pipeline(config), optim, train, mesh, seed=0,
        make_steps=lambda model, tx, schedule: dpo.make_steps(model, tx, schedule, cfg=cfg),
    )  # fmt: skip
    b, k, t = train.batch_size, config.compare.k, train.seq_len
    rng = np.random.default_rng(0)
    reply = np.zeros((b, k, t), np.float32)
    reply[:, :, t // 2 :] = 1
    batch = trainer.put_batch(
        {
            "tokens": rng.integers(3, trainer.model.cfg.vocab_size, (b, k, t), dtype=np.int32),
            "segment_ids": np.ones((b, k, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, k, t)).copy(),
            "reply_mask": reply,
            "ranks": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
            "valid": np.ones((b, k), np.float32),
            "ref_seq_logp": np.zeros((b, k), np.float32),
        }
    )
    state = [trainer.init_state()]

    def step():
        t0 = time.perf_counter()
        jax.block_until_ready(trainer.eval_step(state[0]["params"], batch))
        t1 = time.perf_counter()
        state[0], metrics = trainer.train_step(state[0], batch, jax.random.key(0))
        jax.block_until_ready(metrics)
        t2 = time.perf_counter()
        return dict(time_rollout_s=0.0, time_score_s=t1 - t0, time_update_s=t2 - t1,
                    time_iteration_s=t2 - t1)  # fmt: skip

    first, medians = _median_times(step, iterations)
    return {
        "config": name,
        "stage": "dpo",
        "params": trainer.model.param_count(),
        "prompts": b,
        "group": k,
        "prompt_len": t // 2,
        "new_tokens": t - t // 2,
        "sampled_tokens": 0,
        "epochs": 1,
        "minibatches": 1,
        "first_iteration_s": first["time_iteration_s"],
        **medians,
    }


def print_rows(rows) -> None:
    print(
        f"{'config':<10} {'stage':<8} {'rows':>7} {'sampled':>8} {'first s':>8} {'s/iter':>7} "
        f"{'rollout':>8} {'score':>7} {'update':>7}"
    )
    for r in rows:
        print(
            f"{r['config']:<10} {r['stage']:<8} {r['prompts']:>3}x{r['group']:<3} "
            f"{r['sampled_tokens']:>8} {r['first_iteration_s']:>8.1f} {r['iteration_s']:>7.3f} "
            f"{r['rollout_s']:>8.3f} {r['score_s']:>7.3f} {r['update_s']:>7.3f}"
        )


def run_ppo(args) -> dict:
    stages = ("ppo", "ppo_ptx") if args.ptx else ("ppo",)
    fields = {"value_from": args.value_from} if args.value_from else {}
    rows = [
        bench_rl(n, s, args.iterations, fields) for n in args.configs.split(",") for s in stages
    ]
    print_rows(rows)
    return {"env": environment(), "rows": rows}


def run_versus_ppo(args) -> dict:
    """`args.bench` (grpo, rloo, dpo) and PPO, per config, in this one process."""
    rows = []
    for name in args.configs.split(","):
        rows.append(bench_rl(name, "ppo", args.iterations))
        if args.bench == "dpo":
            rows.append(bench_dpo(name, args.iterations))
        else:
            rows.append(bench_rl(name, args.bench, args.iterations))
        ratio = rows[-1]["iteration_s"] / rows[-2]["iteration_s"]
        rows[-1]["iteration_vs_ppo"] = ratio
    print_rows(rows)
    for r in rows[1::2]:
        print(f"{r['config']}: {r['stage']} s/iter / PPO s/iter = {r['iteration_vs_ppo']:.2f}")
    return {"env": environment(), "rows": rows}
