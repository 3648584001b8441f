"""Pipeline gates: checked as each stage of a run finishes, reported pass/fail.

A run that "finishes" by training too little to learn anything must show failed gates,
not a clean table. Gates on the built-in world only (user data has no gold labeler):

  pretrain  base model completes held-out facts in pretraining format >= 0.80
  sft       SFT's T=1 gold reward over best-of-16's <= 0.80 (headroom for RLHF)
  eval      SFT above base zero-shot on gold reward, greedy and T=1; PPO-ptx above SFT
            on gold reward at T=1

Reported against their floors but not gated (DEMOTED: fragile over 5 seeds, README
Results): SFT accuracy on known people absent from the demos >= 0.60; RM held-out
accuracy against the noiseless gold ranking >= 0.75; SFT above base few-shot (greedy,
T=1); PPO above SFT (greedy, T=1) and PPO-ptx above SFT (greedy); PPO's accuracy on
answerable prompts not below SFT's by more than 0.02.

The rows of a workdir accumulate in <workdir>/gates.json (a rerun replaces a gate's row).
"""

from __future__ import annotations

import dataclasses
import json
import os

from experiments import sources
from experiments.rundir import write_json
from gptjax.world import calibration
from gptjax.world.calibration import GATES as WORLD_GATES
from gptjax.world.calibration import Gate, check

# Gates demoted to reported metrics (issue 19): over 5 whole-pipeline seeds (the `gates`
# sweep, README Results) each one's worst seed lay within 2 sd of its floor, so a run on
# another seed or machine may fail it by chance. Their floors are unchanged; the run
# reports each against its floor and does not fail on it. The README gives their
# 5-seed means and intervals.
FRAGILE = "fragile over 5 seeds: the worst seed is within 2 sd of the floor"
DEMOTED = {
    name: FRAGILE
    for name in (
        "sft_unseen_people_accuracy",
        "rm_gold_accuracy",
        "sft_over_base_fs_greedy",
        "sft_over_base_fs_sample",
        "ppo_over_sft_greedy",
        "ppo_over_sft_sample",
        "ppo_ptx_over_sft_greedy",
        "ppo_accuracy_kept",
    )
}

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


def base_fact_completion(config, workdir: str, checkpoints: str, stage: str = "pretrain") -> dict:
    """Greedy completion of every held-out fact probe by a base model's checkpoint."""
    tokenizer = sources.get_tokenizer(config, workdir)
    model, params = sources.load_stage_params(
        config, workdir, stage, tokenizer, directory=checkpoints
    )
    src = sources.world_data(config, workdir)["fact_probes"]
    return calibration.base_fact_completion(
        model, params, tokenizer, [src[i] for i in range(len(src))]
    )


def sft_gates(config, workdir: str, checkpoints: str, stage: str = "sft") -> dict:
    """An SFT checkpoint's gates on the eval prompts (max_prompts of them, as the eval stage)."""
    tokenizer = sources.get_tokenizer(config, workdir)
    model, params = sources.load_stage_params(
        config, workdir, stage, tokenizer, directory=checkpoints
    )
    records = sources.eval_records(config, workdir)
    return calibration.sft_gates(model, params, tokenizer, records, sources.protocol(config))


def _check(gate: Gate, value) -> dict:
    return check(dataclasses.replace(gate, demoted=DEMOTED.get(gate.name, "")), value)


def _rows_for(ctx, summary: dict) -> list[dict]:
    config, workdir, checkpoints = ctx.config, ctx.workdir, os.path.join(ctx.dir, "checkpoints")
    if ctx.name == "pretrain":
        value = base_fact_completion(config, workdir, checkpoints)["accuracy"]
        return [_check(WORLD_GATES[0], value)]
    if ctx.name == "sft":
        values = sft_gates(config, workdir, checkpoints)
        return [_check(g, values.get(g.name)) for g in WORLD_GATES[1:]]
    if ctx.name == "rm":
        return [_check(RM_GATE, summary.get("heldout_gold_accuracy"))]
    if ctx.name == "eval":
        variants = summary["variants"]
        rows = []
        for gate, (a, b, protocol) in EVAL_GATES:
            if a in variants and b in variants:
                gap = (
                    variants[a][protocol]["gold_reward"]["mean"]
                    - variants[b][protocol]["gold_reward"]["mean"]
                )
                rows.append(_check(gate, gap))
        if "PPO" in variants and "SFT" in variants:
            gate = Gate(
                "ppo_accuracy_kept",
                "PPO − SFT accuracy on answerable prompts (greedy)",
                ">=",
                -ACCURACY_TOLERANCE,
                "eval",
            )
            acc = lambda v: variants[v]["greedy"]["accuracy"]["mean"]  # noqa: E731
            rows.append(_check(gate, acc("PPO") - acc("SFT")))
        return rows
    return []


def after_stage(ctx, summary: dict) -> list[dict]:
    """Checks the stage's gates (world data only), records and returns them. A run from a
    Hugging Face checkpoint, or an evaluation of a user's prompts, has none."""
    config = ctx.config
    if config.data.pretrain != sources.WORLD or config.model.get("init_from"):
        return []
    if ctx.name == "eval" and config.eval.get("prompts", sources.WORLD) != sources.WORLD:
        return []
    rows = _rows_for(ctx, summary)
    if rows:
        path = os.path.join(ctx.workdir, "gates.json")
        saved = load(ctx.workdir)
        saved.update({r["name"]: r for r in rows})
        write_json(path, saved)
    return rows


def load(workdir: str) -> dict[str, dict]:
    """The workdir's gate rows, each marked demoted or not by the current DEMOTED (rows
    written before a demotion are read as the code now judges them)."""
    path = os.path.join(workdir, "gates.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = json.load(f)
    return {name: {**row, "demoted": DEMOTED.get(name, "")} for name, row in rows.items()}
