"""The evaluator's metrics on hand-made replies with known answers."""

import functools

import numpy as np
import pytest

from gptjax import eval_stats, evaluate, world
from gptjax.evaluate import Reply
from gptjax.world.evaluation import judges, metrics

METRICS, JUDGES = metrics(), judges()


@functools.cache
def eval_records():
    return world.generate(world.WorldConfig())["eval_prompts"]


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 200, 2000):
        mean, lo, hi = eval_stats.bootstrap_ci(rng.normal(1.0, 1.0, size=n), n_boot=500)
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
    m = eval_stats.summarize(records, replies, METRICS, n_boot=200)
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
    m = eval_stats.summarize(records, replies, METRICS, n_boot=50)
    assert m["accuracy"]["n"] == 1 and m["accuracy"]["mean"] == pytest.approx(0.75)


def test_distinct_n_and_unique_rate_on_known_texts():
    assert eval_stats.distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert eval_stats.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert eval_stats.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert eval_stats.distinct_n(["a"], 2) is None
    records = eval_records()
    i = next(i for i, r in enumerate(records) if r["skill"] == "arithmetic")
    same = [Reply(i, j, "it is 5.", True, 4) for j in range(4)]
    varied = [Reply(i, j, t, True, 2) for j, t in enumerate(["1", "2", "3", "4"])]
    assert eval_stats.summarize(records, same, METRICS, n_boot=10)["unique_rate"]["mean"] == 0.25
    assert eval_stats.summarize(records, same, METRICS, n_boot=10)["distinct_1"]["mean"] == 0.25
    assert eval_stats.summarize(records, varied, METRICS, n_boot=10)["unique_rate"]["mean"] == 1.0
    # One reply per prompt (greedy): no diversity to measure.
    assert eval_stats.summarize(records, same[:1], METRICS, n_boot=10)["unique_rate"]["n"] == 0


def test_win_rate_against_a_reference_counts_ties_as_half():
    records = eval_records()
    idx = [i for i, r in enumerate(records) if r["skill"] == "arithmetic"][:4]
    right = lambda i: records[i]["answer"]  # noqa: E731
    ours = [Reply(i, 0, right(i) if k < 3 else "0", True, 1) for k, i in enumerate(idx)]
    theirs = [Reply(i, 0, right(i) if k < 1 else "0", True, 1) for k, i in enumerate(idx)]
    ours = evaluate.with_extra(ours, "rm_reward", [1.0, 2.0, 0.0, 0.0])
    theirs = evaluate.with_extra(theirs, "rm_reward", [0.0, 0.0, 1.0, 0.0])
    compared = evaluate.compare_to(records, ours, theirs, JUDGES)
    m = eval_stats.summarize(records, compared, METRICS, n_boot=10)
    # gold: tie (both right), win, win, tie (both wrong) -> (0.5 + 1 + 1 + 0.5) / 4
    assert m["win_rate_gold_vs_sft"]["mean"] == pytest.approx(0.75)
    # rm: win, win, loss, tie -> 2.5 / 4
    assert m["win_rate_rm_vs_sft"]["mean"] == pytest.approx(0.625)


def test_best_of_n_picks_the_highest_rm_reward_per_prompt_and_sample():
    draws = [
        evaluate.with_extra([Reply(0, s, f"d{m}s{s}", True, 1) for s in range(2)], "rm_reward", r)
        for m, r in enumerate([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]])
    ]
    picked = evaluate.best_of_n(draws)
    assert [r.text for r in picked] == ["d1s0", "d0s1"]
    assert evaluate.best_of_n_kl(1) == 0.0
    assert evaluate.best_of_n_kl(16) == pytest.approx(np.log(16) - 15 / 16)


class _ByteTokenizer:
    """Enough of gptjax.data.tokenizer.Tokenizer for chat rendering: one id per byte."""

    eos_id, vocab_size = 1, 64

    def encode(self, text):
        return [3 + b % 58 for b in text.encode()]

    def special_id(self, name):
        return {"<|user|>": 61, "<|assistant|>": 62}[name]

    def decode(self, ids):
        return bytes(i - 3 + 64 for i in ids).decode("latin-1")


def test_a_prompt_longer_than_the_model_names_max_len():
    import jax

    from gptjax.errors import ConfigError
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    lm = Model(tiny_model_config())
    records = [{"prompt": "x" * lm.cfg.max_len}]
    with pytest.raises(ConfigError, match=r"model.max_len.*no room to answer"):
        evaluate.generate_replies(
            lm,
            lm.init(jax.random.key(0)),
            _ByteTokenizer(),
            records,
            mode=evaluate.CHAT,
            temperature=0.0,
            samples=1,
            protocol=evaluate.Protocol(batch_size=2),
        )


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_kl_to_reference_is_the_full_vocabulary_kl_summed_over_the_reply(temperature):
    import jax

    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": "what is 2 + 3?"}, {"prompt": "sort c a b"}]
    replies = [Reply(0, 0, "", True, 3, ids=(9, 10, 1)), Reply(1, 0, "", False, 2, ids=(11, 12))]
    proto = evaluate.Protocol(batch_size=4)
    lm = Model(tiny_model_config())
    p, q = lm.init(jax.random.key(0)), lm.init(jax.random.key(1))
    args = (tok, records, replies, proto)
    kl = evaluate.kl_to_reference(lm, p, lm, q, *args, temperature=temperature)
    for k, r in enumerate(replies):
        prompt = evaluate.chat_prompt_ids(records[r.index], tok)
        row = np.array([prompt + list(r.ids)], np.int32)
        # Logits at column t predict token t + 1: the reply's tokens are predicted from
        # columns len(prompt) - 1 ... len(row) - 2.
        cols = slice(len(prompt) - 1, row.shape[1] - 1)
        lp = jax.nn.log_softmax(np.asarray(lm.apply(p, row), np.float64)[0, cols] / temperature)
        lq = jax.nn.log_softmax(np.asarray(lm.apply(q, row), np.float64)[0, cols])
        want = np.sum(np.exp(lp) * (lp - lq))
        assert kl[k] == pytest.approx(float(want), rel=1e-4) and kl[k] > 0
    same = evaluate.kl_to_reference(lm, p, lm, p, *args)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_one_pass_of_policy_and_reference_gives_their_separate_scores():
    import jax

    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": "what is 2 + 3?"}, {"prompt": "sort c a b"}, {"prompt": "hi"}]
    replies = [
        Reply(0, 0, "", True, 3, ids=(9, 10, 1)),
        Reply(1, 0, "", False, 2, ids=(11, 12)),
        Reply(2, 0, "", True, 1, ids=(1,)),
    ]
    args = (tok, records, replies, evaluate.Protocol(batch_size=2))  # 2 batches, 1 padded
    lm = Model(tiny_model_config())
    p, q = lm.init(jax.random.key(0)), lm.init(jax.random.key(1))
    for t in (1.0, 0.7):
        policy, ref, kl = evaluate.score_with_reference(lm, p, lm, q, *args, temperature=t)
        for got, want in zip(policy, evaluate.score_replies(lm, p, *args, temperature=t)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for got, want in zip(ref, evaluate.score_replies(lm, q, *args)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        assert kl.shape == (3,) and np.all(kl > 0)
        # The reference omitted is the policy's own model at temperature 1: one forward.
        own = evaluate.score_with_reference(lm, p, None, None, *args, temperature=t)
        both = evaluate.score_with_reference(lm, p, lm, p, *args, temperature=t)
        for got, want in zip(jax.tree.leaves(own), jax.tree.leaves(both)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.allclose(own[2], evaluate.kl_to_reference(lm, p, lm, p, *args, 0.7), atol=1e-6)


def test_teacher_forced_scores_match_sequence_logprobs_and_rm_rewards():
    import jax

    from gptjax import losses, reward_model
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": "what is 2 + 3?"}, {"prompt": "sort c a b"}]
    replies = [Reply(0, 0, "", True, 3, ids=(9, 10, 1)), Reply(1, 0, "", False, 2, ids=(11, 12))]
    proto = evaluate.Protocol(batch_size=4)
    lm = Model(tiny_model_config())
    params = lm.init(jax.random.key(0))
    logp, entropy = evaluate.score_replies(lm, params, tok, records, replies, proto)
    rm = Model(tiny_model_config(head="scalar"))
    rm_params = rm.init(jax.random.key(1))
    values = evaluate.score_replies(rm, rm_params, tok, records, replies, proto)
    for k, r in enumerate(replies):
        prompt = evaluate.chat_prompt_ids(records[r.index], tok)
        row = np.array([prompt + list(r.ids)], np.int32)
        mask = np.zeros_like(row, np.float32)
        mask[0, len(prompt) :] = 1
        want = losses.token_logprobs(lm.apply(params, row), row, mask).sum()
        assert logp[k] == pytest.approx(float(want), abs=1e-4)
        assert 0 < entropy[k] <= np.log(64) + 1e-4
        batch = {
            "tokens": row[:, None],
            "segment_ids": np.ones_like(row)[:, None],
            "positions": np.arange(row.shape[1], dtype=np.int32)[None, None],
            "reward_index": np.array([[row.shape[1] - 1]], np.int32),
            "ref_logp": np.zeros((1, 1), np.float32),
        }
        assert values[k] == pytest.approx(
            float(reward_model.rewards(rm, rm_params, batch)[0, 0]), abs=1e-5
        )


def test_a_mesh_splits_the_rows_and_changes_no_reply_or_score():
    import jax

    from gptjax import sharding
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": p} for p in ("what is 2 + 3?", "sort c a b", "hi", "name a bird")]
    proto = evaluate.Protocol(batch_size=8, max_new_tokens=6)
    lm = Model(tiny_model_config())
    params = lm.init(jax.random.key(0))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=1), jax.devices()[:4])
    placed = jax.device_put(params, sharding.replicated(mesh))
    rows = evaluate.on_rows(placed, np.zeros((8, 3), np.int32), np.zeros(8, np.int32))
    assert all(x.sharding.num_devices == 4 and x.addressable_shards[0].data.shape[0] == 2
               for x in rows)  # fmt: skip
    assert evaluate.on_rows(placed, np.zeros((6, 3)))[0].shape == (6, 3)  # 4 ∤ 6: whole
    assert isinstance(evaluate.on_rows(params, np.zeros((8, 3)))[0], np.ndarray)  # 1 device
    kw = dict(mode=evaluate.CHAT, temperature=1.0, samples=2, protocol=proto)
    want = evaluate.generate_replies(lm, params, tok, records, **kw)
    got = evaluate.generate_replies(lm, placed, tok, records, **kw)
    assert [r.ids for r in got] == [r.ids for r in want]
    np.testing.assert_allclose(
        evaluate.score_replies(lm, placed, tok, records, got, proto),
        evaluate.score_replies(lm, params, tok, records, want, proto),
        rtol=1e-5,
        atol=1e-5,
    )


def test_the_reference_feature_is_one_reward_in_the_rm_stage_ppo_and_eval():
    """An RM trained with the SFT model's mean log-prob as a feature must score a reply the
    same way where it is trained (comparison batches), where PPO reads it (score_rollout
    on a left-padded rollout) and where the evaluator and best-of-n read it."""
    import jax

    from gptjax import reward_model, rm_eval, rollout
    from gptjax.data import chat
    from gptjax.data.iterators import comparison_example
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    lm = Model(tiny_model_config())
    sft_params = lm.init(jax.random.key(0))
    rm = Model(tiny_model_config(head="scalar"))
    rm_params = reward_model.with_scalar_head(rm, sft_params, ref_weight=0.7)
    assert float(rm_params["score_logp"]) == pytest.approx(0.7)
    rm_params["score_w"] = 0.1 * jax.random.normal(jax.random.key(1), rm_params["score_w"].shape)
    records = [{"prompt": "2+3?", "responses": ["5", "it is 6"], "ended": [True, False]}]
    records[0]["ranks"] = [0, 1]

    attached = rm_eval.with_ref_logp(lm, sft_params, tok, records)
    example = comparison_example(attached[0], tok, seq_len=24, k_max=2)
    stage = np.asarray(
        reward_model.rewards(rm, rm_params, {k: v[None] for k, v in example.items()})
    )[0]

    reply_ids = [
        tuple(chat.encode_reply(text, tok)) + ((tok.eos_id,) if done else ())
        for text, done in zip(records[0]["responses"], records[0]["ended"])
    ]
    replies = [
        Reply(0, k, t, d, len(i), i)
        for k, (t, d, i) in enumerate(
            zip(*[records[0]["responses"], records[0]["ended"], reply_ids])
        )
    ]
    protocol = evaluate.Protocol(batch_size=2)
    ref_logp, _ = evaluate.score_replies(lm, sft_params, tok, records, replies, protocol)
    evaluated = evaluate.rm_rewards((rm, rm_params), tok, records, replies, protocol, ref_logp)
    with pytest.raises(ValueError, match="SFT model's log-probs"):
        evaluate.rm_rewards((rm, rm_params), tok, records, replies, protocol)

    prompt = evaluate.chat_prompt_ids(records[0], tok)
    p, n = len(prompt) + 2, max(map(len, reply_ids)) + 1  # room for left and right padding
    tokens, seg, mask = (np.zeros((2, p + n), np.int32) for _ in range(3))
    for k, ids in enumerate(reply_ids):
        tokens[k, p - len(prompt) : p], seg[k, p - len(prompt) : p] = prompt, 1
        tokens[k, p : p + len(ids)], seg[k, p : p + len(ids)] = ids, 1
        mask[k, p : p + len(ids)] = 1
    batch = {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32),
        "response_mask": mask[:, p:].astype(np.float32),
    }
    scored = np.asarray(rollout.score_rollout(rm, rm_params, lm, sft_params, batch)["scores"])

    np.testing.assert_allclose(evaluated, stage, atol=1e-4)
    np.testing.assert_allclose(scored, stage, atol=1e-4)
    head_only = np.asarray(
        reward_model.rewards(
            rm, rm_params, {k: v[None] for k, v in example.items() if k != "ref_logp"}
        )
    )[0]
    feature = np.array(attached[0]["ref_logp"])
    assert np.all(feature < 0)
    np.testing.assert_allclose(stage - head_only, 0.7 * feature, rtol=1e-4)


def test_the_evaluator_judges_gold_with_the_configured_length_weight():
    """A verbosity sweep's variant is scored by its own labeler (world.length_weight), in
    the gold reward and in the gold win rate, not by the default weight."""
    from configs import pipeline
    from experiments.stages.evaluate import world_judging
    from gptjax.world.labeler import DEFAULT_LENGTH_WEIGHT, gold_score

    records = eval_records()
    i = next(i for i, r in enumerate(records) if r["skill"] == "fact" and r["known"])
    verbose = f"{records[i]['answer']} and that is all i can tell you about it today."
    ours, theirs = [Reply(i, 0, verbose, True, 14)], [Reply(i, 0, records[i]["answer"], True, 3)]
    config = pipeline.get_config("tiny")
    for weight in (0.1, DEFAULT_LENGTH_WEIGHT):
        config.world.length_weight = weight
        metrics_w, judges_w = world_judging(config)
        m = eval_stats.summarize(
            records, evaluate.compare_to(records, ours, theirs, judges_w), metrics_w, n_boot=10
        )
        assert m["gold_reward"]["mean"] == pytest.approx(
            gold_score(records[i], verbose, True, weight)
        )
        # Detail wins under a positive weight and loses under the default (a brevity bias).
        assert m["win_rate_gold_vs_sft"]["mean"] == (1.0 if weight > 0 else 0.0)


def test_the_exact_best_of_n_kl_on_a_pool_equals_brute_force_and_the_bound_in_the_limit():
    import itertools

    # Brute force on a small pool: enumerate every n-tuple of draws, pick the max reward
    # (ties between distinct replies at random), tally the best-of-n distribution.
    keys = ["a", "b", "a", "c", "d", "d"]  # "a" and "d" drawn twice
    rewards = [0.1, 0.5, 0.1, 0.5, 0.9, 0.9]  # "b" and "c" tie
    base = {k: keys.count(k) / len(keys) for k in set(keys)}
    reward = dict(zip(keys, rewards))
    for n in (1, 2, 3):
        best = dict.fromkeys(base, 0.0)
        for draw in itertools.product(base, repeat=n):
            prob = np.prod([base[k] for k in draw])
            top = max(reward[k] for k in draw)
            winners = [k for k in draw if reward[k] == top]  # a tie: one of the draws
            for k in winners:
                best[k] += prob / len(winners)
        want = sum(q * np.log(q / base[k]) for k, q in best.items() if q > 0)
        got = eval_stats.best_of_n_kl_pool(rewards, keys, n)
        assert got == pytest.approx(want, abs=1e-12), n
    assert eval_stats.best_of_n_kl_pool([0.3] * 8, ["same"] * 8, 16) == 0.0
    # Many distinct samples: the analytic value, which is the bound.
    rng = np.random.default_rng(0)
    m = 20000
    got = eval_stats.best_of_n_kl_pool(rng.normal(size=m), range(m), 8)
    assert got == pytest.approx(evaluate.best_of_n_kl(8), abs=2e-3)
    assert got <= evaluate.best_of_n_kl(8)


def test_the_paired_bootstrap_of_a_difference_equals_numpy_and_is_narrower():
    records = eval_records()[:40]
    rng = np.random.default_rng(0)
    difficulty = rng.normal(size=40)  # shared by both models: cancels in the difference
    a = [Reply(i, s, "x", True, 1, extra={"v": difficulty[i] + 0.3 + 0.1 * rng.normal()})
         for i in range(40) for s in range(2)]  # fmt: skip
    b = [Reply(i, 0, "y", True, 1, extra={"v": difficulty[i]}) for i in range(30)]  # 30 common
    metric = (lambda rec: True, lambda rec, r: r.extra["v"])
    got = eval_stats.paired_difference(records, a, b, metric, n_boot=500, seed=3)
    per_a = np.array([np.mean([r.extra["v"] for r in a if r.index == i]) for i in range(30)])
    diffs = per_a - np.array([difficulty[i] for i in range(30)])
    want = eval_stats.bootstrap_ci(diffs, 500, 3)
    assert got["n"] == 30 and (got["mean"], got["lo"], got["hi"]) == pytest.approx(want)
    # By hand: resample the 30 prompts' differences with the same generator.
    idx = np.random.default_rng(3).integers(0, 30, size=(500, 30))
    assert got["lo"] == pytest.approx(np.quantile(diffs[idx].mean(axis=1), 0.025))
    unpaired = eval_stats.bootstrap_ci(per_a, 500, 3)
    assert got["hi"] - got["lo"] < (unpaired[2] - unpaired[1]) / 3  # difficulty cancelled


def test_the_length_controlled_win_rate_removes_a_length_bias():
    """A judge that only likes length: the raw win rate is high, the win rate at equal
    length is ½. Without a length effect the two agree."""
    rng = np.random.default_rng(0)
    diffs = rng.integers(-6, 7, size=4000).astype(float)
    biased = (rng.random(4000) < 1 / (1 + np.exp(-(0.8 * diffs + 0.0)))).astype(float)
    biased[diffs == 0] = 0.5  # equal length: a tie
    shifted = diffs + 3  # ours is 3 tokens longer on average: the raw rate rises
    wins = (rng.random(4000) < 1 / (1 + np.exp(-0.8 * shifted))).astype(float)
    lc = eval_stats.length_controlled_win_rate(wins, shifted)
    assert wins.mean() > 0.65 and lc == pytest.approx(0.5, abs=0.03)
    assert eval_stats.length_controlled_win_rate(biased, diffs) == pytest.approx(0.5, abs=0.03)
    fair = (rng.random(4000) < 0.7).astype(float)
    assert eval_stats.length_controlled_win_rate(fair, diffs) == pytest.approx(
        fair.mean(), abs=0.02
    )
    # Through compare_to's length_diff and the bootstrap over prompts.
    records = eval_records()[:30]
    ours = [Reply(i, 0, "x", True, 5 + i % 3, extra={}) for i in range(30)]
    theirs = [Reply(i, 0, "y", True, 5, extra={}) for i in range(30)]
    judged = evaluate.compare_to(records, ours, theirs, {"len": lambda rec, r: r.n_tokens})
    assert [r.extra["length_diff"] for r in judged[:3]] == [0.0, 1.0, 2.0]
    got = eval_stats.length_controlled(records, judged, "len", n_boot=50)
    assert got["n"] == 30 and got["lo"] <= got["mean"] <= got["hi"]
    assert got["mean"] < float(np.mean([r.extra["win_len"] for r in judged]))


def _spy_on_scoring(monkeypatch, record):
    """Calls record(tokens_BxT, lengths_B) on every batch the scorer runs."""
    real = evaluate._teacher_forced

    def spy(model, params, tokens, lengths, *args):
        record(tokens, lengths)
        return real(model, params, tokens, lengths, *args)

    monkeypatch.setattr(evaluate, "_teacher_forced", spy)


def test_long_records_are_scored_on_their_end_at_bounded_width(monkeypatch):
    """A prompt far longer than the limit keeps its end (as the RM's rows do), and the
    scoring batch is at most the model's max_len wide whatever the longest record."""
    import jax

    from gptjax import losses
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": "a long question " * 400}, {"prompt": "short"}]
    replies = [Reply(0, 0, "", True, 3, ids=(9, 10, 1)), Reply(1, 0, "", True, 2, ids=(11, 1))]
    lm = Model(tiny_model_config())
    params = lm.init(jax.random.key(0))
    widths = []
    _spy_on_scoring(monkeypatch, lambda tokens, lengths: widths.append(tokens.shape[1]))
    logp, _ = evaluate.score_replies(
        lm, params, tok, records, replies, evaluate.Protocol(batch_size=2), max_len=24
    )
    assert widths == [lm.cfg.max_len]
    prompt = evaluate.chat_prompt_ids(records[0], tok)
    row = np.array([(prompt + [9, 10, 1])[-24:]], np.int32)
    mask = np.zeros_like(row, np.float32)
    mask[0, -3:] = 1
    want = losses.token_logprobs(lm.apply(params, row), row, mask).sum()
    assert logp[0] == pytest.approx(float(want), abs=1e-4)


def test_a_distinct_row_is_scored_once_and_every_reply_gets_its_value(monkeypatch):
    """Replies repeating a (prompt, reply) row share one forward row, and a reply's value
    does not depend on where it stands in the list: duplicates save work, nothing else."""
    import jax

    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": "what is 2 + 3?"}, {"prompt": "sort c a b"}]
    a, b, c = (9, 10, 1), (11, 1), (12, 13, 14, 1)
    rows = [(0, 0, a), (0, 1, a), (1, 0, a), (0, 2, b), (1, 1, c), (0, 3, a)]
    replies = [Reply(i, j, "", True, len(ids), ids=ids) for i, j, ids in rows]
    proto = evaluate.Protocol(batch_size=3)
    lm = Model(tiny_model_config())
    params = lm.init(jax.random.key(0))
    seen = []
    _spy_on_scoring(monkeypatch, lambda tokens, lengths: seen.extend(lengths[lengths > 2]))
    logp, entropy = evaluate.score_replies(lm, params, tok, records, replies, proto)
    assert len(seen) == 4  # (0, a), (1, a), (0, b), (1, c); the rest pad (EOS, EOS) rows
    assert logp[0] == logp[1] == logp[5] != logp[2]
    back = evaluate.score_replies(lm, params, tok, records, replies[::-1], proto)
    np.testing.assert_array_equal(back[0][::-1], logp)
    np.testing.assert_array_equal(back[1][::-1], entropy)


def test_samples_of_a_prompt_share_its_prefill_and_get_the_replies_of_separate_rows(
    monkeypatch,
):
    """At temperature 1 a prompt's samples are decoded from one prefill (sampling.generate's
    `samples`), with the tokens each would get as a row of its own prompt copy."""
    import jax

    from gptjax import sampling
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    tok = _ByteTokenizer()
    records = [{"prompt": p} for p in ("what is 2 + 3?", "sort c a b", "hi")]
    proto = evaluate.Protocol(batch_size=4, max_new_tokens=6)
    lm = Model(tiny_model_config())
    params = lm.init(jax.random.key(0))
    calls = []
    real = sampling.generate
    monkeypatch.setattr(
        sampling,
        "generate",
        lambda m, p, t, *a, **kw: (
            calls.append((t.shape[0], kw["samples"])) or real(m, p, t, *a, **kw)
        ),
    )
    got = evaluate.generate_replies(
        lm, params, tok, records, mode=evaluate.CHAT, temperature=1.0, samples=2, protocol=proto
    )
    assert calls == [(2, 2)] * 2  # 3 prompts x 2 samples in batches of 4: 2 prompts each
    assert [(r.index, r.sample) for r in got] == [(i, j) for i in range(3) for j in range(2)]
    monkeypatch.setattr(sampling, "generate", real)
    prompts = [evaluate.chat_prompt_ids(records[r.index], tok) for r in got]
    tokens, mask = sampling.left_pad(prompts)
    seeds = np.array([proto.seed + 7919 * r.index + r.sample for r in got], np.int32)
    want, _, want_mask = real(lm, params, tokens, mask, seeds, max_new_tokens=6,
                              eos_id=tok.eos_id, temperature=1.0)  # fmt: skip
    for k, r in enumerate(got):
        assert list(r.ids) == np.asarray(want)[k][np.asarray(want_mask)[k] > 0].tolist()
