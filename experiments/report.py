"""Reports of a run and of a sweep: report.md, results.csv and PNG plots, with provenance.

Every results row and every report starts from `provenance()`: the git commit (and
whether the tree was dirty), package versions, world and tokenizer hashes and the
resolved config, so a number can always be traced to what produced it.
"""

from __future__ import annotations

import csv
import functools
import importlib.metadata
import json
import os
import platform
import subprocess

from experiments import plots

PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "sentencepiece",
    "ml_collections",
    "numpy",
)
CSV_FIELDS = (
    "variant",
    "protocol",
    "metric",
    "mean",
    "lo",
    "hi",
    "n",
    "seed",
    "commit",
    "world_hash",
    "tokenizer_hash",
)


@functools.cache
def git_commit() -> str:
    """HEAD of the repo this code runs from, "+dirty" if it has uncommitted changes: read
    once per process (the entry points read it first, so a report written after a long run
    names the code that ran, not a HEAD that moved meanwhile)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# x86 instruction sets XLA:CPU generates code for, newest first: results on CPUs of
# different sets are not bitwise equal (BUILD.md, "What is reproducible").
_ISAS = ("avx512f", "avx2", "avx", "sse4_2")


def machine() -> dict:
    """The CPU and the XLA settings a run's numbers depend on (read without touching JAX's
    backends: the report stage runs without devices)."""
    flags = set()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = set(value.split())
                elif key.strip() == "model name":
                    model = value.strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "isa": next((isa for isa in _ISAS if isa in flags), platform.machine()),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
        # Malloc's settings: they change speed, not values (gptjax/host.py, BUILD.md).
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
    }


def provenance(config, world_hash: str, tokenizer_hash: str) -> dict:
    return {
        "commit": git_commit(),
        "machine": machine(),
        "packages": package_versions(),
        "world_hash": world_hash,
        "tokenizer_hash": tokenizer_hash,
        "seeds": config.seeds.to_dict(),
        "config": json.loads(json.dumps(config.to_dict(), default=str)),
    }


def provenance_md(prov: dict) -> list[str]:
    packages = ", ".join(f"{k} {v}" for k, v in prov["packages"].items())
    return [
        f"- commit: `{prov['commit']}`",
        f"- world hash: `{prov['world_hash']}`; tokenizer hash: `{prov['tokenizer_hash'][:16]}`",
        f"- seeds: {prov['seeds']}",
        f"- packages: {packages}",
        *(
            [
                f"- machine: {m['cpu']}, {m['cpus']} CPUs, ISA {m['isa']}, "
                f"XLA_FLAGS={m['XLA_FLAGS'] or '(none)'}, "
                f"GLIBC_TUNABLES={m.get('GLIBC_TUNABLES') or '(none)'}"
            ]
            if (m := prov.get("machine"))
            else []
        ),
        "- resolved config: `provenance.json`",
    ]


def result_rows(variants: dict, prov: dict, seed: int | None = None) -> list[dict]:
    """One CSV row per (variant, protocol or "model", metric)."""
    rows = []
    for name, res in variants.items():
        for protocol in ("greedy", "sample", "model"):
            for metric, s in res.get(protocol, {}).items():
                rows.append(
                    {
                        "variant": name,
                        "protocol": protocol,
                        "metric": metric,
                        "mean": s["mean"],
                        "lo": s["lo"],
                        "hi": s["hi"],
                        "n": s["n"],
                        "seed": prov["seeds"]["init"] if seed is None else seed,
                        "commit": prov["commit"],
                        "world_hash": prov["world_hash"],
                        "tokenizer_hash": prov["tokenizer_hash"],
                    }
                )
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("mean", "lo", "hi"):
            r[k] = float(r[k])
        r["n"] = int(r["n"])
    return rows


def write_run_report(
    directory: str,
    eval_text: str,
    variants: dict,
    gates: list[dict],
    stage_times: dict[str, float],
    prov: dict,
    workdir: str | None = None,
    compile_times: dict[str, dict] | None = None,
) -> dict[str, str]:
    """report.md, results.csv, provenance.json and plots for one pipeline run (with the
    workdir: each trained stage's training curves too)."""
    os.makedirs(directory, exist_ok=True)
    paths = {
        "report": os.path.join(directory, "report.md"),
        "csv": os.path.join(directory, "results.csv"),
        "provenance": os.path.join(directory, "provenance.json"),
        "gold_plot": os.path.join(directory, "gold_reward.png"),
        "kl_plot": os.path.join(directory, "reward_vs_kl.png"),
    }
    with open(paths["provenance"], "w") as f:
        json.dump(prov, f, indent=2, sort_keys=True)
    write_csv(paths["csv"], result_rows(variants, prov))
    plots.plot_bars(paths["gold_plot"], variants, "gold_reward", "gold reward per model (95% CI)")
    points = plots.kl_points(variants)
    if points:
        plots.plot_reward_vs_kl(paths["kl_plot"], points, "reward vs KL to SFT")
    else:
        del paths["kl_plot"]
    lines = ["# gptjax run report", "", "## Provenance", "", *provenance_md(prov), ""]
    lines += ["## Gates", "", gates_md(gates), ""]
    if stage_times:
        compiling = compile_times or {}
        lines += [
            "## Wall time per stage",
            "",
            "Of it, compiling: tracing, lowering and XLA compiles (or persistent-cache loads).",
            "",
            "| stage | seconds | compiling, s | programs |",
            "|---|---|---|---|",
        ]
        for k, v in stage_times.items():
            c = compiling.get(k)
            cols = f"{c['total_s']:.0f} | {c['programs']}" if c else "— | —"
            lines.append(f"| {k} | {v:.0f} | {cols} |")
        total_c = sum(c["total_s"] for c in compiling.values())
        lines += [f"| total | {sum(stage_times.values()):.0f} | {total_c:.0f} | |", ""]
    lines += ["## Evaluation", "", eval_text, ""]
    lines += [f"![gold reward]({os.path.basename(paths['gold_plot'])})", ""]
    if "kl_plot" in paths:
        lines += [f"![reward vs KL]({os.path.basename(paths['kl_plot'])})", ""]
    curves = training_curves(workdir, directory) if workdir else {}
    if curves:
        lines += ["## Training curves", ""]
        lines += [f"![{stage}]({os.path.basename(p)})" for stage, p in curves.items()] + [""]
        paths.update({f"curves_{stage}": p for stage, p in curves.items()})
    with open(paths["report"], "w") as f:
        f.write("\n".join(lines))
    return paths


def training_curves(workdir: str, directory: str) -> dict[str, str]:
    """{stage: PNG} of every stage in the workdir that logged metrics (its metrics.jsonl,
    or the RM's train/metrics.jsonl), in the workdir's stage order."""
    out = {}
    for stage in sorted(os.listdir(workdir)):
        for rel in ("metrics.jsonl", os.path.join("train", "metrics.jsonl")):
            path = os.path.join(workdir, stage, rel)
            if os.path.isfile(path):
                with open(path) as f:
                    rows = [json.loads(line) for line in f if line.strip()]
                png = os.path.join(directory, f"curves_{stage}.png")
                if plots.plot_training_curves(png, rows, f"{stage}: training curves"):
                    out[stage] = png
                break
    return out


def gate_status(row: dict) -> str:
    """PASS / FAIL / not measured; a demoted gate (a reported metric) says so instead."""
    status = {True: "PASS", False: "FAIL", None: "not measured"}[row["passed"]]
    if row.get("demoted"):
        where = {True: "above floor", False: "below floor", None: "not measured"}[row["passed"]]
        return f"reported, not gated ({where})"
    return status


def gate_failed(row: dict) -> bool:
    return row["passed"] is False and not row.get("demoted")


def gate_line(row: dict) -> str:
    value = "—" if row["value"] is None else f"{row['value']:.3f}"
    kind = "metric" if row.get("demoted") else "gate"
    return (
        f"  [{kind} {gate_status(row)}] {row['description']}: {value} "
        f"({row['op']} {row['threshold']})"
    )


def record_stage_time(workdir: str, stage: str, seconds: float, compiling: dict | None = None):
    """<workdir>/stage_times.json: the wall time of each stage's latest run; and
    <workdir>/compile_times.json: of that, the seconds spent tracing, lowering and
    compiling (experiments/compile_clock.py)."""
    for name, value in (("stage_times.json", seconds), ("compile_times.json", compiling)):
        if value is None:
            continue
        path = os.path.join(workdir, name)
        times = {}
        if os.path.exists(path):
            with open(path) as f:
                times = json.load(f)
        times[stage] = value
        with open(path, "w") as f:
            json.dump(times, f, indent=2)


def run(ctx) -> dict:
    """The report stage: the eval stage's results, the gates and stage times of the
    workdir, with provenance, as report.md / results.csv / plots in <workdir>/report/."""
    from experiments import gates, sources
    from gptjax import eval_stats
    from gptjax.world import evaluation as world_eval

    config, workdir = ctx.config, ctx.workdir
    path = os.path.join(ctx.input_dir("eval"), "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no eval results at {path}: run --stages=eval first")
    with open(path) as f:
        results = json.load(f)
    times, compile_times = ({}, {})
    for name, out in (("stage_times.json", times), ("compile_times.json", compile_times)):
        if os.path.exists(os.path.join(workdir, name)):
            with open(os.path.join(workdir, name)) as f:
                out.update(json.load(f))
    rows = list(gates.load(workdir).values())
    tokenizer = sources.get_tokenizer(config, workdir)
    world_hash = (
        sources.world_config(config).content_hash() if config.data.pretrain == sources.WORLD else ""
    )
    prov = provenance(config, world_hash, tokenizer.hash)
    text = eval_stats.format_results(results, world_eval.TABLE_METRICS, world_eval.MODEL_METRICS)
    paths = write_run_report(
        os.path.join(workdir, "report"),
        text,
        results["variants"],
        rows,
        times,
        prov,
        workdir,
        compile_times,
    )
    failed = [r for r in rows if gate_failed(r)]
    gated = [r for r in rows if not r.get("demoted")]
    lines = [text, "", "gates:"] + [gate_line(r) for r in rows]
    lines += [
        "",
        f"{len(gated) - len(failed)}/{len(gated)} gates passed"
        + (f"; FAILED: {', '.join(r['name'] for r in failed)}" if failed else ""),
        f"report: {paths['report']}",
    ]
    return {"stage": "report", "text": "\n".join(lines), "paths": paths}


def gates_md(gates: list[dict]) -> str:
    lines = ["| gate | value | threshold | result |", "|---|---|---|---|"]
    for g in gates:
        value = "—" if g["value"] is None else f"{g['value']:.3f}"
        result = gate_status(g)
        lines.append(f"| {g['description']} | {value} | {g['op']} {g['threshold']} | {result} |")
    reasons = sorted({g["demoted"] for g in gates if g.get("demoted")})
    if reasons:
        lines += ["", "Reported, not gated: " + "; ".join(reasons) + "."]
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def update_readme(workdir: str, readme: str = "README.md", assets: str = "docs") -> str:
    """Rewrites README's Results section (between the markers) from a finished run's
    report: the command that produced it, the gates, the stage times, the table and the
    main plot (copied to docs/). Returns the new section."""
    import shutil

    rdir = os.path.join(workdir, "report")
    with open(os.path.join(rdir, "report.md")) as f:
        text = f.read()
    sections = {}
    for part in text.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        sections[title.strip()] = body.strip()
    os.makedirs(assets, exist_ok=True)
    plot = os.path.join(assets, "results_gold_reward.png")
    shutil.copy(os.path.join(rdir, "gold_reward.png"), plot)
    evaluation = sections["Evaluation"].split("\n![")[0].strip()
    body = [
        README_BEGIN,
        "",
        "Generated from the default run (`python -m experiments.main`, tiny, 2 CPU cores) by",
        f"`python -m experiments.report --workdir={workdir}`; provenance in",
        "`<workdir>/report/provenance.json`.",
        "",
        "Gates:",
        "",
        sections["Gates"],
        "",
        "Wall time per stage:",
        "",
        sections.get("Wall time per stage", "(not recorded)"),
        "",
        evaluation,
        "",
        f"![gold reward per model]({plot})",
        "",
        README_END,
    ]
    with open(readme) as f:
        old = f.read()
    if README_BEGIN not in old or README_END not in old:
        raise ValueError(f"{readme} has no {README_BEGIN} ... {README_END} markers")
    head, _, rest = old.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    new = head + "\n".join(body) + tail
    with open(readme, "w") as f:
        f.write(new)
    return "\n".join(body)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="README's Results section from a run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args()
    update_readme(args.workdir, args.readme)
    print(f"updated {args.readme} from {args.workdir}/report")
