"""Reward model: the K-way ranking loss, reward readout, bias, sharded step."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import losses, reward_model, rm_eval, sharding, train_steps
from gptjax.model import Model
from gptjax.sharding import MeshConfig
from tests.helpers import tiny_model_config


def numpy_ranking_loss(r, ranks, valid):
    """The explicit definition: per prompt, mean over ordered pairs of -log σ(r_w - r_l)."""
    total, prompts = 0.0, 0
    for b in range(r.shape[0]):
        terms = [
            -np.log(1 / (1 + np.exp(-(r[b, i] - r[b, j]))))
            for i, j in itertools.permutations(range(r.shape[1]), 2)
            if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]
        ]
        if terms:
            total += np.mean(terms)
            prompts += 1
    return total, prompts


@pytest.mark.parametrize("k", [2, 4, 9])
def test_k_way_loss_equals_explicit_average_over_pairs(k):
    rng = np.random.default_rng(k)
    r = rng.normal(size=(6, k)).astype(np.float32)
    ranks = np.stack([rng.permutation(k) for _ in range(6)])
    ranks[0, :2] = ranks[0, 0]  # a tie gives no pair
    valid = np.ones((6, k), np.float32)
    valid[1, -1] = 0  # a padded response
    want_sum, want_n = numpy_ranking_loss(r, ranks, valid)
    got_sum, got_n, aux = losses.ranking_loss(jnp.asarray(r), jnp.asarray(ranks), valid)
    np.testing.assert_allclose(got_sum, want_sum, rtol=1e-5)
    assert int(got_n) == want_n == (4 if k == 2 else 6)  # k=2: the tie and the pad leave none
    n_pairs = sum(
        1
        for b in range(6)
        for i, j in itertools.permutations(range(k), 2)
        if valid[b, i] and valid[b, j] and ranks[b, i] < ranks[b, j]
    )
    assert int(aux["pairs"]) == n_pairs


def test_permuting_responses_with_their_ranks_leaves_the_loss_unchanged():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(5, 4)).astype(np.float32)
    ranks = np.stack([rng.permutation(4) for _ in range(5)])
    valid = np.ones((5, 4), np.float32)
    perm = rng.permutation(4)
    a = losses.ranking_loss(r, ranks, valid)[0]
    b = losses.ranking_loss(r[:, perm], ranks[:, perm], valid)[0]
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # ...but permuting the ranks alone does change it (the test above is not vacuous)
    c = losses.ranking_loss(r, ranks[:, perm], valid)[0]
    assert abs(float(c) - float(a)) > 1e-3


@functools.cache
def scalar_model():
    model = Model(tiny_model_config(head="scalar"))
    params = model.init(jax.random.key(0))
    params["score_w"] = jax.random.normal(jax.random.key(1), params["score_w"].shape)
    return model, params


def test_reward_is_read_at_the_reply_end_with_left_or_right_padding():
    model, params = scalar_model()
    seq = np.array([5, 9, 12, 7, 1], np.int32)  # ..., reply, EOS
    t = 12
    right = {
        "tokens": np.zeros((1, 1, t), np.int32),
        "segment_ids": np.zeros((1, 1, t), np.int32),
        "positions": np.zeros((1, 1, t), np.int32),
        "reward_index": np.array([[4]]),
    }
    right["tokens"][0, 0, :5], right["segment_ids"][0, 0, :5] = seq, 1
    right["positions"][0, 0, :5] = np.arange(5)
    left = {
        "tokens": np.zeros((1, 1, t), np.int32),
        "segment_ids": np.zeros((1, 1, t), np.int32),
        "positions": np.zeros((1, 1, t), np.int32),
        "reward_index": np.array([[t - 1]]),
    }
    left["tokens"][0, 0, -5:], left["segment_ids"][0, 0, -5:] = seq, 1
    left["positions"][0, 0, -5:] = np.arange(5)
    r_right = reward_model.rewards(model, params, right)
    r_left = reward_model.rewards(model, params, left)
    values = model.apply(params, seq[None])  # the same sequence, unpadded
    np.testing.assert_allclose(r_right[0, 0], values[0, -1], rtol=1e-5)
    np.testing.assert_allclose(r_left[0, 0], values[0, -1], rtol=1e-5)
    assert abs(float(values[0, -1] - values[0, -2])) > 1e-4  # position matters


def test_bias_normalisation_makes_the_demo_mean_zero():
    model, params = scalar_model()
    rng = np.random.default_rng(0)
    demos = rng.integers(3, 64, size=(8, 10))
    mean = float(model.apply(params, demos)[:, -1].mean())
    assert abs(mean) > 1e-3
    shifted = reward_model.normalise_bias(params, mean)
    np.testing.assert_allclose(model.apply(shifted, demos)[:, -1].mean(), 0.0, atol=1e-5)
    assert float(params["score_b"]) == 0.0  # the input params are not modified


def _rm_batch(rng, b=8, k=4, t=16):
    tokens = rng.integers(3, 64, size=(b, k, t)).astype(np.int32)
    seg = np.ones((b, k, t), np.int32)
    lengths = rng.integers(6, t + 1, size=(b, k))
    for i in range(b):
        for j in range(k):
            seg[i, j, lengths[i, j] :] = 0
            tokens[i, j, lengths[i, j] :] = 0
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, k, t)).copy(),
        "reward_index": (lengths - 1).astype(np.int32),
        "ranks": np.stack([rng.permutation(k) for _ in range(b)]).astype(np.int32),
        "valid": np.ones((b, k), np.float32),
    }


def test_rm_step_on_8_devices_equals_single_device():
    model = Model(tiny_model_config(head="scalar"))
    batch = _rm_batch(np.random.default_rng(0))
    tx = optax.sgd(1.0)  # update = -grad: compares gradients exactly

    def run(mesh):
        init, shardings = train_steps.jit_init(model, tx, mesh)
        state = init(jax.random.key(0))
        state["params"]["score_w"] = jax.device_put(
            jax.random.normal(jax.random.key(1), (32,)), shardings["params"]["score_w"]
        )
        before = jax.device_get(state["params"])
        step = functools.partial(
            reward_model.rm_train_step, model=model, tx=tx, schedule=lambda s: 1.0
        )
        state, metrics = train_steps.jit_train_step(step, mesh, shardings)(
            state, batch, jax.random.key(0)
        )
        grads = jax.tree.map(lambda a, b: a - np.asarray(b), before, state["params"])
        return metrics, grads

    m1, g1 = run(sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1]))
    m8, g8 = run(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    assert 0 < float(m1["loss"]) and float(m1["pairs"]) == 8 * 6
    # float32 with another reduction order: errors scale with the largest gradient entry,
    # plus the rounding of reading a gradient off an O(1) param update (~1e-7).
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()) + 1e-7
        ),
        g1,
        g8,
    )


def test_rm_learns_a_planted_preference():
    """Responses containing token 7 are preferred: the RM must learn to rank them first."""
    model = Model(tiny_model_config(head="scalar"))
    rng = np.random.default_rng(0)
    tx = optax.adam(3e-3)
    mesh = sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])
    init, shardings = train_steps.jit_init(model, tx, mesh)
    state = init(jax.random.key(0))
    step = train_steps.jit_train_step(
        functools.partial(reward_model.rm_train_step, model=model, tx=tx, schedule=lambda s: 3e-3),
        mesh,
        shardings,
    )

    def planted(rng, b=8):
        batch = _rm_batch(rng, b=b)
        has7 = rng.random(batch["ranks"].shape) < 0.5
        for i, j in zip(*np.nonzero(has7)):
            batch["tokens"][i, j, batch["reward_index"][i, j] - 1] = 7
        batch["ranks"] = np.where(has7, 0, 1).astype(np.int32)
        return batch

    for _ in range(150):
        state, metrics = step(state, planted(rng), jax.random.key(0))
    held = planted(np.random.default_rng(99), b=64)
    r = reward_model.rewards(model, state["params"], held)
    acc, _, n = rm_eval.pair_stats(np.asarray(r), held["ranks"], held["valid"])
    assert n > 0 and acc > 0.9, acc
