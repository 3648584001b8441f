"""Statistics of an evaluation: metrics of replies, their means over prompts with 95%
percentile-bootstrap intervals (samples of one prompt are averaged first, so the interval
reflects prompt-to-prompt variation), diversity among a prompt's samples (distinct-n,
Li et al. 2016, and the share of unique replies), and the markdown tables.

A metric is (which prompts, value of one reply): select(record) -> bool, value(record,
reply) -> float or None (skipped). REPLY_METRICS need only the replies and what
gptjax/evaluate.py scored them with; a world adds its own (gptjax/world/evaluation.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _per_prompt(records, replies, value_fn, select_fn) -> list[float]:
    """Mean of value_fn over each selected prompt's replies (None values are skipped)."""
    by_prompt: dict[int, list[float]] = {}
    for r in replies:
        rec = records[r.index]
        if select_fn(rec):
            value = value_fn(rec, r)
            if value is not None:
                by_prompt.setdefault(r.index, []).append(value)
    return [float(np.mean(v)) for _, v in sorted(by_prompt.items())]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique word n-grams / all word n-grams over the texts (None if there are none)."""
    grams = [
        tuple(words[i : i + n])
        for words in (t.split() for t in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


# Diversity among one prompt's samples (needs >= 2 samples of the prompt).
PROMPT_METRICS = {
    "distinct_1": lambda texts: distinct_n(texts, 1),
    "distinct_2": lambda texts: distinct_n(texts, 2),
    "unique_rate": lambda texts: len(set(texts)) / len(texts),
}


# name -> (which prompts, value of one reply); None values are skipped. Model-scored
# metrics are present when the caller scored the replies (with_extra).
REPLY_METRICS = {
    "length_tokens": (lambda rec: True, lambda rec, r: float(r.n_tokens)),
    "eos_rate": (lambda rec: True, lambda rec, r: float(r.ended)),
    "rm_reward": (lambda rec: True, lambda rec, r: r.extra.get("rm_reward")),
    # An RM trained on other comparisons, when the run has one (no policy trained on it).
    "heldout_rm_reward": (lambda rec: True, lambda rec, r: r.extra.get("heldout_rm_reward")),
    "kl_to_sft": (lambda rec: True, lambda rec, r: r.extra.get("kl")),
    "entropy": (lambda rec: True, lambda rec, r: r.extra.get("entropy")),
}


def win_rate_metrics(judges: Sequence[str], reference: str = "sft") -> dict:
    """win_rate_<judge>_vs_<reference>: the share of replies that beat the reference's
    (compare_to), ties one half."""
    return {
        f"win_rate_{name}_vs_{reference}": (
            lambda rec: True,
            lambda rec, r, key=f"win_{name}": r.extra.get(key),
        )
        for name in judges
    }


def summarize(
    records: Sequence[dict],
    replies: Sequence,
    metrics: Mapping,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each metric's mean over prompts with its bootstrap interval, then the diversity
    metrics among each prompt's samples. metrics: name -> (select, value), e.g.
    REPLY_METRICS plus a world's."""

    def stat(per_prompt):
        mean, lo, hi = bootstrap_ci(per_prompt, n_boot, seed)
        return {"mean": mean, "lo": lo, "hi": hi, "n": len(per_prompt)}

    out = {name: stat(_per_prompt(records, replies, v, s)) for name, (s, v) in metrics.items()}
    texts: dict[int, list[str]] = {}
    for r in replies:
        texts.setdefault(r.index, []).append(r.text)
    groups = [t for _, t in sorted(texts.items()) if len(t) > 1]
    for name, fn in PROMPT_METRICS.items():
        out[name] = stat([v for v in map(fn, groups) if v is not None])
    return out


def format_table(results: dict[str, dict], protocol_name: str, metrics: Sequence[str]) -> str:
    """Markdown table: one row per model, `mean [lo, hi]` per metric."""
    header = "| model | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for model_name, res in results.items():
        cells = []
        for m in metrics:
            s = res[protocol_name][m]
            cells.append("—" if not s["n"] else f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]")
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_results(out: dict, table_metrics, model_metrics) -> str:
    """The tables of an evaluation: one per protocol (table_metrics), one per model."""
    lines = [f"eval on {out['records']} held-out prompts"]
    # Models trained on another reward than the RM (the gold labeler itself) get their
    # own tables: they are not ranked with the RM-trained methods.
    groups = {}
    for name, res in out["variants"].items():
        groups.setdefault(res.get("trained_on", ""), {})[name] = res
    for trained_on, variants in groups.items():
        title = f" (trained on the {trained_on} reward)" if trained_on else ""
        for proto_name in ("greedy", "sample"):
            lines += [
                "",
                f"{proto_name}{title}:",
                format_table(variants, proto_name, table_metrics),
            ]
        lines += ["", f"per model{title}:", format_model_table(variants, model_metrics)]
    if out.get("differences"):
        lines += ["", "paired differences (bootstrap over prompts, 95%):"]
        lines += format_differences(out["differences"])
    return "\n".join(lines)


def format_differences(differences: dict) -> list[str]:
    metrics = list(next(iter(next(iter(differences.values())).values())))
    lines = ["| a − b | protocol | " + " | ".join(metrics) + " |"]
    lines.append("|---|---" + "|---" * len(metrics) + "|")
    for pair, protos in differences.items():
        for proto, stats in protos.items():
            cells = [f"{s['mean']:+.3f} [{s['lo']:+.3f}, {s['hi']:+.3f}]" for s in stats.values()]
            lines.append(f"| {pair} | {proto} | " + " | ".join(cells) + " |")
    return lines


def format_model_table(results: dict, metrics) -> str:
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, res in results.items():
        cells = []
        for m in metrics:
            s = res["model"].get(m)
            cells.append("—" if s is None else f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# t quantiles (0.975) by degrees of freedom: intervals over a handful of seeds.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def t_interval(values) -> tuple[float, float, float]:
    """(mean, lo, hi): the 95% t-interval of the mean over a few values (e.g. seeds); the
    bounds are nan with fewer than 2 values."""
    x = np.asarray(values, np.float64)
    mean = float(x.mean()) if len(x) else float("nan")
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = T_975.get(len(x) - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return mean, mean - half, mean + half


def best_of_n_kl_pool(rewards: Sequence[float], keys: Sequence, n: int) -> float:
    """KL(best-of-n ‖ base) for one prompt, exact for the empirical distribution of a pool
    of m base samples (rewards[i] of sample i, keys[i] its identity: equal keys are one
    reply). Beirami et al. (2024): log n − (n−1)/n is only an upper bound, reached when
    every sample is distinct; repeated replies (a small policy repeats itself) make the
    true KL smaller.

    With the distinct replies grouped into reward levels v_1 < … < v_L of base mass p_l
    and F_l = p_1 + … + p_l, best-of-n lands in level l with probability
    q_l = F_l^n − F_{l−1}^n, spread over the level in proportion to base mass (a tie
    between distinct replies is broken at random), so KL = Σ_l q_l log(q_l / p_l).
    A plug-in estimate: biased low for a pool not much larger than n."""
    mass: dict = {}
    reward: dict = {}
    for r, k in zip(rewards, keys, strict=True):
        mass[k] = mass.get(k, 0) + 1
        reward[k] = float(r)
    levels: dict[float, float] = {}
    for k, count in mass.items():
        levels[reward[k]] = levels.get(reward[k], 0.0) + count / len(rewards)
    p = np.array([levels[v] for v in sorted(levels)], np.float64)
    cdf = np.cumsum(p)
    q = cdf**n - np.concatenate([[0.0], cdf[:-1]]) ** n
    keep = q > 0
    return float(np.sum(q[keep] * np.log(q[keep] / p[keep])))


def paired_difference(
    records, replies_a, replies_b, metric, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Mean over prompts of metric(a) − metric(b) with a paired percentile bootstrap: the
    prompts are resampled together, so the difference's interval is not the wider one two
    separate intervals would imply (the prompts' difficulty cancels). metric = (select,
    value) as in summarize; each prompt's value is the mean over its replies; prompts
    answered by only one model are left out."""
    select, value = metric

    def by_prompt(replies):
        out: dict[int, list[float]] = {}
        for r in replies:
            rec = records[r.index]
            if select(rec) and (v := value(rec, r)) is not None:
                out.setdefault(r.index, []).append(v)
        return {i: float(np.mean(v)) for i, v in out.items()}

    a, b = by_prompt(replies_a), by_prompt(replies_b)
    diffs = [a[i] - b[i] for i in sorted(a.keys() & b.keys())]
    mean, lo, hi = bootstrap_ci(diffs, n_boot, seed)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(diffs)}


def length_controlled_win_rate(wins, length_diffs, iterations: int = 25) -> float:
    """The win rate at equal length: a logistic regression of the win (1, ½ for a tie, 0)
    on the length difference to the reference, read at a difference of 0, σ(intercept)
    (the idea of AlpacaEval's length-controlled win rate, Dubois et al. 2024, with length
    as the only covariate). A judge that favours longer replies gives a raw win rate above
    this one. Fitted by Newton's method; nan without data."""
    y = np.asarray(wins, np.float64)
    if len(y) == 0:
        return float("nan")
    x = np.asarray(length_diffs, np.float64)
    scale = max(float(np.std(x)), 1.0)
    features = np.stack([np.ones_like(x), x / scale], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-features @ w))
        grad = features.T @ (y - p)
        hess = (features * (p * (1 - p))[:, None]).T @ features + 1e-6 * np.eye(2)
        w = w + np.linalg.solve(hess, grad)
    return float(1.0 / (1.0 + np.exp(-w[0])))


def length_controlled(records, replies, judge: str, n_boot: int = 200, seed: int = 0) -> dict:
    """{"mean", "lo", "hi", "n"}: length_controlled_win_rate of win_<judge> over the
    replies compared to a reference, with a percentile bootstrap over prompts."""
    key = f"win_{judge}"
    by_prompt: dict[int, list[tuple[float, float]]] = {}
    for r in replies:
        if r.extra.get(key) is not None and "length_diff" in r.extra:
            by_prompt.setdefault(r.index, []).append((r.extra[key], r.extra["length_diff"]))
    prompts = sorted(by_prompt)
    if not prompts:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}

    def fit(chosen):
        pairs = [p for i in chosen for p in by_prompt[i]]
        return length_controlled_win_rate([a for a, _ in pairs], [b for _, b in pairs])

    rng = np.random.default_rng(seed)
    boots = [fit([prompts[j] for j in rng.integers(0, len(prompts), len(prompts))])
             for _ in range(n_boot)]  # fmt: skip
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"mean": fit(prompts), "lo": float(lo), "hi": float(hi), "n": len(prompts)}
