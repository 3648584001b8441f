"""Hugging Face checkpoints in and out: logits parity with `transformers` (tiny random models
built here, nothing downloaded), export loadable by `transformers`, sharded checkpoints
onto 8 devices, bf16 kept, and config.json fields gptjax cannot honour named."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gptjax import sharding
from gptjax.errors import ConfigError
from gptjax.hf import config as hf_config
from gptjax.hf.model import export_model, import_model
from gptjax.model import ModelConfig, get_model

V = 97


def _config(kind: str, **kw):
    common = dict(vocab_size=kw.pop("vocab_size", V))
    if kind == "gpt2":
        return transformers.GPT2Config(
            **common, n_embd=32, n_layer=2, n_head=4, n_positions=80, **kw
        )
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=48,
            max_position_embeddings=128,
            **kw,
        )
    llama_like = dict(
        **common,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=128,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[kind]
    return cls(**{**llama_like, **kw})


def _save(tmp_path, kind: str, name: str = "ckpt", dtype=torch.float32, **kw) -> tuple:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind, **kw)).to(dtype).eval()
    # Random init leaves the biases and norms at 0 and 1: move them, so a bias or a norm
    # read from the wrong tensor shows.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = str(tmp_path / name)
    model.save_pretrained(directory)
    return model, directory


def _batch(t: int = 12, seed: int = 0, vocab: int = V):
    """Three rows right-padded to t: tokens, 0/1 mask, positions restarting per row."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (3, t))
    mask = np.ones((3, t), np.int64)
    mask[1, t * 2 // 3 :] = 0
    mask[2, t // 3 :] = 0
    positions = np.maximum(mask.cumsum(1) - 1, 0)
    return tokens, mask, positions


def _hf_logits(model, tokens, mask, positions):
    with torch.no_grad():
        out = model(
            torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _our_logits(cfg, params, tokens, mask, positions):
    out = get_model(cfg).apply(
        params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions)
    )
    return np.asarray(out, np.float32)


def _max_diff(a, b, mask):
    return float(np.abs(a - b)[mask.astype(bool)].max())


LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
    rope_theta=10_000.0,
)

CASES = {
    "gpt2": ("gpt2", dict()),
    "gpt2_exact_gelu": ("gpt2", dict(activation_function="gelu")),
    # Pythia's shape: parallel residual, a quarter of each head rotated, exact GELU.
    "gpt_neox_pythia": ("gpt_neox", dict()),
    "gpt_neox_sequential_tied": (
        "gpt_neox",
        dict(
            use_parallel_residual=False,
            tie_word_embeddings=True,
            hidden_act="gelu_new",
            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=1.0),
        ),
    ),
    "llama_gqa_llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_biases": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2": ("qwen2", dict()),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(tmp_path, case):
    kind, fields = CASES[case]
    model, directory = _save(tmp_path, kind, **fields)
    cfg, params, note = import_model(directory)
    assert "float32, kept" in note
    tokens, mask, positions = _batch(t=40 if "rope" in case else 12)
    diff = _max_diff(
        _our_logits(cfg, params, tokens, mask, positions),
        _hf_logits(model, tokens, mask, positions),
        mask,
    )
    assert diff <= 1e-4, diff


def test_tied_llama_file_has_no_lm_head(tmp_path):
    _, directory = _save(tmp_path, "llama", tie_word_embeddings=True)
    from gptjax.hf.safetensors import Checkpoint

    assert "lm_head.weight" not in Checkpoint(directory).names()
    cfg, _, _ = import_model(directory)
    assert cfg.tie_embeddings and "unembed" not in get_model(cfg).abstract_params


def test_llama3_rope_scaling(tmp_path):
    """Scaling moves logits by little at short lengths: compare the inverse frequencies
    exactly, and show positions up to 64 (original length 16) need the scaling."""
    model, directory = _save(tmp_path, "llama", rope_parameters=LLAMA3_ROPE)
    cfg, params, _ = import_model(directory)
    assert cfg.rope_scaling == "llama3" and cfg.rope_original_max_len == 16
    ours = np.asarray(cfg.rope_inv_freq())
    theirs = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_array_equal(ours, theirs)
    plain = dataclasses.replace(cfg, rope_scaling="none")
    assert not np.allclose(np.asarray(plain.rope_inv_freq()), theirs)

    tokens = np.random.default_rng(1).integers(0, V, (2, 64))
    mask, positions = np.ones_like(tokens), np.broadcast_to(np.arange(64), (2, 64))
    ref = _hf_logits(model, tokens, mask, positions)
    assert _max_diff(_our_logits(cfg, params, tokens, mask, positions), ref, mask) <= 1e-4
    assert _max_diff(_our_logits(plain, params, tokens, mask, positions), ref, mask) > 1e-3


def test_hub_and_transformers5_spellings_agree(tmp_path):
    """Hub files: rope_theta + rope_scaling + torch_dtype; transformers 5's save_pretrained:
    rope_parameters + dtype. Both give one ModelConfig."""
    _, directory = _save(tmp_path, "llama", rope_parameters=LLAMA3_ROPE)
    new = hf_config.read(directory)
    assert "rope_parameters" in new and "dtype" in new
    hub = {k: v for k, v in new.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(new["rope_parameters"])
    hub.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype="float32")
    assert hf_config.to_model_config(new) == hf_config.to_model_config(hub)


@pytest.mark.parametrize(
    "kind,fields,named",
    [
        ("mistral", dict(sliding_window=4096), "sliding_window"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=64), "use_sliding_window"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_scaling"),
        ("mixtral", dict(), "model_type"),
        ("gpt2", dict(activation_function="relu"), "activation_function"),
    ],
)
def test_unsupported_fields_are_named(kind, fields, named):
    base = _config("mistral" if kind == "mixtral" else kind).to_dict()
    if "rope_scaling" in fields:  # a Hub file's spelling, alone
        base.pop("rope_parameters")
    base.update(fields)
    if kind == "mixtral":
        base["model_type"] = "mixtral"
    with pytest.raises(ConfigError, match=f"field '{named}'"):
        hf_config.to_model_config(base)


def test_qwen2_sliding_window_without_the_flag_loads():
    # Qwen2.5 configs set sliding_window while use_sliding_window is false.
    base = _config("qwen2").to_dict()
    base.update(sliding_window=32768, use_sliding_window=False)
    assert hf_config.to_model_config(base).qkv_bias


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    model, directory = _save(tmp_path, "qwen2", dtype=torch.bfloat16)
    cfg, params, note = import_model(directory)
    assert cfg.param_dtype == "bfloat16" and "stored bfloat16, kept" in note
    want = model.model.embed_tokens.weight.detach().float().numpy()
    got = np.asarray(params["embed"])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got.astype(np.float32), want)
    cfg32, params32, note32 = import_model(directory, param_dtype="float32", dtype="float32")
    assert "cast to float32" in note32 and params32["embed"].dtype == jnp.float32


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "llama", "qwen2"])
def test_export_loads_in_transformers(tmp_path, kind):
    """gptjax params (imported, then perturbed as training would) exported and read back by
    transformers give the same logits; the export re-imports to the same params."""
    _, directory = _save(tmp_path, kind)
    cfg, params, _ = import_model(directory)
    params = jax.tree.map(lambda p: p + 0.01 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
    out = str(tmp_path / "export")
    assert export_model(out, params, cfg, base=hf_config.read(directory)) == kind
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask, positions = _batch()
    ours = _our_logits(cfg, params, tokens, mask, positions)
    assert _max_diff(ours, _hf_logits(loaded, tokens, mask, positions), mask) <= 1e-4
    cfg2, params2, _ = import_model(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize(
    "kind,fields",
    [
        ("gpt2", dict(positions="learned")),
        # gptjax's CPU presets: rotary positions with LayerNorm and GELU.
        ("gpt_neox", dict(positions="rope")),
        ("llama", dict(positions="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2)),
    ],
)
def test_export_gptjax_model(tmp_path, kind, fields):
    """A model gptjax built itself (no biases) exports to the architecture that holds it,
    with the biases that architecture always stores written as zeros."""
    cfg = ModelConfig(vocab_size=V, d_model=32, n_heads=4, d_ff=64, **fields)
    params = get_model(cfg).init(jax.random.key(0))
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * 1.5  # not the HF init
    out = str(tmp_path / "export")
    assert export_model(out, params, cfg) == kind
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens, mask, pos = _batch()
    ours = _our_logits(cfg, params, tokens, mask, pos)
    assert _max_diff(ours, _hf_logits(loaded, tokens, mask, pos), mask) <= 1e-4
    from gptjax.hf.safetensors import Checkpoint

    stored = Checkpoint(out).names()
    if kind == "gpt2":
        assert "transformer.h.0.mlp.c_fc.bias" in stored  # GPT-2 always has biases
    if kind == "gpt_neox":
        assert "gpt_neox.layers.0.mlp.dense_h_to_4h.bias" in stored


def test_export_refuses_what_no_architecture_holds():
    cfg = ModelConfig(positions="rope", norm="rmsnorm")  # rope, RMSNorm, GELU: no HF match
    with pytest.raises(ConfigError, match="model.mlp"):
        hf_config.export_type(cfg)


def test_sharded_checkpoint_onto_8_devices(tmp_path):
    torch.manual_seed(0)
    # Every sharded dim divides its mesh axes (vocab 96 over tensor=4: an odd vocabulary,
    # like GPT-2's 50257, needs a mesh without a tensor axis).
    cfg_hf = _config(
        "llama", vocab_size=96, num_key_value_heads=4, hidden_size=64, intermediate_size=128
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg_hf).eval()
    directory = str(tmp_path / "sharded")
    model.save_pretrained(directory, max_shard_size="20KB")
    files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    assert len(files) > 2
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        assert set(json.load(f)["weight_map"].values()) == set(files)

    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
    cfg, params, _ = import_model(directory, mesh)
    model_ = get_model(cfg)
    want = sharding.param_shardings(mesh, model_.logical_axes)
    got = jax.tree.map(lambda a: a.sharding, params)
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
    assert params["blocks"]["wq"].sharding.spec == want["blocks"]["wq"].spec
    assert len(params["blocks"]["wq"].addressable_shards) == 8
    tokens, mask, positions = _batch()
    _, single, _ = import_model(directory)
    np.testing.assert_allclose(
        _our_logits(cfg, params, tokens, mask, positions),
        _our_logits(cfg, single, tokens, mask, positions),
        atol=1e-5,
    )
    assert (
        _max_diff(
            _our_logits(cfg, params, tokens, mask, positions),
            _hf_logits(model, tokens, mask, positions),
            mask,
        )
        <= 1e-4
    )
