"""The evaluator's metrics on hand-made replies with known answers."""

import functools

import numpy as np
import pytest

from gptjax import evaluate, world
from gptjax.evaluate import Reply


@functools.cache
def eval_records():
    return world.generate(world.WorldConfig())["eval_prompts"]


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        mean, lo, hi = evaluate.bootstrap_ci(rng.normal(1.0, 1.0, size=n), n_boot=500)
        assert lo < mean < hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~1/sqrt(n)


def test_metrics_on_replies_with_known_categories():
    records = eval_records()
    known = [i for i, r in enumerate(records) if r["skill"] == "fact" and r["known"]][:10]
    unknown = [i for i, r in enumerate(records) if not r["known"]][:10]
    arith = [i for i, r in enumerate(records) if r["skill"] == "arithmetic"][:10]
    replies = []
    for k, i in enumerate(known):  # 6 right, 4 "don't know"
        text = records[i]["answer"] if k < 6 else "i don't know."
        replies.append(Reply(i, 0, text, True, 2))
    for k, i in enumerate(unknown):  # 3 abstain, 7 make something up
        text = "i don't know." if k < 3 else "it is oslo."
        replies.append(Reply(i, 0, text, True, 4))
    for k, i in enumerate(arith):  # all right, but half never end
        replies.append(Reply(i, 0, records[i]["answer"], k % 2 == 0, 3))
    m = evaluate.summarize(records, replies, n_boot=200)
    assert m["accuracy_fact"]["mean"] == pytest.approx(0.6)
    assert m["idk_known"]["mean"] == pytest.approx(0.4)
    assert m["abstention_unknown"]["mean"] == pytest.approx(0.3)
    assert m["accuracy_arithmetic"]["mean"] == pytest.approx(0.5)  # unterminated is wrong
    assert m["eos_rate"]["mean"] == pytest.approx(25 / 30)
    assert m["accuracy"]["n"] == 20 and m["gold_reward"]["n"] == 30
    assert m["length_tokens"]["mean"] == pytest.approx((10 * 2 + 10 * 4 + 10 * 3) / 30)


def test_samples_of_a_prompt_are_averaged_before_bootstrapping():
    records = eval_records()
    i = next(i for i, r in enumerate(records) if r["skill"] == "arithmetic")
    replies = [Reply(i, j, records[i]["answer"] if j < 3 else "0", True, 1) for j in range(4)]
    m = evaluate.summarize(records, replies, n_boot=50)
    assert m["accuracy"]["n"] == 1 and m["accuracy"]["mean"] == pytest.approx(0.75)
