"""Calibration gates of the world: is it learnable, and does each stage have headroom?

The world sits near the tiny model's capacity cliff (see config.py), so every change to
the world or the tiny configs is checked against these gates. This module defines the
gates, measures them on trained models (`base_fact_completion`, `sft_gates`) and writes
the report (markdown + JSON); experiments/calibrate.py and the pipeline's gates
(experiments/gates.py) call it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np

from gptjax import eval_stats, evaluate, sampling
from gptjax.world.documents import probe_hit
from gptjax.world.evaluation import metrics
from gptjax.world.labeler import gold_score

BEST_OF = 16


@dataclasses.dataclass(frozen=True)
class Gate:
    name: str
    description: str
    op: str  # ">=", "<=" or ">"
    threshold: float
    stage: str  # the stage whose model the gate measures
    # Non-empty: why this is a reported metric, not a gate (measured fragile over seeds:
    # its worst seed within 2 sd of its floor). Still computed and shown against its
    # floor; a run does not fail on it.
    demoted: str = ""


GATES = (
    Gate(
        "base_fact_completion",
        "base model completes held-out facts in pretraining format",
        ">=",
        0.80,
        "pretrain",
    ),
    Gate(
        "sft_unseen_people_accuracy",
        "SFT accuracy on known people absent from the demos",
        ">=",
        0.60,
        "sft",
    ),
    Gate(
        "sft_over_best_of_16",
        "SFT gold reward (T=1) / best-of-16's, both shifted by +1 to be >= 0: RLHF headroom",
        "<=",
        0.80,
        "sft",
    ),
)


def check(gate: Gate, value: float | None) -> dict:
    """A gate's row: value, threshold and pass/fail (None = its stage has not run)."""
    passed = None
    if value is not None:
        ops = {">=": value >= gate.threshold, "<=": value <= gate.threshold}
        passed = bool(ops.get(gate.op, value > gate.threshold))
    return {**dataclasses.asdict(gate), "value": value, "passed": passed}


def fact_completion(probes: Sequence[dict], completions: Sequence[str]) -> dict[str, float]:
    """Accuracy of completing fact probes, overall and for demo / non-demo people."""
    hits = [probe_hit(p, c) for p, c in zip(probes, completions, strict=True)]
    out = {"accuracy": sum(hits) / max(len(hits), 1), "n": len(hits)}
    for key, want in (("demo_people", True), ("other_people", False)):
        sel = [h for p, h in zip(probes, hits) if bool(p.get("in_demos")) == want]
        if sel:
            out[f"accuracy_{key}"] = sum(sel) / len(sel)
    return out


def write_report(directory: str, rows: list[dict], details: dict) -> tuple[str, str]:
    """Writes calibration.md and calibration.json; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    json_path = os.path.join(directory, "calibration.json")
    md_path = os.path.join(directory, "calibration.md")
    with open(json_path, "w") as f:
        json.dump({"gates": rows, "details": details}, f, indent=2, sort_keys=True)
    lines = [
        "# World calibration",
        "",
        "| gate | stage | value | threshold | result |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        result = {True: "PASS", False: "FAIL", None: f"not measured ({r['stage']} not run)"}
        lines.append(
            f"| {r['description']} | {r['stage']} | {value} | {r['op']} "
            f"{r['threshold']:.2f} | {result[r['passed']]} |"
        )
    lines += [
        "",
        "## Details",
        "",
        "```json",
        json.dumps(details, indent=2, sort_keys=True),
        "```",
        "",
    ]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return md_path, json_path


def base_fact_completion(model, params, tokenizer, probes: Sequence[dict]) -> dict:
    """Greedy completion of every held-out fact probe by a base model."""
    completions = sampling.greedy_completions(
        model, params, tokenizer, [p["prefix"] for p in probes], 4
    )
    facts = fact_completion(probes, completions)
    facts["examples"] = [
        {"prefix": p["prefix"], "answer": p["answer"], "completion": c}
        for p, c in list(zip(probes, completions))[:8]
    ]
    return facts


def sft_gates(model, params, tokenizer, records: Sequence[dict], protocol) -> dict:
    """An SFT model's greedy accuracy on known people absent from the demos, and its T=1
    gold reward over best-of-16's (by the gold labeler) on the eval prompts `records`."""
    unseen = [r for r in records if r["skill"] == "fact" and r["known"] and not r["in_demos"]]
    greedy = evaluate.generate_replies(
        model,
        params,
        tokenizer,
        unseen,
        mode=evaluate.CHAT,
        temperature=0.0,
        samples=1,
        protocol=protocol,
    )
    accuracy = eval_stats.summarize(unseen, greedy, metrics(), protocol.bootstrap)["accuracy"][
        "mean"
    ]
    samples = evaluate.generate_replies(
        model,
        params,
        tokenizer,
        records,
        mode=evaluate.CHAT,
        temperature=protocol.temperature,
        samples=BEST_OF,
        protocol=protocol,
    )
    gold = np.zeros((len(records), BEST_OF))
    for r in samples:
        gold[r.index, r.sample] = gold_score(records[r.index], r.text, r.ended)
    mean, best = float(gold.mean()), float(gold.max(axis=1).mean())
    return {
        "sft_unseen_people_accuracy": accuracy,
        "sft_gold_t1": mean,
        f"best_of_{BEST_OF}_gold": best,
        # Rewards can be negative: the ratio is of the gain over the worst score (-1).
        "sft_over_best_of_16": (mean + 1.0) / (best + 1.0),
    }
