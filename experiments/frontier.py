"""The algorithms sweep's analysis: gold reward against KL to SFT for every method, read at
matched KL, with the temperature and best-of-n curves as references.

Each RM-trained method is run at several values of its KL knob (one per sweep variant),
each at several seeds. Per seed, a method's points (KL to SFT, gold reward) over the
knob's values form a curve, sorted by KL; "gold at matched KL k" is that curve linearly
interpolated at k, and only inside the seed's measured KL range (never extrapolated: a
seed whose range misses k gives no value, and the table says so). The references are
curves too: SFT sampled at lower temperatures (KL estimated like every policy's), and
best-of-n over SFT samples (its KL exact over a pool of SFT samples per prompt,
eval_stats.best_of_n_kl_pool; log n − (n − 1)/n is only an upper bound, Beirami et al.
2024, which would place best-of-n to the right of its true KL and favour RL), both
starting from SFT itself at KL 0. Differences at matched KL are paired by seed and get a
95% t-interval over seeds (gptjax/eval_stats.py t_interval). Methods trained on
the gold reward are listed apart and never ranked with the RM-trained ones.
"""

from __future__ import annotations

import math

import numpy as np

from experiments import plots
from gptjax import eval_stats

SFT, TEMPERATURE, BEST_OF = "SFT", "SFT T=", "best-of-"


def _names(cell, model: str) -> list[str]:
    """The cell's models that `model` names: itself, or every model a reference prefix
    ("SFT T=", "best-of-") starts."""
    if model.endswith(("=", "-")):
        return [m for m in cell["variants"] if m.startswith(model)]
    return [model] if model in cell["variants"] else []


def _stat(cell, model, protocol, metric):
    res = cell["variants"].get(model, {}).get(protocol, {}).get(metric)
    return None if res is None or not res.get("n") else res["mean"]


def curve(
    cells, model: str, seed: int, protocol: str = "sample", variant: str | None = None
) -> list[tuple[float, float]]:
    """(KL to SFT, gold reward) of `model` in every cell of `seed` (of `variant` only, if
    given; a reference prefix, e.g. "SFT T=", takes every model it starts), with SFT at
    KL 0 for references; sorted."""
    out = set()
    for c in cells:
        if c["seed"] != seed or (variant is not None and c["variant"] != variant):
            continue
        for name in _names(c, model):
            kl = _stat(c, name, "sample", "kl_to_sft")
            gold = _stat(c, name, protocol, "gold_reward")
            if kl is not None and gold is not None:
                out.add((kl, gold))
        if model.endswith(("=", "-")) and _stat(c, SFT, protocol, "gold_reward") is not None:
            out.add((0.0, _stat(c, SFT, protocol, "gold_reward")))
    return sorted(out)


def at_kl(points: list[tuple[float, float]], k: float) -> float | None:
    """The curve's value at KL k by linear interpolation, None outside its range."""
    if not points or not points[0][0] <= k <= points[-1][0]:
        return None
    kls, golds = zip(*points)
    return float(np.interp(k, kls, golds))


def matched(cells, seeds, model: str, k: float) -> dict:
    """Gold at matched KL k per seed: values of the seeds whose range covers k, and the
    union of the ranges."""
    values, lo, hi = {}, math.inf, -math.inf
    for s in seeds:
        pts = curve(cells, model, s)
        if pts:
            lo, hi = min(lo, pts[0][0]), max(hi, pts[-1][0])
        v = at_kl(pts, k)
        if v is not None:
            values[s] = v
    return {"values": values, "range": (lo, hi)}


def beats_sft(cells, seeds, model: str, variant: str) -> dict:
    """Gold reward of `model` minus SFT's in one sweep variant, paired by seed, per
    protocol; "beats" needs both intervals above 0, "loses" either below."""
    out = {}
    for protocol in ("greedy", "sample"):
        effects = []
        for c in cells:
            if c["variant"] == variant and c["seed"] in seeds:
                a = _stat(c, model, protocol, "gold_reward")
                b = _stat(c, SFT, protocol, "gold_reward")
                if a is not None and b is not None:
                    effects.append(a - b)
        out[protocol] = eval_stats.t_interval(effects) if effects else (math.nan,) * 3
    lows = [out[p][1] for p in out]
    highs = [out[p][2] for p in out]
    if any(math.isnan(x) for x in lows):
        word = "inconclusive"
    elif all(x > 0 for x in lows):
        word = "beats SFT"
    elif any(x < 0 for x in highs):
        word = "loses to SFT"
    else:
        word = "inconclusive"
    return {**out, "verdict": word}


def at_own_kl(cells, seeds, variant: str, model: str, reference: str) -> dict:
    """`model`'s gold (T=1) in `variant` minus the reference curve (SFT over temperature,
    or best-of-n over n, picked by the same variant's RM) read at the model's own KL to
    SFT, paired by seed; a seed whose reference range misses that KL gives no value."""
    effects = []
    for s in seeds:
        cell = next((c for c in cells if c["seed"] == s and c["variant"] == variant), None)
        kl = None if cell is None else _stat(cell, model, "sample", "kl_to_sft")
        gold = None if cell is None else _stat(cell, model, "sample", "gold_reward")
        ref = None if kl is None else at_kl(curve(cells, reference, s, variant=variant), kl)
        if gold is not None and ref is not None:
            effects.append(gold - ref)
    stat = eval_stats.t_interval(effects) if effects else (math.nan,) * 3
    word = "inconclusive"
    if not math.isnan(stat[1]):
        word = "beats" if stat[1] > 0 else ("loses to" if stat[2] < 0 else word)
    return {"stat": stat, "seeds": len(effects), "verdict": word}


def _ci(stat) -> str:
    mean, lo, hi = stat
    if math.isnan(mean):
        return "—"
    return f"{mean:+.3f}" if math.isnan(lo) else f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def analyse(spec, sweep, cells) -> dict:
    """Every table of the analysis, as data (report_lines renders them)."""
    seeds = sorted({c["seed"] for c in cells})
    refs = {"matched-temperature SFT": TEMPERATURE, "best-of-n": BEST_OF}
    beats = [
        {"method": m, "variant": v, **beats_sft(cells, seeds, m, v)}
        for m in spec.methods
        for v in sweep.variants
    ]
    at = []
    for k in spec.matched_kl:
        row = {"kl": k, "methods": {}}
        for name, model in [*[(m, m) for m in spec.methods], *refs.items()]:
            got = matched(cells, seeds, model, k)
            row["methods"][name] = {
                **got,
                "stat": eval_stats.t_interval(list(got["values"].values())),
            }
        vs = {}
        for m in spec.methods:
            for ref in refs:
                a, b = row["methods"][m]["values"], row["methods"][ref]["values"]
                effects = [a[s] - b[s] for s in seeds if s in a and s in b]
                stat = eval_stats.t_interval(effects) if effects else (math.nan,) * 3
                word = "inconclusive"
                if not math.isnan(stat[1]):
                    word = "beats" if stat[1] > 0 else ("loses to" if stat[2] < 0 else word)
                vs[m, ref] = {"stat": stat, "seeds": len(effects), "verdict": word}
        row["versus"] = vs
        at.append(row)
    own = [
        {"variant": v, "model": m, "reference": name, **at_own_kl(cells, seeds, v, m, ref)}
        for v, m in spec.get("own_kl") or []
        for name, ref in refs.items()
    ]
    return {"seeds": seeds, "beats_sft": beats, "matched": at, "own_kl": own}


def report_lines(analysis: dict, spec) -> list[str]:
    lines = ["## Algorithms at matched KL", "", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    if analysis["beats_sft"]:
        lines += [
            "### Gold reward minus SFT's (paired by seed)",
            "",
            "| method | variant | greedy | sample (T=1) | verdict |",
            "|---|---|---|---|---|",
        ]
    for b in analysis["beats_sft"]:
        lines.append(
            f"| {b['method']} | {b['variant']} | {_ci(b['greedy'])} | {_ci(b['sample'])} | "
            f"**{b['verdict']}** |"
        )
    for row in analysis["matched"]:
        k = row["kl"]
        lines += ["", f"### Gold reward (T=1) at KL to SFT = {k:g} nats", ""]
        lines += ["| method | gold at matched KL | seeds in range | measured KL range |"]
        lines += ["|---|---|---|---|"]
        for name, got in row["methods"].items():
            lo, hi = got["range"]
            span = "—" if math.isinf(lo) else f"{lo:.2f} – {hi:.2f}"
            n = len(got["values"])
            value = _ci(got["stat"]) if n else "not measured (KL outside the range)"
            lines.append(f"| {name} | {value} | {n} | {span} |")
        lines += ["", "| method − reference | difference | seeds | verdict |", "|---|---|---|---|"]
        for (m, ref), v in row["versus"].items():
            lines.append(f"| {m} − {ref} | {_ci(v['stat'])} | {v['seeds']} | **{v['verdict']}** |")
    if analysis.get("own_kl"):
        lines += ["", "### Gold (T=1) minus the reference at the method's own KL", ""]
        lines += [
            "Each seed's reference curve (its variant's SFT over temperature, or best-of-n "
            "picked by its variant's RM) read at the method's measured KL to SFT; paired by "
            "seed.",
            "",
            "| variant / method − reference | difference | seeds | verdict |",
            "|---|---|---|---|",
        ]
        for r in analysis["own_kl"]:
            lines.append(
                f"| {r['variant']} / {r['model']} − {r['reference']} | {_ci(r['stat'])} | "
                f"{r['seeds']} | **{r['verdict']}** |"
            )
    if spec.gold_methods:
        lines += [
            "",
            "Methods trained on the gold reward itself (an upper reference, not ranked with "
            "the RM-trained methods): see their rows in the per-variant table.",
        ]
    return lines


def plot(path: str, cells, spec, across_variants: bool = True) -> None:
    """Gold reward (T=1) against KL to SFT: each method's points over its KL knob (mean
    over seeds, 95% intervals on both axes), the reference curves dashed, the
    gold-trained methods as open markers. across_variants False (the variants are not a
    knob): one series per variant and model."""
    groups = sorted({c["variant"] for c in cells}) if not across_variants else [None]
    series = []
    for group in groups:
        for s in _series(
            cells if group is None else [c for c in cells if c["variant"] == group], spec
        ):
            series.append(s if group is None else {**s, "label": f"{group}/{s['label']}"})
    plots.plot_frontier(path, series, "gold reward vs KL to SFT (mean over seeds, 95% CI)")


def _series(cells, spec) -> list[dict]:
    series = []
    for model in [SFT, *spec.methods, TEMPERATURE, BEST_OF, *spec.gold_methods]:
        by_point: dict[str, list[tuple[float, float]]] = {}
        for c in cells:
            for name in _names(c, model):
                kl = _stat(c, name, "sample", "kl_to_sft")
                gold = _stat(c, name, "sample", "gold_reward")
                if kl is not None and gold is not None:
                    by_point.setdefault(f"{c['variant']}/{name}", []).append((kl, gold))
        pts = sorted(
            (np.mean([p[0] for p in v]), np.mean([p[1] for p in v]), _half([p[0] for p in v]),
             _half([p[1] for p in v]))
            for v in by_point.values()
        )  # fmt: skip
        label = {TEMPERATURE: "SFT at T < 1", BEST_OF: "best-of-n"}.get(model, model)
        kind = {TEMPERATURE: "reference", BEST_OF: "reference", SFT: "sft"}.get(model, "method")
        kind = "gold" if model in spec.gold_methods else kind
        if pts:
            series.append({"label": label, "kind": kind, "points": pts})
    return series


def _half(values) -> float:
    """Half the width of the 95% t-interval (0 for a single value)."""
    mean, lo, hi = eval_stats.t_interval(values)
    return 0.0 if math.isnan(lo) else (hi - lo) / 2
