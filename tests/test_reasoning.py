"""Thinking and tools in the world: multi-step tasks, demos in each mode, judging, the
self-consistency vote, and the checks made before any stage runs."""

import collections
import random
import re

import pytest

from gptjax import retrieval, tools
from gptjax.evaluate import Reply
from gptjax.world import reasoning, tasks
from gptjax.world.config import WorldConfig
from gptjax.world.generate import generate

SMALL = dict(n_known=16, n_unknown=8, bios_per_person=20, n_note_docs=200, n_demos=64)


@pytest.fixture(scope="module")
def world():
    cfg = WorldConfig(
        **SMALL, n_reason_demos=240, n_reason_eval=80, cot_demo_frac=0.4, tool_demo_frac=0.4
    )
    return cfg, generate(cfg)


def test_the_knobs_off_leave_the_world_unchanged():
    plain = generate(WorldConfig(**SMALL))
    assert "reason_eval" not in plain
    # the knobs are drawn from their own streams: only the added splits differ
    on = generate(WorldConfig(**SMALL, cot_demo_frac=0.5))  # no reasoning demos asked
    assert on == plain


def test_worked_documents_restate_operands_and_never_hold_an_eval_task():
    cfg = WorldConfig(**SMALL, n_worked_docs=300, n_reason_eval=200)
    w = generate(cfg)
    docs = [d["text"] for d in w["pretrain"] if d["kind"] == "worked"]
    assert len(docs) == 300
    text = "\n".join(docs)
    steps = {
        tasks.task_key(
            {
                "skill": "arithmetic",
                "person": None,
                "attribute": None,
                "operands": [op, int(a), int(b)],
            }
        )
        for a, op, b in re.findall(r"(?<!\d)(\d+) ([+-]) (\d+) = \d+", text)
    }
    assert len(steps) > 300
    for t in w["reason_eval"]:
        if t["skill"] == "arithmetic":
            assert tasks.task_key(t) not in steps
    # every partial result of a chain is restated as the next step's operand
    steps = re.findall(r"\d+ [+-] \d+ = (\d+)\. (\d+) [+-] \d+ = ", text)
    assert steps and all(a == b for a, b in steps)


def test_reasoning_demos_are_right_in_every_mode(world):
    cfg, w = world
    demos = [d for d in w["demos"] if "mode" in d]
    assert len(demos) == cfg.n_reason_demos
    modes = collections.Counter(d["mode"] for d in demos)
    assert set(modes) == set(reasoning.MODES) and min(modes.values()) > 40
    assert {reasoning.kind(d) for d in demos} == set(reasoning.KINDS)
    for d in demos:
        assert reasoning.is_correct(d, d["response"], True), d
        assert d["prompt"].endswith(reasoning.CUES[d["mode"]])
        if d["mode"] == "tools":
            (call,) = tools.tool_calls(d["response"])
            name, argument = tools.parse_call(call)
            result = d["response"].split(tools.RESULT)[1].split(tools.RESULT_END)[0].strip()
            if name == "calc":
                assert result == d["answer"]
            elif d["answer"] is None:
                assert result == ""  # nobody wrote about this person
            else:
                value = d.get("value", d["answer"])
                assert value in retrieval.words(result)
    eval_keys = {tasks.task_key(t) for t in w["reason_eval"] if t["skill"] != "fact"}
    demo_keys = {tasks.task_key(d) for d in demos if d["skill"] != "fact"}
    assert eval_keys and not eval_keys & demo_keys


def test_a_reply_is_judged_on_its_own_words():
    task = reasoning.chain_task(["chain", 23, "+", 45, "-", 12], random.Random(0))
    assert task["answer"] == "56"
    assert reasoning.render(task, "cot") == "23 + 45 = 68. 68 - 12 = 56."
    assert reasoning.is_correct(task, "23 + 45 = 68. 68 - 12 = 56.", True)
    assert not reasoning.is_correct(task, "23 + 45 = 68. 68 - 12 = 56.", False)
    assert not reasoning.is_correct(task, "23 + 45 = 68. it is 68.", True)
    turn = tools.tool_turn("calc", "23 + 45 - 12", "56")
    assert reasoning.is_correct(task, turn + " it is 56.", True)
    assert not reasoning.is_correct(task, turn, True)  # the tool's result is not an answer
    unknown = reasoning.letters_task("xo ri", "job", None)
    assert reasoning.is_correct(unknown, "i don't know what xo ri does.", True)
    assert not reasoning.is_correct(unknown, "b a k e r has 5 letters. it is 5.", True)
    known = reasoning.letters_task("ka ri", "job", "baker")
    assert reasoning.render(known, "cot") == ("the job of ka ri is baker. b a k e r has 5 letters.")
    assert reasoning.is_correct(known, reasoning.render(known, "cot"), True)


def test_self_consistency_takes_the_majority_of_stated_answers():
    from experiments.stages.reason import vote

    task = reasoning.chain_task(["chain", 1, "+", 2, "+", 3], random.Random(0))
    unknown = reasoning.letters_task("xo ri", "pet", None)
    chains = [
        (0, "1 + 2 = 3. 3 + 3 = 6. it is 6.", True),
        (0, "1 + 2 = 3. 3 + 3 = 7. it is 7.", True),
        (0, "1 + 2 = 4. 4 + 3 = 7. it is 7.", True),
        (0, "it is 6", False),  # unterminated: no vote
        (1, "i don't know what pet xo ri has.", True),
        (1, "it is 3.", True),
        (1, "i am not sure.", True),
    ]
    replies = [Reply(i, k, text, ended, 0) for k, (i, text, ended) in enumerate(chains)]
    voted = vote([task, unknown], replies)
    assert [r.text for r in voted] == ["it is 7.", "i don't know."]
    assert not reasoning.is_correct(task, voted[0].text, voted[0].ended)
    assert reasoning.is_correct(unknown, voted[1].text, voted[1].ended)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config.tools.names=calc,nosuch"], "config.tools.names: unknown tool 'nosuch'"),
        (["--config.tools.names=calc,os:nosuchfn"], "config.tools.names: cannot import"),
        (["--config.tools.names=calc"], "config.tools.names: world.tool_demo_frac > 0"),
        (["--config.tools.names=", "--config.world.tool_demo_frac=0"], "config.reason.modes"),
        (["--config.world.n_reason_eval=0"], "config.world.n_reason_eval"),
    ],
)
def test_bad_reasoning_settings_fail_before_pretraining(tmp_path, flags, message):
    from experiments import pipeline
    from gptjax.errors import ConfigError
    from tests.helpers import config_from_flags

    config = config_from_flags(flags, preset="tiny,reasoning=1")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        pipeline.run_stages(config, str(tmp_path), ["pretrain", "sft", "reason"])
    assert not any(tmp_path.iterdir())  # nothing computed, nothing written


def test_reason_results_flatten_for_the_sweep_and_summarize_over_runs():
    from experiments import reason_report

    def stat(x):
        return {"mean": x, "lo": x, "hi": x, "n": 10}

    def run(shift):
        acc = {"accuracy_multistep": stat(0.4 + shift), "accuracy_chain": stat(0.1)}
        tool_stats = dict.fromkeys(
            ("call_rate", "valid_calls", "right_result_rate", "accuracy_given_right_result"), 1.0
        )
        tool_stats["replies"] = 10
        return {
            "lookup_recall": {"recall_known": 1.0},
            "variants": {
                "SFT": {
                    "cot": {"greedy": acc, "sample": acc},
                    "sc": {"vote": acc},
                    "tools": {"greedy": {**acc, "tools": tool_stats}},
                    "differences": {
                        "cot − direct": {"greedy": {"mean": shift, "metric": "accuracy_multistep"}}
                    },
                }
            },
        }

    flat = reason_report.flat_variants(run(0.0))
    assert set(flat) == {"SFT (cot)", "SFT (sc)", "SFT (tools)"}
    assert set(flat["SFT (sc)"]) == {"sample"}  # the vote is a sampling protocol
    assert flat["SFT (tools)"]["greedy"]["tools_call_rate"]["mean"] == 1.0
    assert "tools_replies" not in flat["SFT (tools)"]["greedy"]
    text = reason_report.summarize([run(0.0), run(0.1), run(0.2)])
    # mean 0.5 over runs, its t-interval: 0.5 ± 4.30 · 0.1 / √3
    assert "cot − direct (accuracy_multistep, greedy): 0.100 [-0.15, 0.35]" in text
    assert "0.500 [0.25, 0.75]" in text
