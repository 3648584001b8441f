"""The GPU benchmark (`python -m experiments.bench gpu`), one run of a few minutes:

  - training MFU of gpt2_124m and llama_1b on one GPU, against the GPU's dense bf16 peak
    (NVIDIA's datasheet figure for the device kind JAX reports; an unknown kind is measured
    with a bf16 matmul and the table says so), batches of one document per row so that
    cuDNN flash attention applies (ModelConfig.attention "cudnn", gptjax/layers.py);
  - greedy decode tokens/s with the KV cache at B = 1, 64, 256;
  - a PPO iteration's split (rollout / scoring / update) at gpt2_124m;
  - first, a correctness check of the attention kernel timed (cuDNN's, on a GPU) against
    gptjax's own einsum attention: logits and the LM loss's gradients of a 2-layer model of
    the first training preset, on one-document rows.

On a CPU the same code runs at small shapes (`--train=tiny:32x64 --decode=tiny --ppo=tiny
--attention=xla`): how the tests exercise every path but cuDNN's kernel
(tests/test_layers.py). experiments/gpu_run.sh runs it on a lent GPU machine.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

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


# Largest difference, relative to the einsum path's largest magnitude, that counts as the
# same attention: one side's attention in float32 instead of bfloat16 moves logits or
# gradients by 1-2e-2, a missing causal mask by their own size, logits 10% too large by
# 0.07-0.22 (BUILD.md, GPU; not yet calibrated on a GPU).
ATTENTION_TOLERANCE = 5e-2


def attention_check(name: str, attention: str, batch: int = 2, seq_len: int = 256) -> dict:
    """Preset `name` cut to 2 layers with `attention` against the same weights with
    gptjax's einsum attention, on random one-document rows (the layout cuDNN takes): the
    largest logits and gradient differences of the next-token loss, each relative to the
    einsum path's largest magnitude."""
    from configs import pipeline
    from gptjax import losses
    from gptjax.model import Model, from_pipeline

    def model(impl):
        config = pipeline.get_config(name)
        config.model.update(n_layers=2, attention=impl)
        return Model(from_pipeline(config))

    ours, theirs = model("einsum"), model(attention)
    params = jax.jit(ours.init)(jax.random.key(0))
    # Queries and keys 4x the init's: attention logits 16x, so each row attends to a few
    # positions, as a trained model does, where the init's near-uniform attention would
    # hide a wrong scale.
    blocks = {**params["blocks"], **{w: 4.0 * params["blocks"][w] for w in ("wq", "wk")}}
    params = {**params, "blocks": blocks}
    shape = (batch, min(seq_len, ours.cfg.max_len))
    tokens = np.random.default_rng(0).integers(3, ours.cfg.vocab_size, shape, dtype=np.int32)

    def loss_and_logits(m, p):
        logits = m.apply(p, tokens)  # no segment ids: one document per row
        return -jnp.mean(losses.token_logprobs(logits, tokens)[:, 1:]), logits

    def grads(m):
        fn = jax.jit(jax.grad(lambda p: loss_and_logits(m, p), has_aux=True))
        return jax.device_get(fn(params))

    (g_ref, logits_ref), (g, logits) = grads(ours), grads(theirs)

    def rel(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        scale = max(float(np.max(np.abs(np.asarray(x, np.float32)))) for x in b)
        diff = max(
            float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
            for x, y in zip(a, b)
        )
        return diff / max(scale, 1e-30)

    out = {"config": name, "attention": attention, "batch": batch, "seq_len": shape[1]}
    out.update(logits_rel_diff=rel(logits, logits_ref), grads_rel_diff=rel(g, g_ref))
    out["ok"] = max(out["logits_rel_diff"], out["grads_rel_diff"]) <= ATTENTION_TOLERANCE
    return out


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
    train_rows = parse_train(args.train)
    check = attention_check(train_rows[0][0], args.attention)
    print(
        f"attention check, {check['attention']} vs einsum ({check['config']}, 2 layers, "
        f"{check['batch']}x{check['seq_len']}): largest relative difference, logits "
        f"{check['logits_rel_diff']:.1e}, gradients {check['grads_rel_diff']:.1e} "
        f"(tolerance {ATTENTION_TOLERANCE:.0e}): {'ok' if check['ok'] else 'FAILED'}"
    )
    train = []
    for name, rows, tokens, fields in train_rows:
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
        "attention_check": check,
        "train": train,
        "decode": decode,
        "ppo": ppo,
    }
