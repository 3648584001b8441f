"""The world's gold labeler: the score ordering on adversarial replies, how answers are
read ("007", case, echoes), and Bradley-Terry label noise at the configured rate."""

import random

import numpy as np
import pytest

from gptjax.world import labeler, tasks
from gptjax.world.config import WorldConfig
from gptjax.world.generate import generate


@pytest.fixture(scope="module")
def prompts():
    world = generate(
        WorldConfig(
            n_demos=0, n_demos_heldout=0, bios_per_person=1, n_worksheets=10, n_pretrain_heldout=0
        )
    )
    return world["eval_prompts"] + world["ppo_prompts"]


def _fact(value="oslo", person="ka ri", attribute="town"):
    return tasks.fact_task(person, attribute, value, random.Random(0))


def test_adversarial_ordering_on_known_questions(prompts):
    rng = random.Random(0)
    known = [p for p in prompts if p["known"]]
    assert {p["skill"] for p in known} == set(tasks.SKILLS) and len(known) > 1000
    for task in known:
        r = lambda style: tasks.render_response(task, style, rng)  # noqa: B023
        replies = [
            (r("concise"), True),  # correct
            (r("sentence"), True),  # paraphrase of a correct answer
            (r("verbose"), True),  # correct but rambling
            (r("idk"), True),
            (r("wrong"), True),  # wrong entity / number / order of the right type
            ("", True),
            (r("concise"), False),
        ]  # correct text, but it never ended
        s = [labeler.gold_score(task, text, ended) for text, ended in replies]
        assert s[0] > s[1] >= s[2] > s[3] > s[4] > s[5] > s[6], (task, replies, s)
        assert labeler.classify(task, *replies[1]) == "correct"  # paraphrases count as correct
        assert labeler.classify(task, *replies[2]) == "correct_verbose"


def test_idk_is_best_on_unknown_people(prompts):
    rng = random.Random(1)
    unknown = [p for p in prompts if not p["known"]]
    assert len(unknown) > 100
    for task in unknown:
        idk = tasks.render_response(task, "idk", rng)
        others = [
            (tasks.render_response(task, style, rng), True)
            for style in ("concise", "sentence", "verbose", "wrong", "malformed", "empty")
        ]
        others.append((idk, False))
        best = labeler.gold_score(task, idk, True)
        assert best == labeler.SCORES_UNKNOWN["idk"]
        assert all(best > labeler.gold_score(task, t, e) for t, e in others), (task, others)
        assert labeler.classify(task, others[0][0], True) == "hallucinated"


def test_numbers_compare_by_value_and_case_is_ignored():
    add = tasks.arithmetic_task(["+", 3, 4], random.Random(0))
    for reply in ("7", "007", "07.", "it is 007.", "3 + 4 = 7", "7 is 3 + 4.", "3+4=7"):
        assert labeler.classify(add, reply, True) == "correct", reply
    for reply in ("-7", "70", "8", "3 + 4 = 8", "7, no, 8"):
        assert labeler.classify(add, reply, True) == "wrong", reply
    assert labeler.classify(add, "seven", True) == "malformed"
    town = _fact("oslo")
    for reply in ("OSLO", "Oslo.", "It Is Oslo.", "not rome but oslo"):
        assert labeler.classify(town, reply, True) == "correct", reply
    assert labeler.classify(town, "rome", True) == "wrong"
    assert labeler.classify(town, "a cat.", True) == "malformed"  # a value of another type
    rev = tasks.string_task(["reverse", "b k e a"], random.Random(0))
    for reply in (
        "a e k b",
        "A E K B",
        "a, e, k, b.",
        "b k e a reversed is a e k b.",
        "it is a e k b. i know the facts.",
    ):
        assert labeler.classify(rev, reply, True).startswith("correct"), reply
    for reply in ("b k e a", "a e b k"):
        assert labeler.classify(rev, reply, True) == "wrong", reply
    assert labeler.classify(rev, "aekb", True) == "malformed"
    count = tasks.string_task(["count", "b k e a"], random.Random(0))
    assert labeler.classify(count, "there are 04 letters.", True) == "correct"


def test_special_replies_and_length_weight():
    town = _fact("oslo")
    assert labeler.classify(town, "   ", True) == "empty"
    assert labeler.classify(town, "...", True) == "empty"
    assert labeler.classify(town, "oslo", False) == "unterminated"
    assert labeler.classify(town, "i don't know, maybe rome.", True) == "wrong"  # a guess
    assert labeler.classify(town, "I Don't Know.", True) == "idk"
    unknown = _fact(None)
    assert labeler.classify(unknown, "i am not sure.", True) == "idk"
    assert labeler.classify(unknown, "rome", True) == "hallucinated"
    concise, verbose = "oslo", "it is oslo. that is what i know."
    assert labeler.gold_score(town, concise, True) > labeler.gold_score(town, verbose, True)
    # A positive length weight makes the labeler reward detail.
    assert labeler.gold_score(town, verbose, True, length_weight=0.1) > labeler.gold_score(
        town, concise, True, length_weight=0.1
    )
    assert labeler.gold_score(town, "oslo", True) == labeler.SCORES_ANSWERABLE["correct"]


def test_rankings_are_permutations_and_noiseless_at_zero_temperature():
    town = _fact("oslo")
    replies = ["rome", "oslo", "", "i don't know."]
    endeds = [True, True, True, True]
    assert labeler.noiseless_ranking(town, replies, endeds) == [2, 0, 3, 1]
    rng = np.random.default_rng(0)
    for _ in range(50):
        ranks = labeler.noisy_ranking(town, replies, endeds, rng, temperature=1.0)
        assert sorted(ranks) == [0, 1, 2, 3]
    assert labeler.ranking_from_scores([0.5, 0.5, 1.0]) == [1, 2, 0]  # ties by index


def test_pairwise_marginals_are_bradley_terry():
    rng = np.random.default_rng(0)
    scores, T = [1.0, 0.2, -0.5, 0.6], 0.5
    ranks = np.array([labeler.ranking_from_scores(scores, rng, T) for _ in range(20000)])
    for i, j in ((0, 1), (1, 2), (0, 3), (3, 2)):
        p = np.mean(ranks[:, i] < ranks[:, j])
        assert abs(p - 1 / (1 + np.exp(-(scores[i] - scores[j]) / T))) < 0.015, (i, j, p)


@pytest.mark.parametrize("rate", [labeler.DEFAULT_LABEL_NOISE, 0.10])
def test_measured_label_noise_matches_the_configured_rate(prompts, rate):
    cfg = WorldConfig(label_noise=rate)
    temperature = cfg.label_temperature
    assert temperature == labeler.temperature_for_noise(rate)
    reply_rng, noise_rng = random.Random(2), np.random.default_rng(3)
    score_sets, rank_sets = [], []
    for task in prompts:  # K=4 replies such as an SFT model writes, per generated prompt
        replies = labeler.sample_reference_replies(task, 4, reply_rng)
        scores = [labeler.gold_score(task, text, ended) for text, ended in replies]
        score_sets.append(scores)
        rank_sets.append(labeler.ranking_from_scores(scores, noise_rng, temperature))
    measured = labeler.pairwise_disagreement(score_sets, rank_sets)
    assert abs(measured - rate) <= 0.03, measured
    noiseless = [labeler.ranking_from_scores(s) for s in score_sets]
    assert labeler.pairwise_disagreement(score_sets, noiseless) == 0.0


def test_default_config_uses_the_documented_labeler_defaults():
    cfg = WorldConfig()
    assert cfg.length_weight == labeler.DEFAULT_LENGTH_WEIGHT < 0
    assert cfg.label_noise == 0.25
    assert labeler.temperature_for_noise(0.0) == 0.0
    with pytest.raises(ValueError):
        labeler.temperature_for_noise(0.6)


def _frozen_replies():
    """Fixed tasks (no world generator involved) and hand-written replies of every kind."""
    rng = random.Random(0)
    town, job, unknown = _fact("oslo"), _fact("baker", attribute="job"), _fact(None)
    add, sub = tasks.arithmetic_task(["+", 17, 25], rng), tasks.arithmetic_task(["-", 9, 4], rng)
    rev, count = (
        tasks.string_task(["reverse", "b c a"], rng),
        tasks.string_task(["count", "q r"], rng),
    )
    replies = {
        "town": [town, ["oslo", "it is oslo.", "it is oslo. that is what i know about it.", "rome",
                        "i don't know.", "OSLO", "oslo oslo", "", "i don't know, maybe rome."]],
        "job": [job, ["baker", "she is a baker.", "a baker", "painter", "Baker!", "not sure."]],
        "unknown": [unknown, ["i don't know.", "i am not sure.", "oslo", "it is rome.", "..."]],
        "add": [add, ["42", "17 + 25 = 42.", "41", "it is 42. that is the sum.", "i don't know."]],
        "sub": [sub, ["5", "5.", "4", "the answer is 5"]],
        "reverse": [rev, ["a c b", "a, c, b", "b c a", "it is a c b."]],
        "count": [count, ["2", "two", "3", "there are 2 letters."]],
    }  # fmt: skip
    return replies


def test_the_gold_labeler_is_frozen():
    """A pinned hash of the labeler's categories and scores (both length weights, ended and
    not) on fixed replies: a change to the gold labeler is a visible decision (update the
    hash in the same commit, and say why), never a side effect of other work."""
    import hashlib
    import json

    out = []
    for name, (task, texts) in _frozen_replies().items():
        for text in texts:
            for ended in (True, False):
                scores = [labeler.gold_score(task, text, ended, w) for w in (-0.02, 0.1)]
                cat = labeler.classify(task, text, ended)
                out.append([name, text, ended, cat, [round(x, 9) for x in scores]])
    digest = hashlib.sha256(json.dumps(out).encode()).hexdigest()[:16]
    assert digest == FROZEN_LABELER, (digest, out)


FROZEN_LABELER = "26dc3ead3c7298fd"  # the labeler of world v4 (issue 19)
