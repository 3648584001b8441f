"""Benchmarks: numbers are measured here, never asserted by tests.

    python -m experiments.bench train [--configs=tiny,small_cpu,gpt2_4l] [--steps=20]
    python -m experiments.bench sample [--configs=tiny,small_cpu]
    python -m experiments.bench compare [--configs=tiny,gpt2_4l]   # beside PyTorch
    python -m experiments.bench profile [--configs=tiny,gpt2_4l] [--decode=1,64]   # per op
    python -m experiments.bench gpu   # on one NVIDIA GPU: experiments/bench_gpu.py
    python -m experiments.bench ppo [--configs=tiny,small_cpu] [--iterations=5] [--ptx]
    python -m experiments.bench grpo|rloo|dpo [--configs=tiny,small_cpu]   # beside PPO
    python -m experiments.bench hf_import [--shape=llama_1b]   # experiments/bench_hf.py

Every benchmark builds what the pipeline builds from the preset's pipeline config
(configs/pipeline.py): the pretrain stage's batch and optimizer, the ppo stage's sections.

train: training tokens/s and model-FLOPs utilisation (MFU) of the pretrain stage's step.
  Definitions, fixed so the number cannot drift:
  - peak = FLOP/s of a jitted 2048x2048x2048 float32 matmul, measured in this process;
  - model FLOPs per token = gptjax/flops.py's training count, 6*N + 12*L*T*d (N: the
    params that multiply activations), the same convention as the AOT table;
  - MFU = tokens/s * FLOPs per token / peak.
  Also reports the first step's compile time, and fails loudly if the step recompiles
  after step 1 or XLA reports that donated buffers were not usable.
compare: the train step's tokens/s beside a nanoGPT-style PyTorch model with the same
  parameter count, and greedy decode tokens/s (tiny, B=1 and 64) beside Hugging Face
  `generate` on the same weights, in one process, ratios gptjax / PyTorch
  (experiments/bench_torch.py; needs the test extra). The two sides run in alternating
  blocks (alternating_blocks) and each ratio is the median of the rounds' ratios, printed
  with its range over rounds: on a machine whose speed drifts, back-to-back blocks
  compare like with like where two separate timings would not.
profile: where the time of a train step and of greedy decoding goes, per op (XLA:CPU ops
  under jax.profiler, aten ops under torch.profiler) in shared categories, beside
  PyTorch's and Hugging Face's (experiments/bench_profile.py).
gpu: one GPU's training MFU against its bf16 peak (gpt2_124m, llama_1b with cuDNN flash
  attention), decode tokens/s at B = 1, 64, 256 and a PPO iteration's split
  (experiments/bench_gpu.py; BUILD.md, GPU).
ppo, grpo, rloo, dpo: seconds per iteration of the alignment stages and their split
  (rollout / scoring / update), each beside PPO's: experiments/bench_rl.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

import experiments.bench_gpu as bench_gpu
import experiments.bench_hf as bench_hf
import experiments.bench_profile as bench_profile
from configs import model as model_configs
from configs import pipeline
from experiments.bench_rl import CONFIGS as RL_CONFIGS
from experiments.bench_rl import (
    bench_mesh,
    environment,
    run_ppo,
    run_versus_ppo,
    use_cpu_devices,
)
from gptjax import host, sharding
from gptjax.flops import train_flops_per_token
from gptjax.model import Model, ModelConfig, from_pipeline
from gptjax.trainer import LMTrainer, section_configs

TRAIN_CONFIGS = model_configs.CPU_PRESETS


class BenchError(RuntimeError):
    pass


def measure_peak_flops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """FLOP/s of a jitted n^3 matmul: the machine's attainable peak for MFU."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times)


def train_setup(
    name: str,
    steps: int,
    batch: int = 0,
    seq_len: int = 0,
    model: dict | None = None,
    one_doc: bool = False,
):
    """(model, jitted step, state, 4 device batches, key) of the pretrain stage's step for
    preset `name`, as bench_train describes its arguments."""
    config = pipeline.get_config(name)
    config.model.update(model or {})
    train, optim = section_configs(config.pretrain, "pretrain")
    train = dataclasses.replace(
        train,
        steps=steps + 1,
        batch_size=batch or train.batch_size,
        seq_len=seq_len or train.seq_len,
    )
    if batch:  # the given rows in one microbatch
        optim = dataclasses.replace(optim, grad_accum_steps=1)
    model_cfg = from_pipeline(config)
    mesh = bench_mesh(config)
    trainer = LMTrainer.build(model_cfg, optim, train, mesh, seed=0)
    model, step, state = trainer.model, trainer.train_step, trainer.init_state()
    b, t = train.batch_size, train.seq_len
    rng = np.random.default_rng(0)
    batches = [
        {
            "tokens": rng.integers(3, model_cfg.vocab_size, (b, t), dtype=np.int32),
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_mask": np.ones((b, t), np.float32),
        }
        for _ in range(4)
    ]
    if one_doc:
        batches = [{k: x[k] for k in ("tokens", "loss_mask")} for x in batches]
    batches = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in batches]
    return model, step, state, batches, jax.random.key(1)


def bench_train(
    name: str,
    steps: int,
    peak: float,
    batch: int = 0,
    seq_len: int = 0,
    model: dict | None = None,
    one_doc: bool = False,
) -> dict:
    """Tokens/s and MFU of the pretrain stage's step for preset `name`; batch, seq_len and
    model fields (e.g. attention, remat) override the preset's; one_doc: batches without
    segment ids, one document per row (the layout cuDNN flash attention takes)."""
    model, step, state, batches, key = train_setup(name, steps, batch, seq_len, model, one_doc)
    b, t = batches[0]["tokens"].shape

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        compiled = step.lower(state, batches[0], key).compile()
        compile_s = time.perf_counter() - t0
        state, metrics = step(state, batches[0], key)
        jax.block_until_ready(metrics)
        cache_after_first = step._cache_size()
        step_times = []
        for i in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batches[i % len(batches)], key)
            jax.block_until_ready(metrics["loss"])
            step_times.append(time.perf_counter() - t0)
    bad = [str(w.message) for w in caught if "donated buffers were not usable" in str(w.message)]
    if bad:
        raise BenchError(f"{name}: {bad[0]}")
    if step._cache_size() != cache_after_first:
        raise BenchError(
            f"{name}: train step recompiled after step 1 "
            f"({cache_after_first} -> {step._cache_size()} cache entries)"
        )
    del compiled
    step_s = statistics.median(step_times)
    tokens_per_s = b * t / step_s
    flops_per_token = train_flops_per_token(model, t)
    return {
        "config": name,
        "params": model.param_count(),
        "batch": b,
        "seq_len": t,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens_per_s,
        "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        "mfu": tokens_per_s * flops_per_token / peak,
        "compile_s": compile_s,
        "final_loss": float(metrics["loss"]),
    }


SAMPLE_CONFIGS = ("tiny", "small_cpu")


def bench_sample(
    name: str, batch: int, prompt_len: int = 16, new_tokens: int = 32, repeats: int = 3
) -> dict:
    """Decode tokens/s of the KV-cache sampler vs the uncached baseline (the same jitted
    full forward run inside one lax loop). Greedy with no EOS, so every row decodes
    `new_tokens` tokens and both do the same amount of decoding."""
    from gptjax import sampling

    model = Model(from_pipeline(pipeline.get_config(name)))
    params = jax.jit(model.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    mask = np.ones_like(prompts)
    seeds = np.arange(batch, dtype=np.int32)
    kw = dict(max_new_tokens=new_tokens, eos_id=-1)  # no EOS: fixed work per call
    row = {"config": name, "batch": batch, "prompt": prompt_len, "new_tokens": new_tokens}
    for label, fn in (("cached", sampling.generate), ("uncached", sampling.generate_uncached)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(model, params, prompts, mask, seeds, **kw))
        row[f"{label}_compile_s"] = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(model, params, prompts, mask, seeds, **kw))
            times.append(time.perf_counter() - t0)
        row[f"{label}_tokens_per_s"] = batch * new_tokens / statistics.median(times)
    row["speedup"] = row["cached_tokens_per_s"] / row["uncached_tokens_per_s"]
    return row


def run_sample(args) -> dict:
    rows = [bench_sample(name, b) for name in args.configs.split(",") for b in (1, 64)]
    print(
        f"{'config':<10} {'batch':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9}"
    )
    for r in rows:
        print(
            f"{r['config']:<10} {r['batch']:>5} {r['cached_tokens_per_s']:>13.0f} "
            f"{r['uncached_tokens_per_s']:>15.0f} {r['speedup']:>8.1f}x"
        )
    return {"env": environment(), "rows": rows}


def run_train(args) -> dict:
    # The peak is measured before and after the configs and the higher one kept: a
    # background job slowing one measurement must not inflate MFU.
    peak = measure_peak_flops()
    fields = model_fields(args.model)
    rows = [bench_train(name, args.steps, 1.0, model=fields) for name in args.configs.split(",")]
    peak = max(peak, measure_peak_flops())
    for r in rows:
        r["mfu"] /= peak
    print(f"peak (2048^3 f32 matmul): {peak / 1e9:.1f} GFLOP/s on {jax.default_backend()}")
    print(
        f"{'config':<10} {'params':>8} {'B x T':>9} {'step ms':>8} {'tokens/s':>9} "
        f"{'MFU':>6} {'compile s':>9}"
    )
    for r in rows:
        print(
            f"{r['config']:<10} {r['params'] / 1e6:>7.2f}M {r['batch']:>4}x{r['seq_len']:<4} "
            f"{r['step_ms']:>8.1f} {r['tokens_per_s']:>9.0f} {100 * r['mfu']:>5.1f}% "
            f"{r['compile_s']:>9.2f}"
        )
    return {"peak_flops": peak, "env": environment(), "rows": rows}


def _decode_params(model: Model, seed: int = 0):
    """Random weights whose greedy choices are far from ties: with the init's std of 0.02
    the tied unembedding gives logits within ~0.1 of each other, and float32 rounding
    differences between two implementations flip some argmaxes; a 50x embedding spreads
    them by ~10 (the final LayerNorm keeps the trunk's scale)."""
    params = jax.jit(model.init)(jax.random.key(seed))
    return {**params, "embed": params["embed"] * 50.0}


def compare_decode(
    name: str, batch: int, threads: int, fields=None, prompt_len=16, new_tokens=32, rounds=6
) -> dict:
    """Greedy decode tokens/s, gptjax's KV-cache sampler vs Hugging Face `generate`, on
    the same weights; their output tokens are asserted identical before timing."""
    import experiments.bench_torch as bench_torch  # torch: the test extra

    model, params, prompts, ours = greedy_decoder(name, batch, prompt_len, new_tokens, fields)
    theirs = bench_torch.hf_greedy(model.cfg, params, prompts, new_tokens, threads)
    ours_tokens, their_tokens = np.asarray(ours()), theirs()
    differ = np.any(ours_tokens != their_tokens, axis=1)
    if differ.any():
        raise BenchError(
            f"decode {name} B={batch}: greedy tokens differ from Hugging Face's in "
            f"{int(differ.sum())} of {batch} rows"
        )
    seconds = alternating_blocks({"ours": ours, "theirs": theirs}, rounds, 3 if batch > 1 else 5)
    work = f"greedy decode {name}, B={batch}, prompt {prompt_len}, {new_tokens} new"
    return _compare_row(work, batch * new_tokens, seconds)


def greedy_decoder(name: str, batch: int, prompt_len: int, new_tokens: int, fields=None):
    """(model, params, prompts, decode()) for preset `name` (model `fields` over it): decode()
    runs the KV-cache sampler greedily with no EOS (every row decodes new_tokens) on random
    prompts and returns its tokens. With `bench --cpu_devices=N` the rows are split over
    the N devices (weights replicated) where N divides the batch."""
    from gptjax import sampling

    config = pipeline.get_config(name)
    config.model.update(fields or {})
    model = Model(from_pipeline(config))
    params = _decode_params(model)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
    rows = (prompts, np.ones_like(prompts), np.arange(batch, dtype=np.int32))
    mesh = bench_mesh(config)
    if batch % sharding.data_parallel_size(mesh) == 0:
        placed = jax.device_put(params, sharding.replicated(mesh))
        rows = jax.device_put(rows, sharding.batch_sharding(mesh))
    else:
        placed = params

    def decode():
        out = sampling.generate(model, placed, *rows, max_new_tokens=new_tokens, eos_id=-1)
        return jax.block_until_ready(out)[0]

    return model, params, prompts, decode


def torch_train(name: str, steps: int, threads: int, profile_steps: int = 0) -> dict:
    """The nanoGPT-style PyTorch step at preset `name`'s pretrain shapes
    (bench_torch.train_tokens_per_s), with "work", the row's label."""
    import experiments.bench_torch as bench_torch  # torch: the test extra

    config = pipeline.get_config(name)
    train, optim = section_configs(config.pretrain, "pretrain")
    out = bench_torch.train_tokens_per_s(
        from_pipeline(config), train.batch_size, train.seq_len, steps, optim.lr,
        optim.clip_norm, threads, profile_steps,
    )  # fmt: skip
    shape = f"B{train.batch_size}xT{train.seq_len}"
    out["work"] = f"train step {name} ({out['params'] / 1e6:.2f}M), {shape}"
    return out


def compare_train(name: str, steps: int, threads: int, fields: dict | None = None) -> dict:
    """Training tokens/s at the pretrain stage's shapes: gptjax's step vs the nanoGPT-style
    PyTorch model with the same parameter count (asserted), in alternating blocks of 5
    steps, `steps` of each timed."""
    import experiments.bench_torch as bench_torch  # torch: the test extra

    model, step, state, batches, key = train_setup(name, steps, model=fields)
    _, optim = section_configs(pipeline.get_config(name).pretrain, "pretrain")
    b, t = batches[0]["tokens"].shape
    torch_step, torch_params = bench_torch.train_step(
        model.cfg, b, t, optim.lr, optim.clip_norm, threads
    )
    if torch_params != model.param_count():
        raise BenchError(
            f"{name}: the PyTorch reference has {torch_params} params, gptjax "
            f"{model.param_count()}: not the same model"
        )
    calls = {"ours": 0, "theirs": 0}

    def ours():
        nonlocal state
        state, metrics = step(state, batches[calls["ours"] % len(batches)], key)
        jax.block_until_ready(metrics["loss"])
        calls["ours"] += 1

    def theirs():
        torch_step(calls["theirs"])
        calls["theirs"] += 1

    for _ in range(3):  # compile, warm up
        ours()
        theirs()
    block = 5
    seconds = alternating_blocks({"ours": ours, "theirs": theirs}, -(-steps // block), block)
    work = f"train step {name} ({torch_params / 1e6:.2f}M), B{b}xT{t}"
    return _compare_row(work, b * t, seconds)


def alternating_blocks(fns: dict, rounds: int, block: int) -> dict:
    """{name: [rounds] median seconds of a call}: each round runs every function for one
    untimed call then `block` timed ones, in reverse order every other round. A block
    keeps one side's work apart from the other's (XLA's and PyTorch's thread pools spin a
    while after their work: the untimed call absorbs the switch), and alternating the
    blocks spreads the machine's drift (clock speed, neighbours) over both sides, so each
    round's ratio compares like with like."""
    names = list(fns)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            fns[n]()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                fns[n]()
                times.append(time.perf_counter() - t0)
            out[n].append(statistics.median(times))
    return out


def model_fields(spec: str) -> dict:
    """ "scan_layers=false,attention=xla" -> ModelConfig fields typed as their defaults."""
    defaults = dataclasses.asdict(ModelConfig())
    out = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise BenchError(f"--model: no ModelConfig field {key!r}")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    return out


def _compare_row(work: str, tokens: int, seconds: dict) -> dict:
    """tokens/s of each side (`tokens` per call over its median call) and their ratio: the
    median over rounds of each round's ratio, with its range over rounds."""
    ours, theirs = (np.asarray(seconds[k]) for k in ("ours", "theirs"))
    ratios = theirs / ours
    return {
        "work": work,
        "gptjax_tokens_per_s": tokens / float(np.median(ours)),
        "torch_tokens_per_s": tokens / float(np.median(theirs)),
        "ratio": float(np.median(ratios)),
        "ratio_range": [float(ratios.min()), float(ratios.max())],
        "rounds": len(ratios),
    }


def run_compare(args) -> dict:
    try:
        import torch
    except ImportError as e:
        raise BenchError("compare needs PyTorch: pip install -e '.[test]'") from e
    fields = model_fields(args.model)
    rows = [compare_train(n, args.steps, args.threads, fields) for n in args.configs.split(",")]
    rows += [compare_decode("tiny", b, args.threads, fields) for b in (1, 64)]
    print(f"PyTorch {torch.__version__}, {args.threads} threads, eager; JAX {jax.__version__}")
    print(f"{'work':<58} {'gptjax tok/s':>12} {'PyTorch tok/s':>13} {'ratio':>6} {'rounds':>18}")
    for r in rows:
        low, high = r["ratio_range"]
        print(
            f"{r['work']:<58} {r['gptjax_tokens_per_s']:>12.0f} "
            f"{r['torch_tokens_per_s']:>13.0f} {r['ratio']:>5.2f}x "
            f"{r['rounds']:>2} ({low:.2f}-{high:.2f}x)"
        )
    return {"env": environment(), "torch": torch.__version__, "rows": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench")
    parser.add_argument(
        "--cpu_devices",
        type=int,
        default=1,
        help="data parallelism over this many single-threaded XLA:CPU devices",
    )
    parser.add_argument(
        "--keep_freed_memory",
        action="store_true",
        help="glibc malloc keeps freed memory (gptjax/host.py; not the pipeline's default)",
    )
    sub = parser.add_subparsers(dest="bench", required=True)
    p = sub.add_parser("train", help="training tokens/s and MFU")
    p.add_argument("--configs", default=",".join(TRAIN_CONFIGS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default="", help="ModelConfig overrides: FIELD=VALUE,...")
    p.add_argument("--out", default="runs/bench/train.json")
    p = sub.add_parser("sample", help="decode tokens/s, cached vs uncached")
    p.add_argument("--configs", default=",".join(SAMPLE_CONFIGS))
    p.add_argument("--out", default="runs/bench/sample.json")
    p = sub.add_parser("compare", help="train and decode tokens/s beside PyTorch's")
    p.add_argument("--configs", default="tiny,gpt2_4l")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    p.add_argument("--model", default="", help="ModelConfig overrides: FIELD=VALUE,...")
    p.add_argument("--out", default="runs/bench/compare.json")
    p = sub.add_parser("profile", help="train and decode time per op, beside PyTorch's")
    p.add_argument("--configs", default="tiny,gpt2_4l", help="train steps profiled")
    p.add_argument("--decode", default="1,64", help="batch sizes of tiny's decode profiled")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    p.add_argument("--out", default="runs/bench/profile.json")
    p = sub.add_parser("gpu", help="MFU, decode tokens/s and a PPO split on one GPU")
    p.add_argument("--train", default="gpt2_124m,llama_1b", help="PRESET[:ROWSxTOKENS],...")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--attention", default="cudnn", help="ModelConfig.attention")
    p.add_argument("--decode", default="llama_1b", help="preset decoded at B = 1, 64, 256")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--ppo", default="gpt2_124m", help="preset of the PPO split ('' skips)")
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--out", default="runs/bench/gpu.json")
    p = sub.add_parser("ppo", help="seconds per PPO iteration: rollout / scoring / update")
    p.add_argument("--configs", default=",".join(RL_CONFIGS))
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--ptx", action="store_true", help="also time PPO-ptx")
    p.add_argument("--value_from", default="", help="rm (a value model) or head (on the policy)")
    p.add_argument("--out", default="runs/bench/ppo.json")
    for method in ("grpo", "rloo", "dpo"):
        p = sub.add_parser(method, help=f"{method} beside PPO at the same sampled tokens")
        p.add_argument("--configs", default=",".join(RL_CONFIGS))
        p.add_argument("--iterations", type=int, default=5)
        p.add_argument("--out", default=f"runs/bench/{method}.json")
    p = sub.add_parser("hf_import", help="seconds and host memory of a checkpoint import")
    p.add_argument("--shape", default="llama_1b", choices=sorted(bench_hf.SHAPES))
    p.add_argument("--dir", default="", help="checkpoint directory (written if absent)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (fsdp)")
    p.add_argument("--out", default="runs/bench/hf_import.json")
    args = parser.parse_args(argv)
    if args.keep_freed_memory:
        host.keep_freed_memory()
    use_cpu_devices(args.cpu_devices)
    runners = {"train": run_train, "sample": run_sample, "ppo": run_ppo}
    runners["compare"] = run_compare
    runners["profile"] = bench_profile.run
    runners["gpu"] = bench_gpu.run
    runners["hf_import"] = bench_hf.run
    runners.update(grpo=run_versus_ppo, rloo=run_versus_ppo)
    runners.update(dpo=run_versus_ppo)
    try:
        result = runners[args.bench](args)
    except BenchError as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
