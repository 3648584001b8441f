"""World calibration: pretrain (or reuse the workdir's base model) and check the gates.

    python -m experiments.main --stages=calibrate        # writes <workdir>/calibration/

Gates and report format: gptjax/world/calibration.py. Gates of stages that have not run
in this workdir are reported as not measured.
"""

from __future__ import annotations

import os

from experiments import common, pretrain
from gptjax.world import calibration

STAGE = "calibrate"


def run(config, workdir: str) -> dict:
    if config.data.pretrain != common.WORLD:
        raise common.ConfigError(
            "data.pretrain",
            "calibration measures the built-in world; set --config.data.pretrain=world",
        )
    base_summary = pretrain.run(config, workdir)
    tokenizer = common.get_tokenizer(config, workdir)
    model, params = common.load_stage_params(config, workdir, "pretrain", tokenizer)
    probes = common.world_data(config, workdir)["fact_probes"]
    probes = [probes[i] for i in range(len(probes))]
    completions = common.greedy_completions(
        model, params, tokenizer, [p["prefix"] for p in probes], 4
    )
    facts = calibration.fact_completion(probes, completions)
    values = {"base_fact_completion": facts["accuracy"]}
    rows = [calibration.check(g, values.get(g.name)) for g in calibration.GATES]
    details = {
        "world_hash": common.world_config(config).content_hash(),
        "tokenizer_hash": tokenizer.hash,
        "base_fact_completion": facts,
        "base_heldout_loss": base_summary["heldout_loss"],
        "examples": [
            {"prefix": p["prefix"], "answer": p["answer"], "completion": c}
            for p, c in list(zip(probes, completions))[:8]
        ],
    }
    md, _ = calibration.write_report(os.path.join(workdir, "calibration"), rows, details)
    lines = [f"calibration report: {md}"]
    for r in rows:
        status = {True: "PASS", False: "FAIL", None: "not measured"}[r["passed"]]
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"  [{status}] {r['description']}: {value} ({r['op']} {r['threshold']})")
    return {"stage": STAGE, "text": "\n".join(lines), "gates": rows}
