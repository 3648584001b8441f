"""The GPU benchmark (`python -m experiments.bench gpu`), one run of a few minutes:

  - training MFU of gpt2_124m and llama_1b on one GPU, against the GPU's dense bf16 peak
    (NVIDIA's datasheet figure for the device kind JAX reports; an unknown kind is measured
    with a bf16 matmul and the table says so), batches of one document per row so that
    cuDNN flash attention applies (ModelConfig.attention "cudnn", gptjax/layers.py);
  - greedy decode tokens/s with the KV cache at B = 1, 64, 256;
  - a PPO iteration's split (rollout / scoring / update) at gpt2_124m.

On a CPU the same code runs at small shapes (`--train=tiny:32x64 --decode=tiny --ppo=tiny
--attention=xla`): how the tests exercise every path but cuDNN's kernel.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core peaks, FLOP/s (NVIDIA datasheets, SXM parts without sparsity).
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12}
# preset -> (rows, tokens per row, model overrides) of one training step on one 80 GiB GPU:
# flash attention keeps no T x T intermediates, so "dots" (save the matmuls) fits.
TRAIN = {
    "gpt2_124m": (16, 1024, {"remat": "none"}),
    "llama_1b": (8, 2048, {"remat": "dots"}),
}


def device_peak(device=None) -> tuple[float, str]:
    """(bf16 FLOP/s, where the figure comes from) for `device` (default the first)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in PEAK_BF16.items():
        if name in kind:
            return peak, f"{kind}: datasheet dense bf16"
    import experiments.bench as bench

    peak = bench.measure_peak_flops(4096, 5, jnp.bfloat16)
    return peak, f"{kind or device.platform}: measured 4096^3 bf16 matmul"


def decode_tokens_per_s(name: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Greedy decode with the KV cache, no EOS (every row decodes new_tokens), median of 3."""
    import experiments.bench as bench

    *_, run = bench.greedy_decoder(name, batch, prompt_len, new_tokens)
    t0 = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return {
        "config": name,
        "batch": batch,
        "prompt": prompt_len,
        "new_tokens": new_tokens,
        "first_s": compile_s,
        "tokens_per_s": batch * new_tokens / statistics.median(times),
    }


def parse_train(spec: str) -> list[tuple[str, int, int, dict]]:
    """ "gpt2_124m,llama_1b" (TRAIN's shapes) or "NAME:ROWSxTOKENS,..." -> rows."""
    out = []
    for item in filter(None, spec.split(",")):
        name, _, shape = item.partition(":")
        if shape:
            rows, tokens = (int(x) for x in shape.split("x"))
            out.append((name, rows, tokens, {}))
        else:
            out.append((name, *TRAIN[name]))
    return out


def run(args) -> dict:
    import experiments.bench as bench
    import experiments.bench_rl as bench_rl

    peak, source = device_peak()
    print(f"peak: {peak / 1e12:.1f} TFLOP/s ({source})")
    train = []
    for name, rows, tokens, fields in parse_train(args.train):
        fields = {**fields, "attention": args.attention}
        train.append(bench.bench_train(name, args.steps, peak, rows, tokens, fields, True))
    decode = [
        decode_tokens_per_s(args.decode, b, args.prompt_len, args.new_tokens) for b in (1, 64, 256)
    ]
    ppo = [bench_rl.bench_rl(args.ppo, "ppo", args.iterations)] if args.ppo else []
    print(
        f"{'train':<10} {'B x T':>10} {'step ms':>8} {'tokens/s':>10} {'MFU':>6} {'compile s':>9}"
    )
    for r in train:
        print(
            f"{r['config']:<10} {r['batch']:>5}x{r['seq_len']:<4} {r['step_ms']:>8.1f} "
            f"{r['tokens_per_s']:>10.0f} {100 * r['mfu']:>5.1f}% {r['compile_s']:>9.1f}"
        )
    print(f"{'decode':<10} {'batch':>6} {'tokens/s':>10} {'first s':>8}")
    for r in decode:
        print(f"{r['config']:<10} {r['batch']:>6} {r['tokens_per_s']:>10.0f} {r['first_s']:>8.1f}")
    if ppo:
        bench_rl.print_rows(ppo)
    return {
        "env": bench_rl.environment(),
        "device": jax.devices()[0].device_kind,
        "peak_flops": peak,
        "peak_source": source,
        "train": train,
        "decode": decode,
        "ppo": ppo,
    }
