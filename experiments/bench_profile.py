"""bench profile: where a train step's and greedy decoding's time goes, op by op, beside
PyTorch's.

    python -m experiments.bench profile [--configs=tiny,gpt2_4l] [--decode=1,64] [--steps=10]

gptjax: the pretrain stage's jitted step (experiments/bench.py train_setup), and tiny's
greedy KV-cache decoding (bench.py greedy_decoder), under jax.profiler; each XLA:CPU op's
self time (its events on XLA's threads, less the ops nested in it: a scan's body inside
its while loop) summed over the threads that ran it. PyTorch (the test extra): the same
shape's nanoGPT-style step (experiments/bench_torch.py), and Hugging Face `generate` on
the same weights, under torch.profiler, each aten op's self CPU time. Both are grouped
into the same categories (matmul, elementwise, reduction / softmax, copy / layout,
other), each category's share of the op time times the median wall time (unprofiled),
so the two columns sum to the two wall times and the gap shows up where it is.

Shares, not raw sums: XLA:CPU runs independent ops on two threads at once (its op times
can sum to more than the step's wall time), and torch.profiler's per-op overhead inflates
a small model's many short aten ops.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile

import jax
import numpy as np

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


def self_times(events) -> collections.Counter:
    """{name: self time} of one thread's (start, duration, name) events: an event's
    duration less those of the events nested in it (a while loop less its body's ops)."""
    totals: collections.Counter = collections.Counter()
    stack: list = []  # (end, name) of the events open at an event's start
    for start, duration, name in sorted(events, key=lambda e: (e[0], -e[1])):
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            totals[stack[-1][1]] -= duration
        totals[name] += duration
        stack.append((start + duration, name))
    return totals


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
            if line.name.startswith("tf_XLA"):  # one of XLA's threads
                events = ((e.start_ns, e.duration_ns, e.name) for e in line.events)
                totals.update(self_times(e for e in events if not e[2].startswith(_NOT_OPS)))
    return {name: ns / 1e6 / steps for name, ns in totals.items()}


def by_category(op_ms: dict[str, float], table, wall_ms: float) -> dict[str, float]:
    """{category: its share of the op time x wall_ms}."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for name, ms in op_ms.items():
        out[category(name, table)] += ms
    total = sum(out.values()) or 1.0
    return {cat: ms / total * wall_ms for cat, ms in out.items()}


def _row(work: str, ours: dict, ours_ms: float, theirs: dict, theirs_ms: float) -> dict:
    """Both sides' op times (ms per call) by category, scaled to their wall times."""
    top = lambda ops: sorted(ops.items(), key=lambda kv: -kv[1])[:12]
    return {
        "work": work,
        "gptjax_wall_ms": ours_ms,
        "torch_wall_ms": theirs_ms,
        "gptjax_ms": by_category(ours, _XLA, ours_ms),
        "torch_ms": by_category(theirs, _TORCH, theirs_ms),
        "gptjax_top_ops": top(ours),
        "torch_top_ops": top(theirs),
    }


def profile_train(name: str, steps: int, threads: int) -> dict:
    """The pretrain stage's step of preset `name` beside the PyTorch step of its shape."""
    import experiments.bench_torch as bench_torch  # torch: the test extra
    from experiments.bench import torch_train, train_setup

    _, step, state, batches, key = train_setup(name, steps)
    box = {"state": state, "i": 0}

    def run_step():
        box["state"], metrics = step(box["state"], batches[box["i"] % 4], key)
        box["i"] += 1
        jax.block_until_ready(metrics)

    for _ in range(3):
        run_step()
    wall_ms = 1e3 * bench_torch.median_seconds(run_step, steps)
    ours = xla_self_ms(run_step, steps)
    theirs = torch_train(name, steps, threads, profile_steps=steps)
    return _row(theirs["work"], ours, wall_ms, theirs["ops_ms"], theirs["step_ms"])


def profile_decode(name: str, batch: int, threads: int, repeats: int = 5) -> dict:
    """Greedy decoding with the KV cache (prompt 16, 32 new tokens) beside Hugging Face
    `generate` on the same weights (experiments/bench.py compare_decode)."""
    import torch

    import experiments.bench_torch as bench_torch  # torch: the test extra
    from experiments.bench import greedy_decoder

    model, params, prompts, ours = greedy_decoder(name, batch, 16, 32)
    theirs = bench_torch.hf_greedy(model.cfg, params, prompts, 32, threads)
    run_ours = lambda: np.asarray(ours())
    for fn in (run_ours, theirs):
        fn()
    ours_ms = 1e3 * bench_torch.median_seconds(run_ours, repeats)
    theirs_ms = 1e3 * bench_torch.median_seconds(theirs, repeats)
    ours_ops = xla_self_ms(run_ours, repeats)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            theirs()
    their_ops = {
        e.key: e.self_cpu_time_total / 1e3 / repeats
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    }
    work = f"greedy decode {name}, B={batch}, prompt 16, 32 new"
    return _row(work, ours_ops, ours_ms, their_ops, theirs_ms)


def run(args) -> dict:
    rows = [profile_train(n, args.steps, args.threads) for n in args.configs.split(",") if n]
    rows += [profile_decode("tiny", int(b), args.threads) for b in args.decode.split(",") if b]
    for r in rows:
        ours, theirs = r["gptjax_wall_ms"], r["torch_wall_ms"]
        print(f"\n{r['work']}: wall gptjax {ours:.1f} ms, PyTorch {theirs:.1f} ms")
        print(f"{'ms (share of op time)':<24} {'gptjax':>8} {'PyTorch':>8} {'gap':>8}")
        for cat in CATEGORIES:
            a, b = r["gptjax_ms"][cat], r["torch_ms"][cat]
            print(f"{cat:<24} {a:>8.1f} {b:>8.1f} {a - b:>+8.1f}")
        print(f"{'wall':<24} {ours:>8.1f} {theirs:>8.1f} {ours - theirs:>+8.1f}")
        for who in ("gptjax", "torch"):
            ops = ", ".join(f"{n} {ms:.1f}" for n, ms in r[f"{who}_top_ops"])
            print(f"{who}'s largest ops (profiled self ms): {ops}")
    return {"rows": rows}
