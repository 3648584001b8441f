"""The BUILD.md table of ahead-of-time compiles: every TPU preset on its target slice
(configs/model.py TARGETS), every stage, with memory per chip, FLOPs and compile time.

    python -m experiments.aot --table --write=BUILD.md            # compiles what is missing
    python -m experiments.aot --table --cached --write=BUILD.md   # only what is cached

    python -m experiments.aot --table --presets=gpt3_175b --stage=ppo --programs=rollout

Each stage's rows are kept in docs/aot/<preset>.<stage>.json (delete one, or name its
programs, to recompile it); each row records the commit it was compiled at, shown in the
table, since a full table takes hours of compiling on a 2-core host.
"""

from __future__ import annotations

import json
import os
import subprocess

from experiments.aot import MFU, PEAK_TFLOPS, STAGES, run_aot
from gptjax import config as config_lib
from gptjax import sharding


def _mesh_text(preset: str, chips: int) -> str:
    from configs import pipeline

    cfg = config_lib.from_dict(sharding.MeshConfig, pipeline.get_config(preset).mesh, "mesh")
    sizes = dict(zip(sharding.MESH_AXES, cfg.shape(chips)))
    return " x ".join(f"{k} {v}" for k, v in sizes.items() if v > 1) or "1"


LEGEND = f"""\
Memory per chip: XLA's `memory_analysis()` (arguments + outputs − donated + temporaries +
code) plus the arrays resident meanwhile that are not the program's arguments (PPO: the
frozen RM and reference params; during the rollout also the value model and optimizer
states); "needed": XLA refused to compile, needing that much. Program TFLOP/step: the
matmuls of the traced step, all chips (remat recomputation included; scanned layers and
microbatches times their length; the decode loop times max_new_tokens). Analytic:
6·N·tokens + 12·L·T·d·tokens for training, 2·N + 4·L·S·d per token for forward passes
over S keys (N: params that multiply activations). Projected s/step = program FLOPs /
(chips x peak bf16 FLOP/s (v5e {PEAK_TFLOPS["v5e"]}, v5p {PEAK_TFLOPS["v5p"]} TFLOP/s) x
{MFU:.0%} MFU): a projection, not a measurement (the rollout's decode loop is
memory-bound and will run slower). Compile s: on 2 CPU cores shared with other jobs.
†: tensor-parallel groups span hosts (8-way on hosts of 4 chips), so each pair of hosts
loads the same rows of the batch (`gptjax/sharding.py` host_blocks).
"""


def _commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True)
    return out.stdout.decode().strip() or "unknown"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table_markdown(rows: list[dict]) -> str:
    lines = [
        "| preset | slice (chips) | mesh | stage | program | GiB / chip | HBM | fits "
        "| program TFLOP/step | analytic | compile s | projected s/step | compiled at |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.get("missing"):
            lines.append(f"| {r['preset']} | | | {r['stage']} | not compiled yet | | | | | | | | |")
            continue
        shared = r.get("hosts_per_block", 1) > 1
        fits = ("yes" if r["fits"] else "**no**") + (" †" if shared else "")
        proj = f"{r['projected_s']:.3g}" if "projected_s" in r else "-"
        total = f"{r['total_gib']:.2f}" + ("" if "error" not in r else " needed")
        lines.append(
            f"| {r['preset']} | {r['topology']} ({r['chips']}) "
            f"| {_mesh_text(r['preset'], r['chips'])} | {r['stage']} | {r['program']} "
            f"| {total} | {r['hbm_gib']} | {fits} | {_num(r['program_tflop'])} "
            f"| {_num(r['analytic_tflop'])} | {r['compile_s']:.0f} | {proj} "
            f"| {r.get('commit', 'unknown')} |"
        )
    return "\n".join(lines) + "\n\n" + LEGEND


BEGIN, END = "<!-- aot:begin -->", "<!-- aot:end -->"


def write_between_markers(path: str, text: str) -> None:
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def table_rows(
    presets, results_dir: str, stages=STAGES, log=print, cached=False, redo=()
) -> list[dict]:
    """Compiles each preset on its target slice (configs/model.py TARGETS), keeping each
    stage's rows in results_dir/<preset>.<stage>.json. cached: only what is there (a stage
    not compiled yet gets a placeholder row); redo: recompile these programs' rows."""
    from configs import model as model_presets
    from configs import pipeline

    rows = []
    os.makedirs(results_dir, exist_ok=True)
    for name in presets:
        for stage in stages:
            path = os.path.join(results_dir, f"{name}.{stage}.json")
            have = []
            if os.path.exists(path):
                with open(path) as f:
                    have = json.load(f)
            if not have and cached:
                rows.append({"preset": name, "stage": stage, "missing": True})
                continue
            if not have or (redo and not cached):
                config = pipeline.get_config(name)
                topology = model_presets.TARGETS[name][0]
                found = run_aot(config, topology, [stage], log, programs=redo if have else ())
                found = [{**r, "commit": _commit()} for r in found]
                new = {r["program"] for r in found}
                have = [r for r in have if r["program"] not in new] + found
                order = ("train_step", "rollout", "score", "update")
                have.sort(key=lambda r: order.index(r["program"]))
                with open(path, "w") as f:
                    json.dump(have, f, indent=1)
            rows += have
    return rows
