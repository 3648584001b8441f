"""World calibration: the gates that say the world is learnable and leaves headroom.

    python -m experiments.main --stages=calibrate        # writes <workdir>/calibration/

Pretrains (or reuses the workdir's base model) and measures the world's gates
(gptjax/world/calibration.py) on every stage trained in the workdir: the base model's
held-out fact completion; SFT's accuracy on known people absent from the demos; and
SFT's mean gold reward at temperature 1 against best-of-16's (the best of 16 samples by
the gold labeler: the headroom RLHF can at most reach by reweighting SFT's samples).
Gates of stages that have not run are reported as not measured. The default pipeline
checks the same gates as each stage finishes (experiments/gates.py).
"""

from __future__ import annotations

import os

import numpy as np

from experiments import common, pretrain
from gptjax import evaluate
from gptjax.world import calibration, gold_score

STAGE = "calibrate"
BEST_OF = 16


def base_fact_completion(config, workdir: str) -> dict:
    """Greedy completion of every held-out fact probe by the pretrain stage's model."""
    tokenizer = common.get_tokenizer(config, workdir)
    model, params = common.load_stage_params(config, workdir, "pretrain", tokenizer)
    src = common.world_data(config, workdir)["fact_probes"]
    probes = [src[i] for i in range(len(src))]
    completions = common.greedy_completions(
        model, params, tokenizer, [p["prefix"] for p in probes], 4
    )
    facts = calibration.fact_completion(probes, completions)
    facts["examples"] = [
        {"prefix": p["prefix"], "answer": p["answer"], "completion": c}
        for p, c in list(zip(probes, completions))[:8]
    ]
    return facts


def sft_gates(config, workdir: str) -> dict:
    """SFT's greedy accuracy on known people absent from demos, and its T=1 gold reward
    over best-of-16's, on the eval prompts (max_prompts of them, as the eval stage)."""
    from experiments.evaluate import eval_records, protocol

    tokenizer = common.get_tokenizer(config, workdir)
    model, params = common.load_stage_params(config, workdir, "sft", tokenizer)
    records = eval_records(config, workdir)
    proto = protocol(config)
    unseen = [r for r in records if r["skill"] == "fact" and r["known"] and not r["in_demos"]]
    greedy = evaluate.generate_replies(
        model, params, tokenizer, unseen, mode="chat", temperature=0.0, samples=1, protocol=proto
    )
    accuracy = evaluate.summarize(unseen, greedy, proto.bootstrap)["accuracy"]["mean"]
    samples = evaluate.generate_replies(
        model,
        params,
        tokenizer,
        records,
        mode="chat",
        temperature=proto.temperature,
        samples=BEST_OF,
        protocol=proto,
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


def run(config, workdir: str) -> dict:
    if config.data.pretrain != common.WORLD:
        raise common.ConfigError(
            "data.pretrain",
            "calibration measures the built-in world; set --config.data.pretrain=world",
        )
    base_summary = pretrain.run(config, workdir)
    facts = base_fact_completion(config, workdir)
    values = {"base_fact_completion": facts["accuracy"]}
    details = {
        "world_hash": common.world_config(config).content_hash(),
        "tokenizer_hash": common.get_tokenizer(config, workdir).hash,
        "base_fact_completion": facts,
        "base_heldout_loss": base_summary["heldout_loss"],
    }
    if os.path.isdir(os.path.join(common.stage_dir(workdir, "sft"), "checkpoints")):
        sft = sft_gates(config, workdir)
        values.update(sft)
        details["sft"] = sft
    rows = [calibration.check(g, values.get(g.name)) for g in calibration.GATES]
    md, _ = calibration.write_report(os.path.join(workdir, "calibration"), rows, details)
    return {"stage": STAGE, "text": f"calibration report: {md}\n" + gate_lines(rows), "gates": rows}


def gate_lines(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        status = {True: "PASS", False: "FAIL", None: "not measured"}[r["passed"]]
        value = "—" if r["value"] is None else f"{r['value']:.3f}"
        lines.append(f"  [{status}] {r['description']}: {value} ({r['op']} {r['threshold']})")
    return "\n".join(lines)
