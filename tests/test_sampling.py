"""KV-cache sampler: cached == full forward, EOS handling, log-probs, top-k, no copies."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import losses, sampling
from gptjax.model import Model
from tests.helpers import jitted_apply, tiny_model_config


@functools.cache
def model_and_params(**overrides):
    model = Model(tiny_model_config(**overrides))
    return model, model.init(jax.random.key(0))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(positions="rope", n_kv_heads=2),
        dict(positions="learned", n_kv_heads=4),
        dict(positions="rope", n_kv_heads=1, scan_layers=False),
    ],
)
def test_prefill_then_cached_decode_equals_full_forward(overrides):
    model, params = model_and_params(**overrides)
    apply = jitted_apply(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, size=n).tolist() for n in (3, 7, 5)]
    continuation = rng.integers(3, 64, size=(3, 6))
    tokens, mask = sampling.left_pad(prompts)  # left padding: rows end at column P-1
    p = tokens.shape[1]
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(3, p + 6)
    logits, cache = apply(params, tokens, mask, positions, cache=cache)
    cached = [logits[:, -1]]
    pos = positions[:, -1] + 1
    for i in range(6):
        out, cache = apply(
            params,
            continuation[:, i : i + 1],
            np.ones((3, 1), np.int32),
            pos[:, None] + i,
            cache=cache,
        )
        cached.append(out[:, 0])
    for row, prompt in enumerate(prompts):
        full_seq = np.asarray(prompt + continuation[row].tolist())[None]
        full = np.asarray(apply(params, full_seq))[0]  # unpadded, no cache
        n = len(prompt)
        # prefill logits of the prompt itself, at every real position
        np.testing.assert_allclose(np.asarray(logits)[row, p - n :], full[:n], rtol=1e-4, atol=1e-5)
        for i in range(7):  # the logit that predicts token n + i
            np.testing.assert_allclose(
                np.asarray(cached[i])[row], full[n - 1 + i], rtol=1e-4, atol=1e-5
            )


class PlusOne:
    """Fake model: the next token is always previous + 1 (mod V)."""

    class cfg:
        max_len, vocab_size = 64, 16

    def apply(
        self, params, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, rng=None, cache=None
    ):
        logits = 10.0 * jax.nn.one_hot((tokens_BxT + 1) % 16, 16)
        if cache is None:
            return logits
        return logits, {**cache, "index": cache["index"] + tokens_BxT.shape[1]}

    def init_cache(self, batch, length):
        return {"index": jnp.zeros((), jnp.int32)}

    def with_layer_weights(self, params, cache):
        return cache


def test_greedy_with_plus_one_model_counts_up_and_stops_at_eos():
    tokens, mask = sampling.left_pad([[3, 4], [9], [13]])
    out, logp, out_mask = sampling.generate(
        PlusOne(), {}, tokens, mask, np.zeros(3, np.int32), max_new_tokens=6, eos_id=11
    )
    out, out_mask = np.asarray(out), np.asarray(out_mask)
    assert out[0].tolist() == [5, 6, 7, 8, 9, 10]  # no EOS within 6 tokens
    assert out[1].tolist() == [10, 11, 0, 0, 0, 0]  # stops after emitting EOS
    assert out_mask[1].tolist() == [1, 1, 0, 0, 0, 0]
    assert out[2].tolist() == [14, 15, 0, 1, 2, 3]  # wraps; token 0 is not EOS
    assert np.all(np.asarray(logp)[1, 2:] == 0)


def test_returned_logprobs_equal_sequence_logprobs():
    model, params = model_and_params(positions="rope", n_kv_heads=2)
    tokens, mask = sampling.left_pad([[5, 6, 7, 8], [9, 10]])
    out, logp, out_mask = sampling.generate(
        model,
        params,
        tokens,
        mask,
        np.array([1, 2], np.int32),
        max_new_tokens=8,
        eos_id=1,
        temperature=1.0,
    )
    full = np.concatenate([tokens, np.asarray(out)], axis=1)
    seg = np.concatenate([mask, np.ones_like(out)], axis=1)
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    logits = model.apply(params, full, seg, positions)
    ref = losses.token_logprobs(
        logits, full, np.concatenate([np.zeros_like(mask), out_mask], axis=1).astype(np.float32)
    )
    np.testing.assert_allclose(np.asarray(ref)[:, tokens.shape[1] :], logp, rtol=1e-5, atol=1e-5)


def test_top_k_1_equals_greedy_and_cached_equals_uncached():
    model, params = model_and_params(positions="rope", n_kv_heads=2)
    tokens, mask = sampling.left_pad([[5, 6, 7, 8], [9, 10], [11]])
    seeds = np.array([3, 4, 5], np.int32)
    kw = dict(max_new_tokens=10, eos_id=1)
    greedy = sampling.generate(model, params, tokens, mask, seeds, **kw)
    top1 = sampling.generate(model, params, tokens, mask, seeds, temperature=1.0, top_k=1, **kw)
    np.testing.assert_array_equal(greedy[0], top1[0])
    sampled = sampling.generate(model, params, tokens, mask, seeds, temperature=1.0, **kw)
    reference = sampling.generate_uncached(
        model, params, tokens, mask, seeds, temperature=1.0, **kw
    )
    np.testing.assert_array_equal(sampled[0], reference[0])
    np.testing.assert_allclose(sampled[1], reference[1], rtol=1e-5, atol=1e-5)


def test_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=0.7))) & (
        np.asarray(sampling.filter_logits(logits, top_p=0.7)) > -1e30
    )
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.asarray(sampling.filter_logits(logits, top_p=0.81)) > -1e30
    assert kept.tolist() == [[True, True, True, False]]


def test_per_row_seeds_make_rows_independent_of_their_batch():
    model, params = model_and_params(positions="rope", n_kv_heads=2)
    a_tokens, a_mask = sampling.left_pad([[5, 6, 7], [9, 10, 11]])
    kw = dict(max_new_tokens=8, eos_id=1, temperature=1.0)
    both = sampling.generate(model, params, a_tokens, a_mask, np.array([7, 8], np.int32), **kw)
    alone = sampling.generate(
        model, params, a_tokens[1:], a_mask[1:], np.array([8], np.int32), **kw
    )
    np.testing.assert_array_equal(np.asarray(both[0])[1], np.asarray(alone[0])[0])


def _decode_loop_hlo(**overrides):
    """(params, the decode loop's compiled HLO, without the entry computation), after
    checking that a second call with other prompts and seeds does not recompile."""
    model, params = model_and_params(positions="rope", n_kv_heads=2, **overrides)
    tokens, mask = sampling.left_pad([[5, 6, 7], [9, 10, 11]])
    kw = dict(max_new_tokens=5, eos_id=1, temperature=1.0)
    sampling.generate(model, params, tokens, mask, np.array([1, 2], np.int32), **kw)
    size = sampling.generate._cache_size()
    sampling.generate(model, params, tokens + 1, mask, np.array([3, 4], np.int32), **kw)
    assert sampling.generate._cache_size() == size
    hlo = (
        sampling.generate.lower(model, params, tokens, mask, np.array([1, 2], np.int32), **kw)
        .compile()
        .as_text()
    )
    # The initial zeros are copied into the loop's buffer once, in the entry computation;
    # inside the loop (every other computation) nothing may copy the cache.
    loop = hlo[hlo.index("ENTRY") :].split("\n}\n", 1)[1] + hlo[: hlo.index("ENTRY")]
    cache_shape = r"f32\[(2,)?2,2,8,8\]"  # [L, B, K, P + N, H] or one layer's
    copies = re.findall(rf"= {cache_shape}\{{[0-9,]*\}} copy\(", loop)
    assert "dynamic-update-slice" in hlo and not copies, copies
    return params, loop


def test_decode_loop_neither_recompiles_nor_copies_the_cache():
    _decode_loop_hlo()


def test_unrolled_decode_loop_slices_no_weights_and_copies_no_cache():
    params, loop = _decode_loop_hlo(scan_layers=False)
    # No step slices a layer's weights out of their stack again (Model.with_layer_weights).
    shapes = {leaf.shape[1:] for leaf in jax.tree.leaves(params["blocks"]) if leaf.ndim > 2}
    made = r"\{[0-9,]*\} (slice|dynamic-slice|copy|fusion)\("
    sliced = [
        line.strip()
        for shape in shapes
        for line in loop.splitlines()
        if re.search(rf"= f32\[{','.join(map(str, shape))}\]{made}", line)
    ]
    assert not sliced, sliced[:3]


@pytest.mark.parametrize("samples", [1, 3])
def test_unrolled_layers_sample_what_scanned_layers_sample(samples):
    scanned, params = model_and_params(positions="rope", n_kv_heads=2)
    unrolled = Model(tiny_model_config(positions="rope", n_kv_heads=2, scan_layers=False))
    tokens, mask = sampling.left_pad([[5, 6, 7], [9, 10], [4]])
    seeds = np.arange(3 * samples, dtype=np.int32)
    kw = dict(max_new_tokens=6, eos_id=1, temperature=1.0, samples=samples)
    a = sampling.generate(scanned, params, tokens, mask, seeds, **kw)
    b = sampling.generate(unrolled, params, tokens, mask, seeds, **kw)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[2]), np.asarray(b[2]))
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), rtol=1e-5, atol=1e-6)
