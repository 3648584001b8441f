"""bench profile: where a training step's time goes, op by op, beside PyTorch's.

    python -m experiments.bench profile [--configs=tiny,gpt2_4l] [--steps=10]

gptjax: the pretrain stage's jitted step (experiments/bench.py train_setup) under
jax.profiler; each XLA:CPU op's self time (its events on XLA's threads, less the ops
nested in it: a scan's body inside its while loop) summed over the threads that ran it.
PyTorch (the test extra): the same shape's nanoGPT-style step (experiments/bench_torch.py)
under torch.profiler, each aten op's self CPU time. Both are grouped into the same
categories (matmul, elementwise, reduction / softmax, copy / layout, other), each
category's share of the op time times the step's median wall time (unprofiled), so the
two columns sum to the two step times and the gap shows up where it is.

Shares, not raw sums: XLA:CPU runs independent ops on two threads at once (its op times
can sum to more than the step's wall time), and torch.profiler's per-op overhead inflates
a small model's many short aten ops.
"""

from __future__ import annotations

import collections
import glob
import re
import statistics
import tempfile
import time

import jax

# Events on XLA's threads that are not ops: the executor's and thread pool's bookkeeping.
_NOT_OPS = ("ThreadpoolListener", "ThunkExecutor", "end: ")

CATEGORIES = ("matmul", "elementwise", "reduction / softmax", "copy / layout", "other")

# XLA:CPU op names (HLO instruction names: ynn_fusion is a YNNPACK matmul, dot a plain one).
_XLA = (
    ("matmul", r"^(ynn|xnn|dot|onednn|custom-call|convolution)"),
    ("copy / layout", r"copy|transpose|broadcast|concatenate|dynamic.update.slice|pad|slice"),
    ("reduction / softmax", r"reduce|softmax|exponential|log"),
    ("other", r"^(while|conditional|call|rng|scatter|gather|sort)"),
)
# aten op names.
_TORCH = (
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|baddbmm|_scaled_dot_product)"),
    (
        "copy / layout",
        r"copy_|contiguous|transpose|clone|cat|slice|view|permute|expand|"
        r"reshape|select|unsqueeze|as_strided|aten::t$|empty|zero_|fill_|index",
    ),
    ("reduction / softmax", r"sum|mean|softmax|norm|max|min|cross_entropy|nll|logsumexp"),
)


def category(name: str, table) -> str:
    for cat, pattern in table:
        if re.search(pattern, name):
            return cat
    return "elementwise"


def xla_self_ms(run_step, steps: int) -> dict[str, float]:
    """{op name: self ms per step} of XLA:CPU's ops over `steps` calls of run_step."""
    from jax._src.lib import _profile_data

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                run_step()
        (path,) = glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)
        profile = _profile_data.ProfileData.from_file(path)
    totals: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            events = sorted(
                ((e.start_ns, e.duration_ns, e.name) for e in line.events
                 if not e.name.startswith(_NOT_OPS)),
                key=lambda e: (e[0], -e[1]),
            )  # fmt: skip
            stack: list = []  # [end, name] of the ops open at an event's start
            for start, duration, name in events:
                while stack and stack[-1][0] <= start:
                    stack.pop()
                if stack:  # nested: its time is not its parent's own
                    totals[stack[-1][1]] -= duration
                totals[name] += duration
                stack.append((start + duration, name))
    return {name: ns / 1e6 / steps for name, ns in totals.items()}


def by_category(op_ms: dict[str, float], table, wall_ms: float) -> dict[str, float]:
    """{category: its share of the op time x wall_ms}."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in op_ms.items():
        out[category(name, table)] += ms
    total = sum(out.values()) or 1.0
    return {cat: ms / total * wall_ms for cat, ms in out.items()}


def profile_config(name: str, steps: int, threads: int) -> dict:
    import experiments.bench_torch as bench_torch  # torch: the test extra
    from configs import pipeline
    from experiments.bench import train_setup
    from gptjax.model import from_pipeline
    from gptjax.trainer import section_configs

    model, step, state, batches, key = train_setup(name, steps)
    box = {"state": state, "i": 0}

    def run_step():
        box["state"], metrics = step(box["state"], batches[box["i"] % 4], key)
        box["i"] += 1
        jax.block_until_ready(metrics)

    times = []
    for _ in range(steps + 3):
        t0 = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - t0)
    ours = xla_self_ms(run_step, steps)
    config = pipeline.get_config(name)
    train, optim = section_configs(config.pretrain, "pretrain")
    theirs = bench_torch.train_tokens_per_s(
        from_pipeline(config), train.batch_size, train.seq_len, steps, optim.lr,
        optim.clip_norm, threads, profile_steps=steps,
    )  # fmt: skip
    top = sorted(ours.items(), key=lambda kv: -kv[1])[:12]
    wall_ms = 1e3 * statistics.median(times[3:])
    return {
        "config": name,
        "params": model.param_count(),
        "shape": f"B{train.batch_size}xT{train.seq_len}",
        "gptjax_step_ms": wall_ms,
        "torch_step_ms": theirs["step_ms"],
        "gptjax_ms": by_category(ours, _XLA, wall_ms),
        "torch_ms": by_category(theirs["ops_ms"], _TORCH, theirs["step_ms"]),
        "gptjax_top_ops": top,
        "torch_top_ops": sorted(theirs["ops_ms"].items(), key=lambda kv: -kv[1])[:12],
    }


def run(args) -> dict:
    rows = [profile_config(n, args.steps, args.threads) for n in args.configs.split(",")]
    for r in rows:
        a, b = r["gptjax_step_ms"], r["torch_step_ms"]
        print(f"\n{r['config']} ({r['params'] / 1e6:.2f}M, {r['shape']}): step wall "
              f"gptjax {a:.1f} ms, PyTorch {b:.1f} ms")  # fmt: skip
        print(f"{'ms per step (share of ops)':<28} {'gptjax':>8} {'PyTorch':>8} {'gap':>8}")
        for cat in CATEGORIES:
            a, b = r["gptjax_ms"][cat], r["torch_ms"][cat]
            print(f"{cat:<28} {a:>8.1f} {b:>8.1f} {a - b:>+8.1f}")
        print(f"{'step':<28} {a:>8.1f} {b:>8.1f} {a - b:>+8.1f}")
        for who in ("gptjax", "torch"):
            ops = ", ".join(f"{n} {ms:.1f}" for n, ms in r[f"{who}_top_ops"])
            print(f"{who}'s largest ops (profiled self ms per step): {ops}")
    return {"rows": rows}
