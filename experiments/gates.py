"""Pipeline gates: checked as each stage of a run finishes, reported pass/fail.

A run that "finishes" by training too little to learn anything must show failed gates,
not a clean table. Gates on the built-in world only (user data has no gold labeler):

  pretrain  base model completes held-out facts in pretraining format >= 0.80
  sft       SFT accuracy on known people absent from the demos >= 0.60; SFT's T=1 gold
            reward over best-of-16's <= 0.80 (headroom for RLHF)  [world calibration]
  rm        RM held-out accuracy against the noiseless gold ranking >= 0.75
  eval      SFT above base zero-shot and base few-shot on gold reward; PPO and PPO-ptx
            above SFT on gold reward, greedy and T=1; PPO's accuracy on answerable
            prompts not below SFT's by more than 0.02

The rows of a workdir accumulate in <workdir>/gates.json (a rerun replaces a gate's row).
"""

from __future__ import annotations

import json
import os

from experiments import calibrate, common
from gptjax.world.calibration import GATES as WORLD_GATES
from gptjax.world.calibration import Gate, check

RM_GATE = Gate(
    "rm_gold_accuracy", "RM held-out accuracy vs noiseless gold ranking", ">=", 0.75, "rm"
)
ACCURACY_TOLERANCE = 0.02


def _gap_gate(name: str, a: str, b: str, protocol: str, metric: str = "gold_reward") -> Gate:
    return Gate(f"{name}_{protocol}", f"{a} − {b} {metric} ({protocol})", ">", 0.0, "eval")


EVAL_GATES = [
    (_gap_gate("sft_over_base_zs", "SFT", "base zero-shot", p), ("SFT", "base zero-shot", p))
    for p in ("greedy", "sample")
] + [
    (_gap_gate("sft_over_base_fs", "SFT", "base few-shot", p), ("SFT", "base few-shot", p))
    for p in ("greedy", "sample")
]
for _v, _key in (("PPO", "ppo"), ("PPO-ptx", "ppo_ptx")):
    EVAL_GATES += [
        (_gap_gate(f"{_key}_over_sft", _v, "SFT", p), (_v, "SFT", p)) for p in ("greedy", "sample")
    ]


def _rows_for(stage: str, config, workdir: str, summary: dict) -> list[dict]:
    if stage == "pretrain":
        value = calibrate.base_fact_completion(config, workdir)["accuracy"]
        return [check(WORLD_GATES[0], value)]
    if stage == "sft":
        values = calibrate.sft_gates(config, workdir)
        return [check(g, values.get(g.name)) for g in WORLD_GATES[1:]]
    if stage == "rm":
        return [check(RM_GATE, summary.get("heldout_gold_accuracy"))]
    if stage == "eval":
        variants = summary["variants"]
        rows = []
        for gate, (a, b, protocol) in EVAL_GATES:
            if a in variants and b in variants:
                gap = (
                    variants[a][protocol]["gold_reward"]["mean"]
                    - variants[b][protocol]["gold_reward"]["mean"]
                )
                rows.append(check(gate, gap))
        if "PPO" in variants and "SFT" in variants:
            gate = Gate(
                "ppo_accuracy_kept",
                "PPO − SFT accuracy on answerable prompts (greedy)",
                ">=",
                -ACCURACY_TOLERANCE,
                "eval",
            )
            acc = lambda v: variants[v]["greedy"]["accuracy"]["mean"]  # noqa: E731
            rows.append(check(gate, acc("PPO") - acc("SFT")))
        return rows
    return []


def after_stage(stage: str, config, workdir: str, summary: dict) -> list[dict]:
    """Checks the stage's gates (world data only), records and returns them."""
    if config.data.pretrain != common.WORLD:
        return []
    rows = _rows_for(stage, config, workdir, summary)
    if rows:
        path = os.path.join(workdir, "gates.json")
        saved = load(workdir)
        saved.update({r["name"]: r for r in rows})
        common.write_json(path, saved)
    return rows


def load(workdir: str) -> dict[str, dict]:
    path = os.path.join(workdir, "gates.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
