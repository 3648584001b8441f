"""Thinking and tools, evaluated on the world's reasoning tasks (its reason_eval split).

    python -m experiments.main --config=configs/pipeline.py:tiny,reasoning=1 \
        --stages=pretrain,sft,reason --workdir=runs/reasoning

Each model (base few-shot on arithmetic and facts, the worksheet prompts of the eval
stage; SFT; every RL policy trained in the workdir) answers every task in every mode of
reason.modes, asked with the mode's cue (gptjax/world/reasoning.py): direct, cot (chain
of thought), sc (self-consistency, Wang et al. 2023: reason.sc_samples chains at
reason.sc_temperature, majority vote over their stated answers) and tools. Tools, when
tools.names is set, can be called in every mode (the cue asks, the model decides); their
results are fed back as the replies are sampled (gptjax/tool_sampling.py).

Reported, with 95% bootstrap intervals over tasks, under the eval protocol (greedy, and
eval.samples replies at eval.temperature; sc is its own "vote" protocol): accuracy per
task kind (arithmetic, chain, letters, fact; a task about a person nobody wrote about
is answered correctly by abstaining); paired differences cot − direct and sc − cot on
the multi-step kinds and tools − direct on arithmetic; the tool-call rate, the share of
valid calls, accuracy given a correct tool result, and abstention on unknown people.
Writes <workdir>/reason/results.json and prints the table.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random

from experiments import sources, toolbox
from experiments.rundir import StageContext, write_json
from gptjax import eval_stats, evaluate, tools
from gptjax.errors import ConfigError
from gptjax.retrieval import words as retrieval_words
from gptjax.world import documents, labeler, reasoning
from gptjax.world import evaluation as world_eval

MODES = ("direct", "cot", "sc", "tools")
MULTISTEP = ("chain", "letters")
# variant name -> its input role; the RL policies as the eval stage names them
POLICIES = {"PPO": "ppo", "GRPO": "grpo", "RLOO": "rloo"}
POLICIES.update({f"{k} (gold reward)": f"{v}_gold" for k, v in list(POLICIES.items())})


def modes(config) -> list[str]:
    chosen = [m.strip() for m in config.reason.modes.split(",") if m.strip()]
    bad = [m for m in chosen if m not in MODES]
    if bad or not chosen:
        raise ConfigError("reason.modes", f"{bad or 'empty'}: choose from {', '.join(MODES)}")
    if "tools" in chosen and not toolbox.names_of(config):
        raise ConfigError("reason.modes", "tools mode needs tools.names (e.g. calc,lookup)")
    return chosen


def settings(ctx: StageContext) -> dict:
    """Checked before any stage runs: the modes, the tools, the world's reasoning tasks."""
    config = ctx.config
    if int(config.world.n_reason_eval) <= 0:
        raise ConfigError(
            "world.n_reason_eval",
            "0: the world has no reasoning tasks (configs/pipeline.py:tiny,reasoning=1)",
        )
    if int(config.reason.sc_samples) < 1:
        raise ConfigError("reason.sc_samples", f"must be >= 1, got {config.reason.sc_samples}")
    return {"modes": modes(config), "tools": toolbox.names_of(config)}


def _correct(rec, reply) -> float:
    return float(reasoning.is_correct(rec, reply.text, reply.ended))


def _kind_is(*kinds):
    return lambda rec: reasoning.kind(rec) in kinds


ACCURACY = {
    "accuracy": (lambda rec: True, _correct),
    **{f"accuracy_{k}": (_kind_is(k), _correct) for k in reasoning.KINDS},
    "accuracy_multistep": (_kind_is(*MULTISTEP), _correct),
    "abstention_unknown": (
        lambda rec: rec["answer"] is None,
        lambda rec, r: float(labeler.is_idk(tools.strip_tool_turns(r.text))),
    ),
    "tool_call_rate": (lambda rec: True, lambda rec, r: float(bool(r.calls))),
}


def _result_is_right(rec, result: str) -> bool:
    if reasoning.kind(rec) in ("arithmetic", "chain"):
        return result == rec["answer"]
    value = rec.get("value", rec["answer"]) if reasoning.kind(rec) == "letters" else rec["answer"]
    return result == "" if value is None else value in retrieval_words(result)


def tool_metrics(records, replies) -> dict:
    """Call rate, valid calls, and accuracy of the replies whose last result was right."""
    calls = [c for r in replies for c in r.calls]
    given = [r for r in replies if r.calls and _result_is_right(records[r.index], r.calls[-1][1])]
    return {
        "replies": len(replies),
        "call_rate": sum(bool(r.calls) for r in replies) / max(len(replies), 1),
        "valid_calls": sum(c[2] for c in calls) / len(calls) if calls else float("nan"),
        "right_result_rate": len(given) / max(len(replies), 1),
        "accuracy_given_right_result": (
            sum(_correct(records[r.index], r) for r in given) / len(given)
            if given
            else float("nan")
        ),
    }


def lookup_recall(lookup, people) -> dict:
    """Recall of the lookup tool on known people's facts: the share of (person, attribute)
    whose value is in the result of the demos' query (gptjax/world/reasoning.py
    fact_query), and the share of never-read-about people's queries that return nothing."""
    hits, n, empty, strangers = 0, 0, 0, 0
    for i in range(len(people)):
        p = people[i]
        if p["facts"]:
            for attribute, value in p["facts"].items():
                hits += value in retrieval_words(lookup(reasoning.fact_query(p["name"], attribute)))
                n += 1
        elif p["role"] != "obscure":
            empty += lookup(reasoning.fact_query(p["name"], "job")) == ""
            strangers += 1
    return {
        "recall_known": hits / max(n, 1),
        "facts": n,
        "empty_unknown": empty / max(strangers, 1),
    }


def vote(records, chains) -> list[evaluate.Reply]:
    """Self-consistency: per task the most common stated answer of its chains ("i don't
    know" a vote of its own), as one reply; ties go to the answer stated first."""
    by_task = collections.defaultdict(list)
    for r in chains:
        by_task[r.index].append(r)
    out = []
    for i, rs in sorted(by_task.items()):
        rec = records[i]
        keys = []
        for r in rs:
            answer = reasoning.stated_answer(rec, r.text) if r.ended else None
            idk = answer is None and r.ended and labeler.is_idk(tools.strip_tool_turns(r.text))
            keys.append(answer or ("idk" if idk else None))
        counts = collections.Counter(k for k in keys if k is not None)
        winner = max(counts, key=lambda k: (counts[k], -keys.index(k))) if counts else None
        text = "i don't know." if winner == "idk" else f"it is {winner}." if winner else ""
        calls = tuple(c for r in rs for c in r.calls)
        out.append(evaluate.Reply(i, 0, text, winner is not None, 0, calls=calls))
    return out


@dataclasses.dataclass
class _Runner:
    tokenizer: object
    records: list
    protocol: evaluate.Protocol
    box: object
    spec: object

    def replies(self, model_params, mode: str, temperature: float, samples: int, fewshot=None):
        """fewshot: worksheet-prompt records (_fewshot_records) to ask instead."""
        asked = "cot" if mode == "sc" else mode
        if fewshot is not None:
            recs, prompt_mode = fewshot, world_eval.FEWSHOT
        else:
            recs = [{**t, "prompt": reasoning.question(t, asked)} for t in self.records]
            prompt_mode = evaluate.CHAT
        model, params = model_params
        return evaluate.generate_replies(
            model,
            params,
            self.tokenizer,
            recs,
            mode=prompt_mode,
            temperature=temperature,
            samples=samples,
            protocol=self.protocol,
            toolbox=None if fewshot is not None else self.box,
            tool_tokens=self.spec,
        )


def _fewshot_records(records, examples) -> list[dict]:
    """Worksheet prompts for the arithmetic and fact tasks (the base model has no other
    way to be asked; multi-step kinds have no worksheet form)."""
    rng = random.Random("gptjax-reason/fewshot")
    return [
        {**t, "fewshot_prompt": documents.fewshot_prompt(t, examples, rng)}
        for t in records
        if t["skill"] in ("arithmetic", "fact")
    ]


def evaluate_all(ctx: StageContext) -> dict:
    config = ctx.config
    chosen = modes(config)
    tokenizer = sources.get_tokenizer(config, ctx.workdir)
    world = sources.world_data(config, ctx.workdir)
    records = [world["reason_eval"][i] for i in range(len(world["reason_eval"]))]
    if config.reason.max_prompts:
        records = records[: int(config.reason.max_prompts)]
    proto = dataclasses.replace(
        sources.protocol(config), max_new_tokens=int(config.reason.max_new_tokens)
    )
    box = toolbox.build(config, ctx.workdir)
    spec = toolbox.tokens(config, tokenizer) if box is not None else None
    run = _Runner(tokenizer, records, proto, box, spec)
    mesh = ctx.mesh()

    def load(role):
        return sources.load_stage_params(
            config,
            ctx.workdir,
            ctx.inputs[role],
            tokenizer,
            directory=ctx.checkpoints(role),
            mesh=mesh,
        )

    def present(role):
        return role in ctx.inputs and os.path.isdir(ctx.checkpoints(role))

    out = {
        "n_tasks": len(records),
        "modes": chosen,
        "tools": toolbox.names_of(config),
        "variants": {},
    }
    if box is not None and "lookup" in box.tools:
        out["lookup_recall"] = lookup_recall(box.tools["lookup"], world["people"])
    n_boot = proto.bootstrap
    if present("base"):
        fewshot = _fewshot_records(
            records, [world["fewshot_examples"][i] for i in range(len(world["fewshot_examples"]))]
        )
        mp = load("base")
        res = {}
        for proto_name, temperature, samples in (
            ("greedy", 0.0, 1),
            ("sample", proto.temperature, proto.samples),
        ):
            replies = run.replies(mp, "direct", temperature, samples, fewshot=fewshot)
            res[proto_name] = eval_stats.summarize(fewshot, replies, ACCURACY, n_boot)
        out["variants"]["base few-shot"] = {"direct": res}
    variants = [("SFT", "sft")] + [(n, r) for n, r in POLICIES.items() if r in ctx.inputs]
    replies_of = {}
    for name, role in variants:
        if not present(role):
            continue
        mp = load(role)
        res, got = {}, {}
        for mode in chosen:
            protos = (
                [("vote", float(config.reason.sc_temperature), int(config.reason.sc_samples))]
                if mode == "sc"
                else [("greedy", 0.0, 1), ("sample", proto.temperature, proto.samples)]
            )
            res[mode] = {}
            for proto_name, temperature, samples in protos:
                replies = run.replies(mp, mode, temperature, samples)
                if mode == "sc":
                    replies = vote(records, replies)
                got[(mode, proto_name)] = replies
                summary = eval_stats.summarize(records, replies, ACCURACY, n_boot)
                if box is not None:
                    summary["tools"] = tool_metrics(records, replies)
                res[mode][proto_name] = summary
        res["differences"] = _differences(records, got, n_boot)
        if name != "SFT" and "SFT" in replies_of:  # a policy trained from SFT, against it
            for (mode, proto_name), replies in got.items():
                sft = replies_of["SFT"].get((mode, proto_name))
                for metric in ("accuracy", "accuracy_multistep", "accuracy_arithmetic"):
                    d = eval_stats.paired_difference(
                        records, replies, sft, ACCURACY[metric], n_boot
                    )
                    res["differences"].setdefault(f"− SFT ({mode})", {})[
                        f"{proto_name} {metric}"
                    ] = {
                        **d,
                        "metric": metric,
                    }
        replies_of[name] = got
        out["variants"][name] = res
    return out


_DIFFERENCES = (
    ("cot − direct", "cot", "direct", "accuracy_multistep", ("greedy", "sample")),
    ("sc − cot", ("sc", "vote"), ("cot", "greedy"), "accuracy_multistep", None),
    ("tools − direct", "tools", "direct", "accuracy_arithmetic", ("greedy", "sample")),
    ("tools − direct (multi-step)", "tools", "direct", "accuracy_multistep", ("greedy", "sample")),
)


def _differences(records, got, n_boot: int) -> dict:
    out = {}
    for label, a, b, metric, protos in _DIFFERENCES:
        pairs = [((a, p), (b, p)) for p in protos] if protos else [(a, b)]
        for ka, kb in pairs:
            if ka in got and kb in got:
                key = ka[1] if protos else f"{ka[1]} vs {kb[1]}"
                out.setdefault(label, {})[key] = eval_stats.paired_difference(
                    records, got[ka], got[kb], ACCURACY[metric], n_boot
                ) | {"metric": metric}
    return out


def format_results(out: dict) -> str:
    kinds = [f"accuracy_{k}" for k in reasoning.KINDS] + ["abstention_unknown", "tool_call_rate"]
    header = f"{'model':<22}{'mode':<8}{'protocol':<8}" + "".join(f"{k[:18]:>20}" for k in kinds)
    lines = [
        f"reasoning tasks: {out['n_tasks']}; tools: {', '.join(out['tools']) or 'none'}",
        header,
    ]
    for name, res in out["variants"].items():
        for mode, by_proto in res.items():
            if mode == "differences":
                continue
            for proto_name, m in by_proto.items():
                cells = "".join(
                    f"{m[k]['mean']:>20.3f}" if k in m and m[k].get("n") else f"{'-':>20}"
                    for k in kinds
                )
                lines.append(f"{name:<22}{mode:<8}{proto_name:<8}{cells}")
        for mode, by_proto in res.items():
            for proto_name, m in by_proto.items() if mode != "differences" else ():
                if "tools" in m and m["tools"]["call_rate"] > 0:
                    t = m["tools"]
                    lines.append(
                        f"  {name} {mode} {proto_name}: calls in {t['call_rate']:.3f} of replies, "
                        f"valid {t['valid_calls']:.3f}, right result {t['right_result_rate']:.3f}, "
                        f"accuracy given a right result {t['accuracy_given_right_result']:.3f}"
                    )
        for label, by in res.get("differences", {}).items():
            for proto_name, d in by.items():
                what = proto_name if d["metric"] in proto_name else f"{d['metric']}, {proto_name}"
                lines.append(
                    f"  {name}: {label} ({what}) "
                    f"{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] over {d['n']} tasks"
                )
    return "\n".join(lines)


def run(ctx: StageContext) -> dict:
    out = evaluate_all(ctx)
    os.makedirs(ctx.dir, exist_ok=True)
    path = os.path.join(ctx.dir, "results.json")
    write_json(path, out, default=float)
    return {"stage": ctx.name, "text": f"results: {path}\n" + format_results(out), **out}
