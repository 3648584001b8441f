"""Model properties: causality, packing, scan == loop, remat, every variant trains."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import losses, train_steps
from gptjax.model import Model
from tests.helpers import jitted_apply, lm_batch, random_batch, tiny_model_config

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(positions="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False),
    "mha_unrolled": dict(n_kv_heads=4, scan_layers=False),
    "scalar_head": dict(head="scalar"),
    "dropout_remat": dict(dropout=0.1, remat="full"),
    "bf16_compute": dict(dtype="bfloat16"),
}


@functools.cache
def _model_and_params(**overrides):
    model = Model(tiny_model_config(**overrides))
    return model, jax.jit(model.init)(jax.random.key(0))


def model_and_params(**overrides):
    return _model_and_params(**overrides)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_future_tokens_do_not_change_earlier_logits(variant):
    model, params = model_and_params(**VARIANTS[variant])
    tokens = np.random.default_rng(0).integers(3, 64, size=(2, 16))
    changed = tokens.copy()
    changed[:, 9:] = np.random.default_rng(1).integers(3, 64, size=(2, 7))
    apply = jitted_apply(model)
    a = apply(params, jnp.asarray(tokens))
    b = apply(params, jnp.asarray(changed))
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    # and the change is visible from position 9 on, so the check above is not vacuous
    assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-3


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_packed_documents_equal_documents_run_alone(variant):
    model, params = model_and_params(**VARIANTS[variant])
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 64, size=n) for n in (7, 12, 5)]
    # Packed: all three documents in one row of 32, positions restart, tail padded.
    tokens = np.zeros((1, 32), np.int32)
    seg = np.zeros((1, 32), np.int32)
    pos = np.zeros((1, 32), np.int32)
    start = 0
    for i, d in enumerate(docs):
        tokens[0, start : start + len(d)] = d
        seg[0, start : start + len(d)] = i + 1
        pos[0, start : start + len(d)] = np.arange(len(d))
        start += len(d)
    packed = lm_batch(tokens, seg, pos)
    apply = jitted_apply(model)
    logits = apply(params, packed["tokens"], packed["segment_ids"], packed["positions"])
    packed_nll = -losses.token_logprobs(logits, packed["tokens"])
    packed_mask = losses.target_mask(packed["segment_ids"])
    start = 0
    for d in docs:
        alone = apply(params, jnp.asarray(d[None]))
        alone_nll = -losses.token_logprobs(alone, jnp.asarray(d[None]))
        np.testing.assert_allclose(
            packed_nll[0, start + 1 : start + len(d)], alone_nll[0, 1:], rtol=1e-5, atol=1e-5
        )
        # First token of each document has no prediction: it would cross the boundary.
        assert packed_mask[0, start] == 0 and packed_mask[0, start + 1 : start + len(d)].all()
        start += len(d)
    assert packed_mask[0, start:].sum() == 0  # padding has no loss


def _loss_and_grads(model, params, batch, rng=None):
    def loss_fn(p):
        logits = model.apply(p, batch["tokens"], batch["segment_ids"], batch["positions"], rng)
        if model.cfg.head == "scalar":
            return jnp.mean((logits - 1.0) ** 2)  # regress every position to 1
        mask = losses.target_mask(batch["segment_ids"], batch["loss_mask"])
        s, n, _ = losses.next_token_loss(logits, batch["tokens"], mask)
        return s / n

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def _assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def test_scan_over_layers_equals_unrolled_stack():
    scan_model, params = model_and_params(positions="rope", scan_layers=True)
    loop_model = Model(tiny_model_config(positions="rope", scan_layers=False))
    batch = random_batch(np.random.default_rng(0), 2, 16, 64)
    l1, g1 = _loss_and_grads(scan_model, params, batch)
    l2, g2 = _loss_and_grads(loop_model, params, batch)  # the same params: one layout
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    _assert_trees_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_changes_neither_outputs_nor_grads(remat, scan):
    base, params = model_and_params(scan_layers=scan)
    remat_model = Model(tiny_model_config(scan_layers=scan, remat=remat))
    batch = random_batch(np.random.default_rng(1), 2, 16, 64)
    l1, g1 = _loss_and_grads(base, params, batch)
    l2, g2 = _loss_and_grads(remat_model, params, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    _assert_trees_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_dropout_is_random_with_rng_and_off_without():
    model, params = model_and_params(dropout=0.5)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, size=(2, 16)))
    apply = jitted_apply(model)
    det1, det2 = apply(params, tokens), apply(params, tokens)
    np.testing.assert_array_equal(det1, det2)
    d1 = apply(params, tokens, rng=jax.random.key(1))
    d2 = apply(params, tokens, rng=jax.random.key(2))
    assert np.abs(np.asarray(d1 - d2)).max() > 1e-3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_runs_and_trains_one_step(variant):
    model, params = model_and_params(**VARIANTS[variant])
    batch = random_batch(np.random.default_rng(0), 4, 16, 64)
    out = jitted_apply(model)(params, batch["tokens"])
    want = (4, 16) if model.cfg.head == "scalar" else (4, 16, 64)
    assert out.shape == want and out.dtype == jnp.float32
    rng = jax.random.key(3) if model.cfg.dropout else None
    loss, grads = _loss_and_grads(model, params, batch, rng)
    assert np.isfinite(loss)
    norms = jax.tree.map(lambda g: float(jnp.linalg.norm(g.astype(jnp.float32))), grads)
    # every weight gets gradient (no disconnected parameter); scalar head starts at 0 so
    # only its own weights are guaranteed non-zero there
    flat = jax.tree_util.tree_leaves_with_path(norms)
    if model.cfg.head == "lm":
        assert all(n > 0 for _, n in flat), [jax.tree_util.keystr(p) for p, n in flat if n == 0]
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    loss2, _ = _loss_and_grads(model, new, batch, rng)
    assert loss2 < loss


def test_sequence_logprobs_matches_manual_log_softmax():
    model, params = model_and_params()
    batch = random_batch(np.random.default_rng(0), 2, 8, 64)
    mask = np.ones((2, 8), np.float32)
    mask[:, :3] = 0
    logits = jitted_apply(model)(params, batch["tokens"])
    logp = losses.token_logprobs(logits, batch["tokens"], mask)
    logits = np.asarray(logits, np.float64)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for b in range(2):
        for t in range(3, 8):
            np.testing.assert_allclose(logp[b, t], ref[b, t - 1, batch["tokens"][b, t]], rtol=1e-5)
    assert (np.asarray(logp)[:, :3] == 0).all()


def test_weight_decay_skips_norms_and_biases():
    from gptjax.optim import decay_mask

    model, _ = model_and_params()
    mask = decay_mask(model.abstract_params)
    assert mask["blocks"]["wq"] and mask["embed"]
    assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["bias"]


def test_grad_accumulation_equals_one_big_batch():
    model, params = model_and_params()
    batch = random_batch(np.random.default_rng(0), 8, 16, 64)
    batch["segment_ids"][:, 12:] = 0  # uneven padding: sums, not means, make this exact
    tx = optax.sgd(1.0)

    def run(accum):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
        step = functools.partial(
            train_steps.lm_train_step,
            model=model,
            tx=tx,
            schedule=lambda s: 1.0,
            grad_accum_steps=accum,
        )
        return jax.jit(step)(state, batch, jax.random.key(0))

    s1, m1 = run(1)
    s4, m4 = run(4)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    _assert_trees_close(s1["params"], s4["params"], rtol=1e-5, atol=1e-7)


def _packed_batch(rng):
    """Two rows: three documents packed in one, a left-padded prompt in the other."""
    seg = np.array([[1] * 5 + [2] * 7 + [3] * 4, [0] * 6 + [1] * 10], np.int32)
    pos = np.concatenate(
        [np.r_[np.arange(5), np.arange(7), np.arange(4)][None], np.r_[[0] * 6, np.arange(10)][None]]
    )
    return lm_batch(rng.integers(3, 64, size=(2, 16)), seg, pos)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_xla_attention_equals_einsum_attention_on_packed_rows(variant):
    """attention="xla" (jax.nn.dot_product_attention) computes gptjax's own attention on
    segment masks too: packed documents, left padding, grouped KV heads (llama)."""
    fields = dict(VARIANTS[variant], n_kv_heads=2)
    model, params = model_and_params(**fields)
    xla = Model(tiny_model_config(**fields, attention="xla"))
    batch = _packed_batch(np.random.default_rng(0))
    l1, g1 = _loss_and_grads(model, params, batch)
    l2, g2 = _loss_and_grads(xla, params, batch)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    _assert_trees_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_cudnn_attention_only_for_one_document_per_row(monkeypatch):
    """A cudnn model asks for cuDNN flash attention only where the batch has no segment
    ids (one causal document per row); packed rows and KV-cache decoding take the XLA
    path with the full mask. cuDNN needs a GPU, so the call is recorded and answered by the
    XLA path, which must then match gptjax's own causal attention."""
    asked = []
    real = jax.nn.dot_product_attention

    def recording(*args, implementation=None, **kw):
        asked.append(implementation)
        return real(*args, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    model, params = model_and_params(positions="rope")
    cudnn = Model(tiny_model_config(positions="rope", attention="cudnn"))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, size=(2, 16)))
    np.testing.assert_allclose(
        cudnn.apply(params, tokens), model.apply(params, tokens), rtol=1e-5, atol=1e-5
    )
    assert set(asked) == {"cudnn"}
    asked.clear()
    batch = _packed_batch(np.random.default_rng(1))
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    np.testing.assert_allclose(
        cudnn.apply(params, *args), model.apply(params, *args), rtol=1e-5, atol=1e-5
    )
    assert set(asked) == {"xla"}
    asked.clear()
    cache = cudnn.init_cache(2, 16)
    cudnn.apply(params, tokens[:, :4], cache=cache)
    assert set(asked) == {"xla"}


def test_a_batch_without_segment_ids_is_one_document_per_row():
    """The LM step's batch may leave out segment_ids and positions (the layout cuDNN
    flash attention takes): the same loss and update as all-ones segments."""
    model, params = model_and_params()
    tx = optax.adamw(1e-3)
    step = jax.jit(functools.partial(train_steps.lm_train_step, model=model, tx=tx,
                                     schedule=lambda s: 1e-3))  # fmt: skip
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    batch = random_batch(np.random.default_rng(2), 2, 16, 64)
    bare = {k: batch[k] for k in ("tokens", "loss_mask")}
    (s1, m1), (s2, m2) = step(state, batch, jax.random.key(0)), step(state, bare, jax.random.key(0))
    # Two programs (one builds the segment mask), so the compiler may round differently: at
    # the pipeline's flags they agree bitwise, at the suite's to 5e-8. A layout bug moves the
    # loss by far more and an Adam update by about its learning rate, 1e-3.
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    _assert_trees_close(s1["params"], s2["params"], rtol=0, atol=1e-6)


def test_one_trunk_pass_gives_the_lm_head_and_a_value_head():
    """PPO's value head on the policy (value_from="head") reads the policy's trunk once:
    the LM's logits and a scalar-head model's values on the same trunk, as two passes."""
    model, params = model_and_params(positions="rope")
    scalar = Model(tiny_model_config(positions="rope", head="scalar"))
    value_params = jax.jit(scalar.init)(jax.random.key(5))
    value_params = {**value_params, **{k: params[k] for k in value_params if k in params}}
    head = {"score_w": jax.random.normal(jax.random.key(6), value_params["score_w"].shape),
            "score_b": jnp.float32(0.3)}  # fmt: skip
    value_params.update(head)
    batch = _packed_batch(np.random.default_rng(3))
    args = (batch["tokens"], batch["segment_ids"], batch["positions"])
    logits, values = jax.jit(model.apply_lm_and_values)(params, head, *args)
    np.testing.assert_allclose(logits, model.apply(params, *args), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(values, scalar.apply(value_params, *args), rtol=1e-6, atol=1e-6)
