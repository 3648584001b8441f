"""LoRA: zero adapters change nothing, only adapters (and a head) train, the base stays
bitwise frozen, merging is exact, the optimizer holds adapter-sized state only, and the
PEFT export loads in `peft` on the matching transformers model."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import lora, reward_model, train_steps
from gptjax.model import ModelConfig, get_model
from gptjax.optim import OptimConfig, make_optimizer

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=16)
LLAMA = dict(BASE, positions="rope", norm="rmsnorm", mlp="swiglu")


def _cfg(**kw):
    return ModelConfig(**{**LLAMA, **kw})


def _batch(rng, b=8, t=16, vocab=64):
    # A learnable pattern: each token is the previous plus one.
    start = rng.integers(0, vocab, (b, 1))
    tokens = ((start + np.arange(t)) % vocab).astype(np.int32)
    return {
        "tokens": tokens,
        "segment_ids": np.ones((b, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
        "loss_mask": np.ones((b, t), np.float32),
    }


def _base_and_lora(rank=4):
    base_cfg = _cfg()
    base = get_model(base_cfg).init(jax.random.key(0))
    cfg = _cfg(lora_rank=rank, lora_alpha=8.0)
    params = lora.add_adapters(base, cfg, jax.random.key(1))
    return base_cfg, base, cfg, params


def test_zero_adapters_leave_logits_unchanged():
    base_cfg, base, cfg, params = _base_and_lora()
    tokens = jnp.asarray(_batch(np.random.default_rng(0))["tokens"])
    np.testing.assert_array_equal(
        get_model(cfg).apply(params, tokens), get_model(base_cfg).apply(base, tokens)
    )
    assert set(lora.trainable(params)["blocks"]) >= {"wq_lora_a", "w_down_lora_b"}


def _train(cfg, params, steps, lr=1e-2):
    model = get_model(cfg)
    tx, schedule = make_optimizer(OptimConfig(lr=lr, warmup_steps=0, weight_decay=0.0), steps)
    step = jax.jit(
        functools.partial(train_steps.lm_train_step, model=model, tx=tx, schedule=schedule)
    )
    state = train_steps.state_from_params(tx, params)
    rng = np.random.default_rng(0)
    history, losses = [jax.device_get(state["params"])], []
    for _ in range(steps):
        state, metrics = step(state, _batch(rng), jax.random.key(0))
        history.append(jax.device_get(state["params"]))
        losses.append(float(metrics["loss"]))
    return state, history, losses


def test_only_adapters_train_and_the_base_stays_bitwise():
    _, base, cfg, params = _base_and_lora()
    state, history, losses = _train(cfg, params, steps=12)
    blocks = [h["blocks"] for h in history]
    # B starts at 0 so A's gradient is 0 at step 1: B moves at step 1, A by step 2.
    assert np.abs(blocks[1]["wq_lora_b"]).max() > 0
    np.testing.assert_array_equal(blocks[1]["wq_lora_a"], blocks[0]["wq_lora_a"])
    assert np.abs(blocks[2]["wq_lora_a"] - blocks[0]["wq_lora_a"]).max() > 0
    assert losses[-1] < losses[0] - 0.1, losses
    final = history[-1]
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        keys = [p.key for p in path]
        got = functools.reduce(lambda t, k: t[k], keys, final)
        np.testing.assert_array_equal(got, leaf, err_msg=str(keys))
    # The optimizer state holds moments of the adapters only (plus scalar counts).
    adapter_shapes = {a.shape for a in jax.tree.leaves(lora.trainable(params))}
    for leaf in jax.tree.leaves(state["opt_state"]):
        assert leaf.shape == () or leaf.shape in adapter_shapes, leaf.shape
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    n_adapters = sum(x.size for x in jax.tree.leaves(lora.trainable(params)))
    assert n_opt <= 2 * n_adapters + 8


def test_merged_equals_unmerged():
    _, _, cfg, params = _base_and_lora()
    state, _, _ = _train(cfg, params, steps=3)
    trained = state["params"]
    merged, merged_cfg = lora.merge(trained, cfg)
    assert merged_cfg.lora_rank == 0 and not lora.has_adapters(merged)
    tokens = jnp.asarray(_batch(np.random.default_rng(5))["tokens"])
    np.testing.assert_allclose(
        get_model(merged_cfg).apply(merged, tokens),
        get_model(cfg).apply(trained, tokens),
        atol=2e-5,
    )


def test_bf16_base_stays_bf16_adapters_float32():
    cfg = _cfg(lora_rank=2, param_dtype="bfloat16")
    params = get_model(cfg).init(jax.random.key(0))
    assert params["blocks"]["wq"].dtype == jnp.bfloat16
    assert params["blocks"]["wq_lora_a"].dtype == jnp.float32
    state, history, _ = _train(cfg, params, steps=2)
    assert state["params"]["blocks"]["wq"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(history[-1]["blocks"]["wq"], history[0]["blocks"]["wq"])
    for leaf in jax.tree.leaves(state["opt_state"]):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_reward_model_trains_adapters_and_head_only():
    cfg = _cfg(lora_rank=2, head="scalar")
    params = get_model(cfg).init(jax.random.key(0))
    params["score_w"] = jax.random.normal(jax.random.key(1), params["score_w"].shape)
    view = lora.trainable(params)
    assert view["score_w"] is params["score_w"] and view["embed"] is None
    tx = optax.adam(1e-2)
    state = train_steps.state_from_params(tx, params)
    rng = np.random.default_rng(0)
    b, k, t = 4, 2, 12
    tokens = rng.integers(3, 64, (b, k, t)).astype(np.int32)
    batch = {
        "tokens": tokens,
        "segment_ids": np.ones((b, k, t), np.int32),
        "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, k, t)).copy(),
        "reward_index": np.full((b, k), t - 1, np.int32),
        "ranks": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
        "valid": np.ones((b, k), np.float32),
    }
    step = jax.jit(
        functools.partial(
            reward_model.rm_train_step, model=get_model(cfg), tx=tx, schedule=lambda s: 1e-2
        )
    )
    new, _ = step(state, batch, jax.random.key(0))
    new = jax.device_get(new["params"])
    assert np.abs(new["score_w"] - np.asarray(params["score_w"])).max() > 0
    assert np.abs(new["blocks"]["wq_lora_b"]).max() > 0
    np.testing.assert_array_equal(new["blocks"]["wq"], params["blocks"]["wq"])
    np.testing.assert_array_equal(new["embed"], params["embed"])


def test_peft_export_loads_in_peft(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gptjax.hf import safetensors
    from gptjax.hf.model import export_model

    base_cfg, base, cfg, params = _base_and_lora()
    state, _, _ = _train(cfg, params, steps=3)
    trained = jax.device_get(state["params"])
    base_dir, adapter_dir = str(tmp_path / "base"), str(tmp_path / "adapter")
    export_model(base_dir, base, base_cfg)
    tensors, config = lora.peft_adapter(trained, cfg, "llama", base_path=base_dir)
    os.makedirs(adapter_dir)
    safetensors.write(os.path.join(adapter_dir, "adapter_model.safetensors"), tensors)
    import json

    with open(os.path.join(adapter_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    # The names and shapes PEFT itself gives these modules.
    reference = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(
            r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=config["target_modules"]
        ),
    )
    want = {
        k.replace(".default", ""): tuple(v.shape)
        for k, v in reference.state_dict().items()
        if "lora_" in k
    }
    assert {k: v.shape for k, v in tensors.items()} == want
    model = peft.PeftModel.from_pretrained(hf_base, adapter_dir).eval()
    tokens = _batch(np.random.default_rng(3))["tokens"]
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(get_model(cfg).apply(trained, jnp.asarray(tokens)))
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_lora_config_errors():
    from gptjax.errors import ConfigError

    with pytest.raises(ConfigError, match="lora_targets"):
        _cfg(lora_rank=2, lora_targets="wq,attn")
    with pytest.raises(ConfigError, match="lora_targets"):
        ModelConfig(**BASE, lora_rank=2, lora_targets="w_gate")  # GELU MLP has no gate
