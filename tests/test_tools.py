"""Tools: the calculator's grammar, the lookup index, the tool-turn sampler, and the
SFT mask over tool results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import retrieval, sampling, tool_sampling, tools
from gptjax.model import Model
from gptjax.world import calc, reasoning
from tests.helpers import tiny_model_config


@pytest.mark.parametrize(
    "expr, value",
    [("23 + 45", 68), ("93 - 18 - 34", 41), ("7", 7), ("(1 + 2) - (10 - 4)", -3), (" 08 +2 ", 10)],
)
def test_calc_evaluates_the_worlds_grammar(expr, value):
    assert calc.evaluate(expr) == value


@pytest.mark.parametrize(
    "expr, message",
    [
        ("2 * 3", "unexpected '*' at column 3"),
        ("__import__('os')", "unexpected '_' at column 1"),
        ("1 +", "expected a number or '(' at the end"),
        ("(1 + 2", "expected ')' at the end"),
        ("1 2", "unexpected '2' at column 3"),
        ("", "expected a number or '(' at the end"),
        ("(" * 9 + "1" + ")" * 9, "more than 8 nested brackets"),
    ],
)
def test_calc_rejects_anything_else_with_a_clear_error(expr, message):
    with pytest.raises(calc.CalcError, match=re.escape(message)):
        calc.evaluate(expr)


def test_toolbox_answers_bad_calls_with_an_error_result():
    box = tools.Toolbox({"calc": calc.calc})
    assert box.run("calc(40 + 2)") == ("42", True)
    result, valid = box.run("calc(4 * 2)")
    assert not valid and result.startswith("error: calc: unexpected '*'")
    assert box.run("search(x)") == ("error: no tool 'search'; tools: calc", False)
    assert not box.run("calc 1 + 2")[1]


@pytest.fixture(scope="module")
def world():
    from gptjax.world.config import WorldConfig
    from gptjax.world.generate import generate

    return generate(WorldConfig(n_known=16, n_unknown=8, bios_per_person=20, n_note_docs=200))


def test_lookup_finds_known_people_and_nothing_for_people_nobody_wrote_about(world):
    index = retrieval.PassageIndex(d["text"] for d in world["pretrain"])
    known = [p for p in world["people"] if p["facts"]]
    for p in known:
        for attribute, value in p["facts"].items():
            hit = index.search(reasoning.fact_query(p["name"], attribute), k=1)
            assert len(hit) == 1 and p["name"] in hit[0] and value in retrieval.words(hit[0])
    strangers = [
        p["name"] for p in world["people"] if p["role"].startswith(("unknown", "demo_unk"))
    ]
    assert strangers
    for name in strangers:
        assert index.lookup(reasoning.fact_query(name, "job"), k=3) == ""
    # A stranger's second syllable is in known names: the word alone finds passages, the
    # name does not.
    shared = [n for n in strangers if any(n.split()[1] in p["name"].split() for p in known)]
    assert shared and index.search(shared[0].split()[1], k=1)


# ---- the tool-turn sampler with a scripted model ----------------------------------------

CALL, CALL_END, RESULT, RESULT_END, EOS, V = 3, 4, 5, 6, 1, 128


class CharTokenizer:
    """ids = character code + 10 (so the markers above stay apart)."""

    def encode(self, text):
        return [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids)


class ScriptedModel:
    """Emits params["script"][row, position] at every position, whatever it is fed: the
    logits at position q put all mass on the scripted token for q + 1."""

    def init_cache(self, b, length):
        return {"index": jnp.zeros((), jnp.int32)}

    def apply(self, params, tokens, segment_ids, positions, cache=None):
        b = tokens.shape[0]
        nxt = params["script"][jnp.arange(b)[:, None], positions + 1]
        return 10.0 * jax.nn.one_hot(nxt, V), cache


def _script(rows, p):
    """Row r waits r steps, then makes three calc calls (the scripted tokens where a result
    will be fed are filler), then ends; returns (script, expected tokens)."""
    tok = CharTokenizer()
    script = np.full((len(rows), 96), ord("z") + 10, np.int32)
    expected = []
    for r, delays in enumerate(rows):
        seq = []
        for k, delay in enumerate(delays):
            seq += tok.encode("." * delay) + [CALL] + tok.encode(f"calc({k} + {r})") + [CALL_END]
            seq += [-1] * 4  # [RESULT, " ", digit, RESULT_END] will be fed here
        seq += tok.encode("ok") + [EOS]
        script[r, p : p + len(seq)] = np.where(np.array(seq) < 0, ord("z") + 10, seq)
        out, turn, i = [], 0, 0
        while i < len(seq):  # the result slots filled
            if seq[i] == -1:
                value = str(turn + r)
                out += [RESULT, *tok.encode(" " + value), RESULT_END]
                i += 4
                turn += 1
            else:
                out.append(seq[i])
                i += 1
        expected.append(out)
    return script, expected


def test_tool_results_are_spliced_in_row_by_row_with_one_compiled_program():
    p, n = 2, 70
    rows = [(0, 1, 0), (3, 0, 2), (1, 5, 1)]  # calls at different positions in each row
    script, expected = _script(rows, p)
    prompt = np.full((3, p), 7, np.int32)
    spec = tool_sampling.ToolTokens(
        CALL, CALL_END, RESULT, RESULT_END, max_calls=3, max_result_tokens=2
    )
    box = tools.Toolbox({"calc": calc.calc})
    kwargs = dict(max_new_tokens=n, eos_id=EOS, tokenizer=CharTokenizer(), toolbox=box, spec=spec)
    model = ScriptedModel()
    out = tool_sampling.generate_with_tools(
        model, {"script": jnp.asarray(script)}, prompt, np.ones_like(prompt), np.arange(3), **kwargs
    )
    compiled = tool_sampling._segment._cache_size()
    for r, want in enumerate(expected):
        got = out["tokens"][r][out["mask"][r] > 0].tolist()
        assert got == want
        # the tool mask is exactly the fed positions: RESULT .. RESULT_END
        fed, inside = [], False
        for k, t in enumerate(want):
            inside = inside or t == RESULT
            if inside:
                fed.append(k)
            inside = inside and t != RESULT_END
        assert np.flatnonzero(out["tool_mask"][r]).tolist() == fed
        assert np.all(out["logp"][r][out["tool_mask"][r] > 0] == 0)
        assert [c[:2] for c in out["calls"][r]] == [
            (f"calc({k} + {r})", str(k + r)) for k in range(3)
        ]
    # three turns per row, at different steps: still the one program (and again)
    tool_sampling.generate_with_tools(
        model, {"script": jnp.asarray(script)}, prompt, np.ones_like(prompt), np.arange(3), **kwargs
    )
    assert tool_sampling._segment._cache_size() == compiled


def test_a_row_that_keeps_calling_ends_unterminated_at_the_cap():
    p = 2
    script, _ = _script([(0, 0, 0)], p)
    spec = tool_sampling.ToolTokens(
        CALL, CALL_END, RESULT, RESULT_END, max_calls=2, max_result_tokens=2
    )
    out = tool_sampling.generate_with_tools(
        ScriptedModel(),
        {"script": jnp.asarray(script)},
        np.full((1, p), 7, np.int32),
        np.ones((1, p), np.int32),
        np.zeros(1, np.int32),
        max_new_tokens=60,
        eos_id=EOS,
        tokenizer=CharTokenizer(),
        toolbox=tools.Toolbox({"calc": calc.calc}),
        spec=spec,
    )
    tokens = out["tokens"][0][out["mask"][0] > 0].tolist()
    assert len(out["calls"][0]) == 2 and tokens[-1] == CALL_END and EOS not in tokens


def test_without_calls_the_tool_sampler_equals_generate():
    model = Model(tiny_model_config())
    params = model.init(jax.random.key(0))
    prompts, mask = sampling.left_pad([[5, 9, 11], [7, 8], [12, 13, 14, 15]])
    seeds = np.arange(3)
    # markers outside the tiny vocabulary's sampled range never fire
    spec = tool_sampling.ToolTokens(V + 1, V + 2, V + 3, V + 4)
    for temperature in (0.0, 1.0):
        ref = sampling.generate(
            model,
            params,
            prompts,
            mask,
            seeds,
            max_new_tokens=8,
            eos_id=EOS,
            temperature=temperature,
        )
        out = tool_sampling.generate_with_tools(
            model,
            params,
            prompts,
            mask,
            seeds,
            max_new_tokens=8,
            eos_id=EOS,
            temperature=temperature,
            tokenizer=CharTokenizer(),
            toolbox=tools.Toolbox({}),
            spec=spec,
        )
        for a, b in zip(ref, (out["tokens"], out["logp"], out["mask"])):
            np.testing.assert_array_equal(np.asarray(a), b)
        assert not out["tool_mask"].any()


# ---- the chat template's tool markup and the SFT mask ------------------------------------


@pytest.fixture(scope="module")
def tool_tok(tmp_path_factory):
    from gptjax.data import tokenizer as tok_lib

    texts = [f"what is {i} + {i}? it is {2 * i}. calc lookup" for i in range(300)]
    return tok_lib.train_tokenizer(
        texts,
        tmp_path_factory.mktemp("tok") / "t.model",
        300,
        special_tokens=tok_lib.DEFAULT_SPECIAL_TOKENS + tools.TOKENS,
    )


def test_sft_mask_leaves_out_exactly_the_tool_results(tool_tok):
    from gptjax.data import chat

    tok = tool_tok
    reply = tools.tool_turn("calc", "2 + 2", "4") + " it is 4."
    ids, mask = chat.render_pair("what is 2 + 2? use a tool.", reply, tok)
    special = {tok.special_id(t): t for t in tools.TOKENS}
    start = ids.index(tok.special_id(tools.CALL))
    r0, r1 = ids.index(tok.special_id(tools.RESULT)), ids.index(tok.special_id(tools.RESULT_END))
    assert ids[r0 + 1 : r1] == tok.encode(" 4")
    # policy tokens (the call, the answer, EOS) are learned; the result with its markers is not
    want = [0] * start + [1] * (r0 - start) + [0] * (r1 - r0 + 1) + [1] * (len(ids) - r1 - 1)
    assert mask == want
    assert [special[i] for i in ids if i in special] == list(tools.TOKENS)
    # what the sampler produces decodes to the text and re-encodes to the same ids
    text, ended = chat.decode_reply(ids[ids.index(tok.special_id("<|assistant|>")) + 1 :], tok)
    assert (text, ended) == (reply, True)
    assert chat.encode_reply(text, tok) + [tok.eos_id] == ids[start:]
    # a user typing the markers writes text, not a call
    user_ids = chat.render_prompt([{"role": "user", "content": reply}], tok)
    assert not set(user_ids) & set(special)


def test_a_users_tool_is_registered_as_module_function():
    from experiments import toolbox
    from tests.helpers import config_from_flags

    config = config_from_flags(["--config.tools.names=calc,string:capwords"])
    box = toolbox.build(config, "/nonexistent")  # no lookup: nothing is read
    assert box.names == ["calc", "capwords"]
    assert box.run("capwords(ka ri)") == ("Ka Ri", True)
    assert box.run("calc(2 + 2)") == ("4", True)


# ---- multi-turn RL: the rollout's masks and GAE across tool results --------------------


def test_tool_rollout_masks_results_out_of_every_rl_loss():
    from gptjax import rollout

    p = 2
    script, expected = _script([(0, 1, 0), (3, 0, 2)], p)
    spec = tool_sampling.ToolTokens(
        CALL, CALL_END, RESULT, RESULT_END, max_calls=3, max_result_tokens=2
    )
    prompt = np.full((2, p), 7, np.int32)
    batch = rollout.tool_rollout(
        ScriptedModel(), {"script": jnp.asarray(script)}, prompt, np.ones_like(prompt),
        np.arange(2), max_new_tokens=70, eos_id=EOS, tokenizer=CharTokenizer(),
        toolbox=tools.Toolbox({"calc": calc.calc}), spec=spec,
    )  # fmt: skip
    for r, want in enumerate(expected):
        reply = np.asarray(batch["tokens"])[r, p:]
        fed = np.flatnonzero(np.asarray(batch["tool_mask"])[r])
        assert len(fed) == 3 * 4 and all(
            reply[k] in (RESULT, RESULT_END) or 10 <= reply[k] for k in fed
        )
        starts = [k for k in fed if reply[k] == RESULT]
        assert [reply[k - 1] for k in starts] == [CALL_END] * 3  # right after each call
        policy = np.flatnonzero(np.asarray(batch["response_mask"])[r])
        # the policy's tokens are exactly the rest of the reply, EOS included
        assert sorted([*policy, *fed]) == list(range(len(want)))
        assert not set(policy) & set(fed) and reply[policy[-1]] == EOS
        # the results stay in the sequence the model attends to
        assert np.asarray(batch["segment_ids"])[r, p : p + len(want)].all()
    assert np.asarray(batch["ended"]).tolist() == [1.0, 1.0]
    assert rollout.last_token_index(batch["response_mask"]).tolist() == [
        len(w) - 1 for w in expected
    ]


def test_gae_carries_values_across_tool_results():
    from gptjax import ppo

    rng = np.random.default_rng(0)
    rewards, values = (
        rng.normal(size=(3, 9)).astype(np.float32),
        rng.normal(size=(3, 9)).astype(np.float32),
    )
    solid = np.array([[1] * 9, [1] * 6 + [0] * 3, [1] * 2 + [0] * 7], np.float32)
    for a, b in zip(
        ppo.gae(rewards, values, solid, 0.9, 0.8),
        ppo.gae_over_turns(rewards, values, solid, 0.9, 0.8),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # holes (fed results) inside a reply: the same as GAE on the policy's tokens alone
    holes = np.array([1, 1, 0, 0, 1, 1, 0, 1, 0], np.float32)
    keep = np.flatnonzero(holes)
    adv, ret = ppo.gae_over_turns(rewards[:1], values[:1], holes[None], 0.9, 0.8)
    ref_adv, ref_ret = ppo.gae(
        rewards[:1, keep], values[:1, keep], np.ones((1, len(keep))), 0.9, 0.8
    )
    np.testing.assert_allclose(np.asarray(adv)[0, keep], np.asarray(ref_adv)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ret)[0, keep], np.asarray(ref_ret)[0], rtol=1e-6)
    assert not np.asarray(adv)[0, holes == 0].any()
    # the old GAE would have cut the episode at the first result
    assert not np.allclose(
        np.asarray(ppo.gae(rewards[:1], values[:1], holes[None], 0.9, 0.8)[0])[0, keep],
        np.asarray(ref_adv)[0],
    )
