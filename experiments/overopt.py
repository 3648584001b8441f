"""Reward-model over-optimisation, measured as Gao, Schulman & Hilton (2022) measured it.

    python -m experiments.sweep --config=configs/sweep.py:overopt

Gold (the world's noiseless labeler) and proxy (the RM the policy is optimised against)
reward, as gains over SFT, against d = √KL(π ‖ SFT), for RMs trained on different amounts
of comparison data (one sweep variant each), two ways of optimising:

- best-of-n over SFT samples, n = 1 … 64: the evaluator's best-of-n variants, KL exact
  over each prompt's pool of SFT samples (eval_stats.best_of_n_kl_pool);
- RL: a long low-β PPO run, evaluated every few iterations during training (the in-stage
  evaluation's gold reward, RM reward and KL, experiments/stages/rl.py proxy_and_kl: the
  full-vocabulary KL at each token along the policy's own samples, summed per reply, the
  evaluator's estimator for every policy, gptjax/evaluate.py kl_to_reference).

Gao et al. fit R_bon(d) = d(α − β d) (their eq. 1) and R_RL(d) = d(α − β log d) (eq. 2) to
the gold gains (they fix R(0) = 0, so the fits have no intercept); the gold curve peaks at
d* = α / 2β (best-of-n) or d* = exp(α/β − 1) (RL) when β > 0, and over-optimisation is a
gold curve that rises, peaks and falls while the proxy keeps rising. Here both are fitted by
least squares per seed, and the report says, per RM and method, whether gold peaked inside
the measured range and fell after it (FALL: the last point at least FALL below the highest,
about two standard errors of a mean over 512 replies).
"""

from __future__ import annotations

import math
import os

import numpy as np

from experiments import plots
from gptjax import eval_stats
from gptjax.metrics import read_jsonl

BEST_OF, SFT = "best-of-", "SFT"
FALL = 0.02
FORMS = {
    # name: (features of d whose least-squares weights are (α, β), peak d* from α, β)
    "bon": (lambda d: np.stack([d, -(d**2)], 1), lambda a, b: a / (2 * b)),
    "rl": (
        lambda d: np.stack([d, -d * np.log(np.maximum(d, 1e-12))], 1),
        lambda a, b: math.exp(min(a / b - 1, 50.0)),
    ),
}


def fit(d, gain, form: str) -> dict:
    """Least-squares (α, β) of gain = d(α − β d) ("bon") or d(α − β log d) ("rl"), no
    intercept; R² about the mean gain; the peak d* (inf when β <= 0: no peak)."""
    d, gain = np.asarray(d, float), np.asarray(gain, float)
    features, peak = FORMS[form]
    (alpha, beta), *_ = np.linalg.lstsq(features(d), gain, rcond=None)
    resid = gain - features(d) @ np.array([alpha, beta])
    total = float(np.sum((gain - gain.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / total if total > 0 else math.nan
    d_star = peak(alpha, beta) if beta > 0 else math.inf
    return {"alpha": float(alpha), "beta": float(beta), "r2": r2, "d_star": float(d_star)}


def peaks_and_falls(points: list[tuple[float, float]], d_star: float) -> bool:
    """Gold peaked inside the measured range and its last point fell at least FALL below
    the highest: the over-optimisation Gao et al. report."""
    ds = [p[0] for p in points]
    golds = [p[1] for p in points]
    return bool(d_star < max(ds) and golds[-1] <= max(golds) - FALL)


def _stat(cell, model, metric):
    res = cell["variants"].get(model, {}).get("sample", {}).get(metric)
    return None if res is None or not res.get("n") else res["mean"]


def bon_points(cell) -> list[tuple[float, float, float]]:
    """(d, gold, proxy) of SFT (n = 1, d = 0) and every best-of-n variant of a cell."""
    out = []
    for name in cell["variants"]:
        if name == SFT or name.startswith(BEST_OF):
            kl = 0.0 if name == SFT else _stat(cell, name, "kl_to_sft")
            gold, proxy = _stat(cell, name, "gold_reward"), _stat(cell, name, "rm_reward")
            if None not in (kl, gold, proxy):
                out.append((math.sqrt(max(kl, 0.0)), gold, proxy))
    return sorted(out)


def rl_points(cell, stage: str) -> list[tuple[float, float, float]]:
    """(d, gold, proxy) along an RL stage's training: SFT at d = 0 (the evaluator's, on
    the same prompts and protocol), then every in-stage evaluation, in step order."""
    sft = (0.0, _stat(cell, SFT, "gold_reward"), _stat(cell, SFT, "rm_reward"))
    rows = cell.get("stage_evals", {}).get(stage, [])
    out = [sft] if None not in sft else []
    for r in sorted(rows, key=lambda r: r["step"]):
        kl = r["eval/sample/kl_to_sft"]
        out.append(
            (math.sqrt(max(kl, 0.0)), r["eval/sample/gold_reward"], r["eval/sample/rm_reward"])
        )
    return out


def stage_evals(directory: str, stages) -> dict[str, list[dict]]:
    """The in-stage evaluation rows (with proxy and KL) of each of a cell's stages."""
    out = {}
    for stage in stages:
        path = os.path.join(directory, stage, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [r for r in read_jsonl(path) if "eval/sample/kl_to_sft" in r]
        if rows:
            out[stage] = rows
    return out


def _curves(cell, spec) -> dict[str, list[tuple[float, float, float]]]:
    out = {"best-of-n": bon_points(cell)}
    out.update({s: rl_points(cell, s) for s in spec.rl_stages})
    return out


def analyse(spec, cells) -> list[dict]:
    """Per variant (an RM), method and seed: the gold and proxy fits and the verdict."""
    rows = []
    for cell in cells:
        for method, points in _curves(cell, spec).items():
            if len(points) < 3:
                continue
            d = np.array([p[0] for p in points])
            gold = np.array([p[1] for p in points]) - points[0][1]
            proxy = np.array([p[2] for p in points]) - points[0][2]
            form = "bon" if method == "best-of-n" else "rl"
            g, p = fit(d, gold, form), fit(d, proxy, form)
            rows.append(
                {
                    "variant": cell["variant"],
                    "seed": cell["seed"],
                    "method": method,
                    "form": form,
                    "points": [[float(x) for x in pt] for pt in points],
                    "gold": g,
                    "proxy": p,
                    "d_max": float(d.max()),
                    "gold_peak": float(gold.max()),
                    "d_at_gold_peak": float(d[int(np.argmax(gold))]),
                    "gold_last": float(gold[-1]),
                    "proxy_last": float(proxy[-1]),
                    "falls": peaks_and_falls(list(zip(d, gold)), g["d_star"]),
                }
            )
    return rows


def _mean_ci(values) -> str:
    mean, lo, hi = eval_stats.t_interval(list(values))
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def report_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## Over-optimisation (Gao et al. 2022)",
        "",
        "Gains over SFT against d = √KL; fits gold = d(α − βd) for best-of-n and "
        "d(α − β log d) for RL, per seed (mean over seeds, 95% t-interval); d* the fitted "
        f"peak; 'falls': d* inside the measured range and the last point ≥ {FALL} below the "
        "highest.",
        "",
        "| RM (variant) | method | seeds | d max | gold α | gold β | gold R² | d* | gold peak "
        "(at d) | gold last | proxy last | proxy α | proxy β | falls |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = sorted({(r["variant"], r["method"]) for r in rows})
    for variant, method in groups:
        rs = [r for r in rows if r["variant"] == variant and r["method"] == method]
        peaks = ", ".join(f"{r['gold_peak']:.3f} ({r['d_at_gold_peak']:.2f})" for r in rs)
        d_stars = ", ".join(f"{r['gold']['d_star']:.2f}" for r in rs)
        lines.append(
            f"| {variant} | {method} | {len(rs)} | {np.mean([r['d_max'] for r in rs]):.2f} | "
            f"{_mean_ci(r['gold']['alpha'] for r in rs)} | "
            f"{_mean_ci(r['gold']['beta'] for r in rs)} | "
            f"{np.mean([r['gold']['r2'] for r in rs]):.2f} | "
            f"{d_stars} | {peaks} | "
            f"{_mean_ci(r['gold_last'] for r in rs)} | {_mean_ci(r['proxy_last'] for r in rs)} | "
            f"{_mean_ci(r['proxy']['alpha'] for r in rs)} | "
            f"{_mean_ci(r['proxy']['beta'] for r in rs)} | "
            f"{sum(r['falls'] for r in rs)}/{len(rs)} |"
        )
    return lines


def plot(path: str, rows: list[dict]) -> None:
    """Gold and proxy gains against d, one panel per method and reward, a colour per RM,
    a line per seed, the gold fits dashed."""
    methods = sorted({r["method"] for r in rows})
    variants = sorted({r["variant"] for r in rows})
    plt = plots._pyplot()
    fig, axes = plt.subplots(
        len(methods), 2, figsize=(9, 3.2 * len(methods)), squeeze=False, sharex="row"
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        for r in (r for r in rows if r["method"] == method):
            colour = colours[variants.index(r["variant"]) % len(colours)]
            pts = np.array(r["points"])
            d = pts[:, 0]
            label = f"{r['variant']} seed {r['seed']}"
            for j, (col, key) in enumerate(((1, "gold"), (2, "proxy"))):
                ax = axes[i, j]
                ax.plot(d, pts[:, col] - pts[0, col], "o-", color=colour, ms=3, lw=1, label=label)
                grid = np.linspace(0, d.max(), 50)
                features, _ = FORMS[r["form"]]
                fitted = features(grid) @ np.array([r[key]["alpha"], r[key]["beta"]])
                ax.plot(grid, fitted, "--", color=colour, lw=0.8)
                ax.set_title(f"{method}: {key} gain over SFT")
                ax.set_xlabel("d = √KL(π ‖ SFT)")
                ax.axhline(0, color="k", lw=0.5)
        axes[i, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
