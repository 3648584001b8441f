"""The PNG plots of a run's and a sweep's report (matplotlib, files only)."""

from __future__ import annotations

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on a TPU VM or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_bars(path: str, variants: dict, metric: str, title: str) -> None:
    """One bar per variant and protocol, with the bootstrap interval."""
    plt = _pyplot()
    names = list(variants)
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.2))
    width = 0.38
    for k, protocol in enumerate(("greedy", "sample")):
        stats = [variants[n][protocol][metric] for n in names]
        mean = np.array([s["mean"] for s in stats])
        err = np.array([[s["mean"] - s["lo"] for s in stats], [s["hi"] - s["mean"] for s in stats]])
        x = np.arange(len(names)) + (k - 0.5) * width
        ax.bar(x, mean, width, yerr=np.nan_to_num(err), capsize=3, label=protocol)
    ax.set_xticks(np.arange(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_bars(path: str, agg: dict, protocol: str, metrics, title: str) -> None:
    """Sweep bars: one group per variant/model, one bar per metric, t-interval over seeds.
    agg: {(variant, model, protocol, metric): (mean, lo, hi, n)}."""
    plt = _pyplot()
    groups = sorted({(k[0], k[1]) for k in agg if k[2] == protocol and k[3] in metrics})
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        stats = [agg.get((v, m, protocol, metric), (np.nan,) * 4) for v, m in groups]
        mean = np.array([s[0] for s in stats])
        err = np.nan_to_num(np.array([[s[0] - s[1] for s in stats], [s[2] - s[0] for s in stats]]))
        ax.bar(np.arange(len(groups)), mean, yerr=err, capsize=3)
        ax.set_xticks(
            np.arange(len(groups)),
            [f"{v}/{m}" for v, m in groups],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_title(metric)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reward_vs_kl(path: str, points: list[dict], title: str) -> None:
    """Gold and proxy (RM) reward against sqrt(KL to SFT), as Gao et al. 2022 (fig. 1)
    draw over-optimisation: two panels, one colour per model, 95% intervals; models are
    never joined by lines, except the members of one family, which form a curve: one
    method over a sweep's variants (the point's "family", e.g. PPO over β), best-of-n
    over n, SFT over temperature. points: {"label", "kl", "gold", "gold_err", "rm",
    "rm_err", optional "family"}; a point with no KL is left out."""
    plt = _pyplot()
    pts = [p for p in points if np.isfinite(p["kl"])]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups: dict[str, list[dict]] = {}
    for p in pts:
        groups.setdefault(p.get("family") or family_of(p["label"]), []).append(p)
    for ax, key, name in ((axes[0], "gold", "gold reward"), (axes[1], "rm", "proxy (RM) reward")):
        for c, (label, members) in enumerate(groups.items()):
            members = sorted(members, key=lambda p: p["kl"])
            x = np.sqrt(np.maximum([p["kl"] for p in members], 0.0))
            y = [p[key] for p in members]
            err = [p.get(key + "_err", 0.0) for p in members]
            fmt = "s--" if len(members) > 1 else "o"
            ax.errorbar(x, y, yerr=err, fmt=fmt, ms=5, capsize=2, label=label,
                        color=colours[c % len(colours)])  # fmt: skip
        ax.set_xlabel("sqrt(KL to SFT) (nats^0.5 per reply, T=1 samples)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


REFERENCE_FAMILIES = {"best-of-": "best-of-n", "SFT T=": "SFT at T < 1"}


def family_of(model: str) -> str:
    """The curve a model's point belongs to: best-of-n over n, SFT over temperature, or
    the model itself."""
    return next((f for p, f in REFERENCE_FAMILIES.items() if model.startswith(p)), model)


# Training curves: the metrics a researcher reads first, per kind of stage (those present).
CURVES = (
    ("loss", "loss"),
    ("eval/loss", "held-out loss"),
    ("accuracy", "accuracy"),
    ("eval/accuracy", "held-out accuracy"),
    ("score", "RM score"),
    ("reward", "reward (score - KL penalty)"),
    ("kl", "KL to reference (nats/reply)"),
    ("kl_coef", "β"),
    ("entropy", "entropy (nats/token)"),
    ("clipfrac", "clip fraction"),
    ("value_loss", "value loss"),
    ("eval/sample/gold_reward", "gold reward (T=1, eval)"),
    ("margin", "margin"),
)


def plot_training_curves(path: str, rows: list[dict], title: str) -> bool:
    """One panel per CURVES metric the stage logged, against its step. False (no file)
    when it logged none of them."""
    panels = [(k, name) for k, name in CURVES if any(k in r for r in rows)]
    if not panels:
        return False
    plt = _pyplot()
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.3 * nrows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels):
        xy = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        ax.plot(*zip(*xy), ".-" if len(xy) < 40 else "-", lw=1, ms=3)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def kl_points(variants: dict) -> list[dict]:
    """Reward-vs-KL points of the variants that have a KL to SFT (sample protocol); the
    base model is not a policy derived from SFT (its KL would be off scale)."""
    points = []
    for name, res in variants.items():
        s = res.get("sample", {})
        if name.startswith("base") or not s.get("kl_to_sft", {}).get("n"):
            continue
        gold, rm = s["gold_reward"], s["rm_reward"]
        points.append(
            {
                "label": name,
                "kl": s["kl_to_sft"]["mean"],
                "gold": gold["mean"],
                "gold_err": (gold["hi"] - gold["lo"]) / 2,
                "rm": rm["mean"] if rm["n"] else float("nan"),
                "rm_err": (rm["hi"] - rm["lo"]) / 2 if rm["n"] else 0.0,
            }
        )
    return points


def plot_frontier(path: str, series: list[dict], title: str) -> None:
    """Gold reward against KL to SFT, one colour per method. series: {"label", "kind"
    (method | reference | gold | sft), "points": [(kl, gold, kl_err, gold_err)]}: methods
    solid with markers, references dashed, gold-trained methods open markers."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    styles = {
        "method": dict(fmt="o-", ms=5),
        "reference": dict(fmt="s--", ms=4, alpha=0.8),
        "gold": dict(fmt="D", ms=6, mfc="none"),
        "sft": dict(fmt="*", ms=11, color="k"),
    }
    for s in series:
        kl, gold, kl_err, gold_err = (np.array(x) for x in zip(*s["points"]))
        ax.errorbar(
            kl, gold, xerr=kl_err, yerr=gold_err, capsize=2, lw=1.2, label=s["label"],
            **styles[s["kind"]],
        )  # fmt: skip
    ax.set_xlabel("KL to SFT (nats per reply, temperature-1 samples)")
    ax.set_ylabel("gold reward (temperature 1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
