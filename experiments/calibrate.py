"""World calibration: the gates that say the world is learnable and leaves headroom.

    python -m experiments.main --stages=pretrain,calibrate   # writes <workdir>/calibration/

Measures the world's gates (gptjax/world/calibration.py) on the stages trained in the
workdir: the base model's held-out fact completion; SFT's accuracy on known people absent
from the demos; and SFT's mean gold reward at temperature 1 against best-of-16's (the
best of 16 samples by the gold labeler: the headroom RLHF can at most reach by
reweighting SFT's samples). Gates of stages that have not run are reported as not
measured. The default pipeline checks the same gates as each stage finishes
(experiments/gates.py).
"""

from __future__ import annotations

import os

from experiments import gates, sources
from experiments.rundir import StageContext
from gptjax.errors import ConfigError
from gptjax.metrics import read_jsonl
from gptjax.world import calibration


def last_eval_loss(stage_dir: str) -> float | None:
    """The held-out loss a trained stage logged last (its metrics.jsonl)."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    rows = [r for r in read_jsonl(path) if "eval/loss" in r] if os.path.exists(path) else []
    return rows[-1]["eval/loss"] if rows else None


def run(ctx: StageContext) -> dict:
    config, workdir = ctx.config, ctx.workdir
    if config.data.pretrain != sources.WORLD:
        raise ConfigError(
            "data.pretrain",
            "calibration measures the built-in world; set --config.data.pretrain=world",
        )
    facts = gates.base_fact_completion(config, workdir, ctx.checkpoints("base"))
    values = {"base_fact_completion": facts["accuracy"]}
    details = {
        "world_hash": sources.world_config(config).content_hash(),
        "tokenizer_hash": sources.get_tokenizer(config, workdir).hash,
        "base_fact_completion": facts,
        "base_heldout_loss": last_eval_loss(ctx.input_dir("base")),
    }
    if os.path.isdir(ctx.checkpoints("sft")):
        sft = gates.sft_gates(config, workdir, ctx.checkpoints("sft"))
        values.update(sft)
        details["sft"] = sft
    rows = [calibration.check(g, values.get(g.name)) for g in calibration.GATES]
    md, _ = calibration.write_report(os.path.join(workdir, "calibration"), rows, details)
    return {
        "stage": ctx.name,
        "text": f"calibration report: {md}\n" + gate_lines(rows),
        "gates": rows,
    }


def gate_lines(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        status = {True: "PASS", False: "FAIL", None: "not measured"}[r["passed"]]
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"  [{status}] {r['description']}: {value} ({r['op']} {r['threshold']})")
    return "\n".join(lines)
