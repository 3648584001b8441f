"""Evaluates every trained stage of a workdir on the world's held-out eval prompts.

    python -m experiments.main --stages=eval

Models: base zero-shot (chat template), base few-shot (worksheet prompt), SFT; each under
the fixed protocol of gptjax/evaluate.py (greedy, and temperature 1 x4). Writes
<workdir>/eval/results.json and prints the table.
"""

from __future__ import annotations

import json
import os

from experiments import common
from gptjax import evaluate

STAGE = "eval"
TABLE_METRICS = (
    "gold_reward",
    "accuracy",
    "accuracy_known_not_in_demos",
    "idk_known",
    "abstention_unknown",
    "length_tokens",
)


def protocol(config) -> evaluate.Protocol:
    e = config.eval
    return evaluate.Protocol(
        max_new_tokens=e.max_new_tokens,
        samples=e.samples,
        temperature=e.temperature,
        seed=e.seed,
        batch_size=e.batch_size,
        bootstrap=e.bootstrap,
    )


def eval_records(config, workdir: str) -> list[dict]:
    if config.data.pretrain != common.WORLD:
        raise common.ConfigError(
            "data.pretrain",
            "the gold evaluator scores the built-in world; it needs data.pretrain=world",
        )
    src = common.world_data(config, workdir)["eval_prompts"]
    n = len(src) if not config.eval.max_prompts else min(config.eval.max_prompts, len(src))
    return [src[i] for i in range(n)]


def variants(config, workdir: str):
    """(name, stage whose params, prompt mode) for every stage trained in the workdir."""
    out = [("base zero-shot", "pretrain", "chat"), ("base few-shot", "pretrain", "fewshot")]
    if os.path.isdir(os.path.join(common.stage_dir(workdir, "sft"), "checkpoints")):
        out.append(("SFT", "sft", "chat"))
    return out


def run(config, workdir: str) -> dict:
    tokenizer = common.get_tokenizer(config, workdir)
    records = eval_records(config, workdir)
    proto = protocol(config)
    results, params_cache = {}, {}
    for name, stage, mode in variants(config, workdir):
        if stage not in params_cache:
            params_cache[stage] = common.load_stage_params(config, workdir, stage, tokenizer)
        model, params = params_cache[stage]
        results[name] = evaluate.evaluate(model, params, tokenizer, records, proto, mode)
    out_dir = common.stage_dir(workdir, STAGE)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(
            {name: {k: v for k, v in r.items() if k != "replies"} for name, r in results.items()},
            f,
            indent=2,
        )
    lines = [f"eval on {len(records)} held-out prompts ({out_dir}/results.json)"]
    for proto_name in ("greedy", "sample"):
        lines += ["", f"{proto_name}:", evaluate.format_table(results, proto_name, TABLE_METRICS)]
    return {"stage": STAGE, "text": "\n".join(lines), "results": results}
