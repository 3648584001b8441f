"""Ablation sweeps: variants x seeds through one stage cache, resumable, with a report.

    python -m experiments.sweep --config=configs/sweep.py:kl
    python -m experiments.sweep --config=configs/sweep.py:ptx --workdir=runs/sweep-ptx
    python -m experiments.sweep --config=configs/sweep.py:kl --shared_from=runs/tiny-20261122

Layout of a sweep workdir:
  stages/<stage>/<key>/       the stage cache (experiments/stage_cache.py): each stage run
                              once per distinct key, shared by every cell it serves
  data/                       prepared datasets (named by content hash), shared
  cells/<variant>/seed<k>/    a pipeline workdir linking its stages' cache entries;
                              DONE.json marks a finished cell (never rerun)
  report/                     report.md, results.csv, provenance.json, PNG plots

--shared_from: a finished pipeline workdir whose stages are linked instead of run where
their recorded key matches (e.g. the default run's pretrain..rm for the kl sweep).

Verdicts (one per finding of the preset): the effect a − b is computed per seed (paired:
same seed, same shared stages) and a t-interval (95%) is taken across seeds; the
finding is "supported" when the interval excludes 0 in the predicted direction,
"contradicted" when it excludes 0 in the other, "inconclusive" otherwise (always with
fewer than 2 seeds).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from configs import pipeline as pipeline_configs
from experiments import (
    cli,
    frontier,
    gates,
    overopt,
    plots,
    reason_report,
    report,
    rundir,
    sources,
    stage_cache,
)
from gptjax import host
from gptjax.errors import ConfigError
from gptjax.eval_stats import t_interval

_DEFAULT = os.path.join(os.path.dirname(__file__), "..", "configs", "sweep.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.normpath(_DEFAULT) + ":kl", "Sweep config file:preset.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (default runs/sweep-<preset>).")
_SHARED_FROM = flags.DEFINE_string(
    "shared_from", None, "A finished pipeline workdir whose stages the cells reuse by key."
)


def set_dotted(config, key: str, value) -> None:
    """config.a.b = value, naming the key if it does not exist."""
    *path, leaf = key.split(".")
    node = config
    for part in path:
        if part not in node:
            raise ConfigError(key, f"no section {part!r} in the pipeline config")
        node = node[part]
    if leaf not in node:
        raise ConfigError(key, f"no field {leaf!r} in config.{'.'.join(path)}")
    old = node[leaf]
    # ConfigDict fields are typed: 1 for a float field becomes 1.0, as on the command line.
    node[leaf] = type(old)(value) if isinstance(old, (int, float, str, bool)) else value


def cell_config(sweep, variant: list | None, seed: int, stage: str = "eval"):
    """The config `stage` runs with in a cell: the preset, the sweep's and the variant's
    overrides, and the cell's seed if the stage is seeded (else the preset's seeds)."""
    config = pipeline_configs.get_config(sweep.pipeline)
    for key, value in [*sweep.overrides, *(variant or [])]:
        set_dotted(config, key, value)
    if sweep.seed_all or stage in sweep.seeded:
        config.seeds.init = config.seeds.data = config.seeds.sampling = seed
    if "eval" in sweep.stages:
        config.eval.variants = ",".join(sweep.eval_variants)
    return config


def cell_dir(workdir: str, variant: str, seed: int) -> str:
    return os.path.join(workdir, "cells", variant, f"seed{seed}")


def run_cell(sweep, workdir: str, variant: str, seed: int, shared_from=None) -> dict:
    """Runs one (variant, seed) cell unless its DONE.json exists; returns its results."""
    directory = cell_dir(workdir, variant, seed)
    done = os.path.join(directory, "DONE.json")
    if os.path.exists(done):
        print(f"== cell {variant}/seed{seed}: finished earlier, skipped")
        with open(done) as f:
            return json.load(f)
    print(f"== cell {variant}/seed{seed}")
    overrides = sweep.variants[variant]
    summaries = stage_cache.run_cached(
        lambda stage: cell_config(sweep, overrides, seed, stage),
        directory,
        list(sweep.stages),
        os.path.join(workdir, "stages"),
        data_dir=os.path.join(workdir, "data"),
        shared_from=shared_from,
    )
    results = dict(summaries["eval"]["variants"]) if "eval" in summaries else {}
    if "reason" in summaries:  # "SFT (cot)", "GRPO (gold reward) (tools)", ...
        results.update(reason_report.flat_variants(summaries["reason"]))
    out = {
        "variant": variant,
        "seed": seed,
        "variants": results,
        # The cell's gate rows (each stage records its own when it runs in this cell).
        "gates": gates.load(directory),
        # RL stages' evaluations during training (gold, proxy, KL): overopt's RL curves.
        "stage_evals": overopt.stage_evals(directory, sweep.stages),
    }
    with open(done + ".tmp", "w") as f:
        json.dump(out, f, default=float)
    os.replace(done + ".tmp", done)  # atomic: a half-written marker never exists
    return out


def verdict(effects, sign: int) -> dict:
    """The verdict rule on per-seed effects (a − b) for a predicted sign (+1 / −1)."""
    mean, lo, hi = t_interval(effects)
    if math.isnan(lo):
        word = "inconclusive"
    elif (sign > 0 and lo > 0) or (sign < 0 and hi < 0):
        word = "supported"
    elif (sign > 0 and hi < 0) or (sign < 0 and lo > 0):
        word = "contradicted"
    else:
        word = "inconclusive"
    return {"verdict": word, "effect": mean, "lo": lo, "hi": hi, "seeds": len(effects)}


def metric_value(cell: dict, model: str, protocol: str, metric: str) -> float | None:
    res = cell["variants"].get(model)
    if res is None:
        return None
    stat = res.get(protocol, {}).get(metric)
    return None if stat is None or not stat.get("n") else stat["mean"]


def _model_name(cell: dict, model: str) -> str:
    if model.startswith("best-of-"):  # the preset names best-of-N by its variant's n
        names = [n for n in cell["variants"] if n.startswith("best-of-")]
        return names[0] if names else model
    return model


def judge(findings, cells: list[dict]) -> list[dict]:
    """Each finding's verdict from the cells (paired by seed)."""
    by = {(c["variant"], c["seed"]): c for c in cells}
    seeds = sorted({c["seed"] for c in cells})
    out = []
    for f in findings:
        (va, ma), (vb, mb) = f["a"], f["b"]
        effects = []
        for s in seeds:
            ca, cb = by.get((va, s)), by.get((vb, s))
            if ca is None or cb is None:
                continue
            a = metric_value(ca, _model_name(ca, ma), f["protocol"], f["metric"])
            b = metric_value(cb, _model_name(cb, mb), f["protocol"], f["metric"])
            if a is not None and b is not None:
                effects.append(a - b)
        out.append({**f, **verdict(effects, f["sign"])})
    return out


def aggregate(cells: list[dict]) -> dict:
    """{(variant, model, protocol, metric): (mean, lo, hi, n)} across seeds."""
    values: dict[tuple, list[float]] = {}
    for c in cells:
        for model, res in c["variants"].items():
            for protocol in ("greedy", "sample", "model"):
                for metric, stat in res.get(protocol, {}).items():
                    if stat.get("n"):
                        key = (c["variant"], model, protocol, metric)
                        values.setdefault(key, []).append(stat["mean"])
    return {k: (*t_interval(v), len(v)) for k, v in values.items()}


def write_report(directory: str, sweep_name: str, sweep, cells, prov: dict) -> dict:
    """report.md (verdicts, per-variant table, plots), results.csv (a row per cell,
    model, protocol, metric, with provenance), provenance.json, PNG plots."""
    os.makedirs(directory, exist_ok=True)
    rows = []
    for c in cells:
        named = {f"{c['variant']}/{m}": r for m, r in c["variants"].items()}
        rows += report.result_rows(named, prov, seed=c["seed"])
    report.write_csv(os.path.join(directory, "results.csv"), rows)
    with open(os.path.join(directory, "provenance.json"), "w") as f:
        json.dump(prov, f, indent=2, sort_keys=True)
    verdicts = judge([dict(f) for f in sweep.findings], cells)
    agg = aggregate(cells)
    figures = sweep_plots(directory, agg, sweep.get("curves_across_variants", True))
    lines = [f"# Sweep `{sweep_name}`", "", "## Provenance", "", *report.provenance_md(prov)]
    lines += [f"- cells: {len(cells)} ({len(sweep.variants)} variants x seeds {list(sweep.seeds)})"]
    lines += ["", "## Findings", "", "Rule: " + RULE, ""]
    lines += [
        "| finding | effect (a − b) | 95% CI over seeds | seeds | verdict |",
        "|---|---|---|---|---|",
    ]
    for v in verdicts:
        what = f"{v['metric']} ({v['protocol']}): {'/'.join(v['a'])} − {'/'.join(v['b'])}"
        lines.append(
            f"| {v['name']}: {what}, predicted {'>' if v['sign'] > 0 else '<'} 0 | "
            f"{v['effect']:.3f} | [{v['lo']:.3f}, {v['hi']:.3f}] | {v['seeds']} | "
            f"**{v['verdict']}** |"
        )
    for protocol, metrics in sweep.get("per_variant", PER_VARIANT).items():
        lines += ["", f"## Per variant, {protocol} (mean over seeds, 95% t-interval)", ""]
        lines += [
            "| variant / model | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 1) + "|",
        ]
        for variant, model in sorted({(k[0], k[1]) for k in agg if k[2] == protocol}):
            stats = [agg.get((variant, model, protocol, m)) for m in metrics]
            row = ["—" if stat is None else _fmt(stat) for stat in stats]
            lines.append(f"| {variant} / {model} | " + " | ".join(row) + " |")
    gate_rows = gate_stats(cells)
    if gate_rows:
        lines += ["", *gate_lines(gate_rows)]
    analysis = None
    if sweep.get("frontier"):
        figures["frontier"] = os.path.join(directory, "frontier.png")
        frontier.plot(
            figures["frontier"], cells, sweep.frontier, sweep.get("curves_across_variants", True)
        )
        analysis = frontier.analyse(sweep.frontier, sweep, cells)
        lines += ["", *frontier.report_lines(analysis, sweep.frontier)]
    overopt_rows = None
    if sweep.get("overopt"):
        overopt_rows = overopt.analyse(sweep.overopt, cells)
        figures["overopt"] = os.path.join(directory, "overopt.png")
        overopt.plot(figures["overopt"], overopt_rows)
        with open(os.path.join(directory, "overopt.json"), "w") as f:
            json.dump(overopt_rows, f, indent=1)
        lines += ["", *overopt.report_lines(overopt_rows)]
    lines += [""] + [f"![{name}]({os.path.basename(p)})" for name, p in figures.items()]
    path = os.path.join(directory, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {
        "report": path,
        "verdicts": verdicts,
        "plots": figures,
        "frontier": analysis,
        "overopt": overopt_rows,
    }


# The report's per-variant tables: per protocol, the metrics shown.
PER_VARIANT = {
    "sample": ("gold_reward", "rm_reward", "kl_to_sft", "accuracy", "entropy", "distinct_2"),
    "greedy": (
        "gold_reward",
        "accuracy",
        "accuracy_known_not_in_demos",
        "idk_known",
        "abstention_unknown",
    ),
}


def gate_stats(cells: list[dict]) -> list[dict]:
    """Each gate of each variant over that variant's cells (its seeds): its floor, mean and
    95% t-interval, min, max, sample sd, passes; fragile when its worst value lies within
    2 sd of the floor (or beyond it): a gate a new seed or machine may fail. Per variant,
    since a variant that changes the world or a stage is not the default run."""
    values: dict[tuple, list] = {}
    for c in cells:
        for name, row in c.get("gates", {}).items():
            if row.get("value") is not None:
                values.setdefault((c["variant"], name), []).append(row)
    out = []
    for (variant, name), rows in values.items():
        x = np.array([r["value"] for r in rows], float)
        mean, lo, hi = t_interval(list(x))
        sd = float(x.std(ddof=1)) if len(x) > 1 else float("nan")
        op, floor = rows[0]["op"], rows[0]["threshold"]
        worst = float(x.min() if op.startswith(">") else x.max())
        margin = worst - floor if op.startswith(">") else floor - worst
        out.append(
            dict(
                name=name,
                variant=variant,
                description=rows[0]["description"],
                op=op,
                floor=floor,
                mean=mean,
                lo=lo,
                hi=hi,
                min=float(x.min()),
                max=float(x.max()),
                sd=sd,
                passed=sum(bool(r["passed"]) for r in rows),
                demoted=rows[-1].get("demoted", ""),
                n=len(rows),
                fragile=bool(margin < 2 * sd) if len(x) > 1 else True,
            )
        )
    return out


def gate_lines(rows: list[dict]) -> list[str]:
    lines = [
        "## Gates over seeds",
        "",
        "Each variant's gates: the floor, the mean over its seeds with a 95% t-interval, the "
        "range and the sample sd; **fragile** when the worst seed lies within 2 sd of the "
        "floor (or past it).",
        "",
        "| variant | gate | floor | mean [95% CI] | min | max | sd | passed | fragile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = " (a reported metric, not gated)" if r["demoted"] else ""
        lines.append(
            f"| {r['variant']} | {r['description']}{kind} | {r['op']} {r['floor']:g} | "
            f"{r['mean']:.3f} "
            f"[{r['lo']:.3f}, {r['hi']:.3f}] | {r['min']:.3f} | {r['max']:.3f} | "
            f"{r['sd']:.3f} | {r['passed']}/{r['n']} | {'**yes**' if r['fragile'] else 'no'} |"
        )
    return lines


RULE = (
    '"supported" when the 95% interval across seeds of the effect excludes 0 in the '
    'predicted direction, "contradicted" when it excludes 0 in the other, '
    '"inconclusive" otherwise.'
)


def _fmt(stat) -> str:
    mean, lo, hi, _ = stat
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.2f}, {hi:.2f}]"


def sweep_plots(directory: str, agg: dict, sweep_curves_across: bool = True) -> dict[str, str]:
    """Gold and RM reward against sqrt(KL); entropy and diversity; alignment tax.
    sweep_curves_across: a method's points in different variants form one curve."""
    out = {}
    points = []
    for (variant, model, protocol, metric), (mean, *_) in agg.items():
        if protocol != "sample" or metric != "kl_to_sft" or model == "SFT":
            continue
        gold = agg.get((variant, model, "sample", "gold_reward"))
        rm = agg.get((variant, model, "sample", "rm_reward"))
        if gold is None:
            continue
        err = lambda s: 0.0 if s is None or math.isnan(s[1]) else (s[2] - s[1]) / 2  # noqa: E731
        points.append(
            {
                "label": f"{variant}/{model}",
                # One curve per method across the variants when they are a knob of it
                # (β, n, data size), else one per variant.
                "family": (
                    plots.family_of(model)
                    if sweep_curves_across
                    else f"{variant}/{plots.family_of(model)}"
                ),
                "kl": mean,
                "gold": gold[0],
                "gold_err": err(gold),
                "rm": rm[0] if rm else float("nan"),
                "rm_err": err(rm),
            }
        )
    if points:
        out["reward vs KL"] = os.path.join(directory, "reward_vs_kl.png")
        plots.plot_reward_vs_kl(out["reward vs KL"], points, "gold and RM reward vs KL to SFT")
    for name, protocol, metrics in (
        ("diversity", "sample", ("entropy", "distinct_2", "unique_rate")),
        ("alignment tax", "model", ("heldout_lm_loss",)),
    ):
        if any(k[2] == protocol and k[3] in metrics for k in agg):
            out[name] = os.path.join(directory, name.replace(" ", "_") + ".png")
            plots.plot_metric_bars(out[name], agg, protocol, metrics, name)
    return out


# Stages whose outputs do not depend on the cell's seed: the evaluator samples with its
# fixed protocol seed (eval.seed: every model on the same draws), the report reads files.
UNSEEDED = ("eval", "report")


def check_findings(sweep) -> None:
    """Every finding compares variants the sweep has (a typo would only show, after
    hours of cells, as an effect of nan), and the seeds change something: seeding only
    the evaluator gives identical cells and zero-width intervals."""
    if len(sweep.seeds) > 1 and not sweep.seed_all:
        if not set(sweep.seeded) - set(UNSEEDED):
            raise ConfigError(
                "sweep.seeded",
                f"{list(sweep.seeded)}: the evaluator samples with its fixed eval.seed, so "
                "these seeds would give identical cells; seed a stage that trains or samples "
                "(e.g. rm, ppo) or set seed_all",
            )
    for f in sweep.findings:
        for side in ("a", "b"):
            variant = f[side][0]
            if variant not in sweep.variants:
                raise ConfigError(
                    "sweep.findings",
                    f"{f['name']!r} compares variant {variant!r}; the sweep's variants are "
                    f"{sorted(sweep.variants)}",
                )


def run_sweep(sweep, sweep_name: str, workdir: str, shared_from: str | None = None) -> dict:
    check_findings(sweep)
    report.git_commit()  # the commit of the code this process loaded, before HEAD can move
    cells = [
        run_cell(sweep, workdir, variant, seed, shared_from)
        for variant in sweep.variants
        for seed in sweep.seeds
    ]
    config = cell_config(sweep, None, 0)
    first = cell_dir(workdir, next(iter(sweep.variants)), sweep.seeds[0])
    tokenizer = sources.get_tokenizer(config, first)
    world_hash = sources.world_config(config).content_hash()
    prov = report.provenance(config, world_hash, tokenizer.hash)
    prov["sweep"] = {"name": sweep_name, **sweep.to_dict()}
    out = write_report(os.path.join(workdir, "report"), sweep_name, sweep, cells, prov)
    print(f"\n== sweep {sweep_name}: {len(cells)} cells; report: {out['report']}")
    for v in out["verdicts"]:
        interval = f"[{v['lo']:.3f}, {v['hi']:.3f}]"
        print(f"  [{v['verdict']}] {v['name']}: effect {v['effect']:.3f} {interval}")
    return out


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    sweep = _CONFIG.value
    name = sweep.name
    workdir = _WORKDIR.value or os.path.join("runs", f"sweep-{name}")
    try:
        host.use_compilation_cache(rundir.multihost(cell_config(sweep, None, 0)))
        run_sweep(sweep, name, workdir, _SHARED_FROM.value)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    cli.run(main)
