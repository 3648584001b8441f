"""A Hugging Face `config.json` <-> gptjax's ModelConfig, for the architectures gptjax's one
model can express: GPT-2, the Llama family (Llama 2 and 3.x, Mistral) and Qwen2/2.5.

Both spellings transformers has used are read: Hub files carry `rope_theta`,
`rope_scaling` and `torch_dtype`; transformers 5's save_pretrained writes
`rope_parameters` and `dtype`. An option the model cannot express (sliding-window
attention, mixture of experts, another rope scaling, another activation) is an error that
names the config.json field, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os

from gptjax.errors import ConfigError
from gptjax.model import ModelConfig

ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "gpt_neox": "GPTNeoXForCausalLM",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# A reward model's architecture (experiments/export.py): one score per sequence.
CLASSIFIERS = {kind: name.removesuffix("LMHeadModel").removesuffix("ForCausalLM")
               + "ForSequenceClassification" for kind, name in ARCHITECTURES.items()}  # fmt: skip
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")
# Activation names (transformers' ACT2FN) -> ModelConfig.mlp.
GELUS = {
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
    "gelu": "gelu_exact",
}


class HFConfigError(ConfigError):
    """A config.json field gptjax cannot honour; the message names the file and field."""

    def __init__(self, path: str, field: str, message: str):
        super().__init__("model.init_from", f"{path}: field {field!r} {message}")


def read(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise ConfigError("model.init_from", f"{directory}: no config.json (not a model directory)")
    with open(path) as f:
        return json.load(f)


def checkpoint_dtype(hf: dict) -> str:
    """The dtype the weights are stored in (`dtype`, or the older `torch_dtype`)."""
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    name = str(name).removeprefix("torch.")
    return name if name in CHECKPOINT_DTYPES else "float32"


def _rope(hf: dict, path: str) -> dict:
    """rope_theta and the scaling rule, from either spelling."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if "rope_parameters" in hf and not isinstance(params, dict):
        raise HFConfigError(path, "rope_parameters", "must be a mapping")
    # transformers 5 may nest per-layer-type parameters; gptjax has one attention type.
    if params and all(isinstance(v, dict) for v in params.values()):
        raise HFConfigError(path, "rope_parameters", "per layer type is not supported")
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10_000.0)))
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    # GPT-NeoX rotates a quarter of each head unless told otherwise (transformers' default).
    fraction = 0.25 if hf.get("model_type") == "gpt_neox" else 1.0
    fraction = merged.get("partial_rotary_factor", hf.get("rotary_pct", fraction))
    out = {"rope_theta": float(theta), "rope_fraction": float(fraction)}
    if kind == "default":
        return out
    if kind != "llama3":
        field = "rope_parameters" if params else "rope_scaling"
        raise HFConfigError(path, field, f"rope_type {kind!r} is not supported (default, llama3)")
    out.update(
        rope_scaling="llama3",
        rope_factor=float(merged["factor"]),
        rope_low_freq_factor=float(merged["low_freq_factor"]),
        rope_high_freq_factor=float(merged["high_freq_factor"]),
        rope_original_max_len=int(merged["original_max_position_embeddings"]),
    )
    return out


def _gelu(hf: dict, path: str, field: str, default: str) -> str:
    act = hf.get(field, default)
    if act not in GELUS:
        raise HFConfigError(path, field, f"{act!r} is not supported {sorted(GELUS)}")
    return GELUS[act]


def _gpt2(hf: dict, path: str) -> dict:
    mlp = _gelu(hf, path, "activation_function", "gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise HFConfigError(path, "scale_attn_by_inverse_layer_idx", "is not supported")
    if not hf.get("scale_attn_weights", True):
        raise HFConfigError(path, "scale_attn_weights", "false is not supported")
    d = hf["n_embd"]
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        n_kv_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        max_len=hf["n_positions"],
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp=mlp,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )


def _gpt_neox(hf: dict, path: str) -> dict:
    n = hf["num_attention_heads"]
    bias = bool(hf.get("attention_bias", True))
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=n,
        n_kv_heads=n,
        d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        positions="rope",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        mlp=_gelu(hf, path, "hidden_act", "gelu"),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        **_rope(hf, path),
    )


def _llama_like(hf: dict, path: str, kind: str) -> dict:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFConfigError(path, "hidden_act", f"{act!r} is not supported (silu)")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // n):
        raise HFConfigError(
            path,
            "head_dim",
            f"{hf['head_dim']} != hidden_size / num_attention_heads is not supported",
        )
    if kind == "qwen2":
        if hf.get("use_sliding_window"):
            raise HFConfigError(path, "use_sliding_window", "true is not supported")
        qkv_bias, out_bias, mlp_bias = True, False, False
    else:
        if kind == "mistral" and hf.get("sliding_window") is not None:
            raise HFConfigError(
                path, "sliding_window", f"{hf['sliding_window']} is not supported (null only)"
            )
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
        mlp_bias = bool(hf.get("mlp_bias", False))
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n,
        d_ff=hf["intermediate_size"],
        max_len=hf.get("max_position_embeddings", 2048),
        positions="rope",
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp="swiglu",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        out_bias=out_bias,
        mlp_bias=mlp_bias,
        **_rope(hf, path),
    )


def model_type(hf: dict, path: str) -> str:
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise HFConfigError(
            path, "model_type", f"{kind!r} is not supported (supported: {sorted(ARCHITECTURES)})"
        )
    return kind


def to_model_config(hf: dict, path: str = "config.json", **overrides) -> ModelConfig:
    """ModelConfig for a config.json's contents. Weights keep the checkpoint's dtype
    (param_dtype and compute dtype) unless `overrides` say otherwise."""
    kind = model_type(hf, path)
    if kind == "gpt2":
        fields = _gpt2(hf, path)
    elif kind == "gpt_neox":
        fields = _gpt_neox(hf, path)
    else:
        fields = _llama_like(hf, path, kind)
    dtype = checkpoint_dtype(hf)
    fields.update(param_dtype=dtype, dtype=dtype)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFConfigError(path, e.field, e.detail) from None


def _need(cfg: ModelConfig, kind: str, **want) -> None:
    for field, value in want.items():
        if getattr(cfg, field) != value:
            raise ConfigError(
                f"model.{field}",
                f"{getattr(cfg, field)!r}: the Hugging Face architecture for this model "
                f"({kind}) needs {value!r}",
            )


def export_type(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that holds a gptjax model exactly: learned positions
    -> GPT-2; rotary with LayerNorm and GELU (gptjax's CPU presets) -> GPT-NeoX; rotary with
    RMSNorm and SwiGLU -> Llama (Qwen2 with q/k/v biases alone). Anything else is a
    ConfigError naming the ModelConfig field none of them matches."""
    if cfg.positions == "learned":
        _need(cfg, "gpt2", norm="layernorm", tie_embeddings=True, parallel_residual=False)
        _need(cfg, "gpt2", n_kv_heads=cfg.n_heads)
        if cfg.mlp == "swiglu":
            raise ConfigError("model.mlp", "'swiglu': GPT-2 (learned positions) has a GELU MLP")
        return "gpt2"
    if cfg.norm == "layernorm":
        _need(cfg, "gpt_neox", n_kv_heads=cfg.n_heads, rope_scaling="none", out_bias=cfg.qkv_bias)
        if cfg.mlp == "swiglu":
            raise ConfigError("model.mlp", "'swiglu': GPT-NeoX (rope + LayerNorm) has a GELU MLP")
        return "gpt_neox"
    _need(cfg, "llama", mlp="swiglu", parallel_residual=False, rope_fraction=1.0)
    if cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias and cfg.rope_scaling == "none":
        return "qwen2"
    _need(cfg, "llama", out_bias=cfg.qkv_bias)
    return "llama"


def export_config(cfg: ModelConfig, kind: str) -> ModelConfig:
    """`cfg` with the biases architecture `kind` always stores switched on (exported as
    zeros where the model has none: the same function)."""
    always = {
        "gpt2": dict(qkv_bias=True, out_bias=True, mlp_bias=True),
        "gpt_neox": dict(mlp_bias=True),
        "qwen2": dict(qkv_bias=True),
    }.get(kind, {})
    return dataclasses.replace(cfg, **always)


def _act(cfg: ModelConfig) -> str:
    return "gelu" if cfg.mlp == "gelu_exact" else "gelu_new"


def from_model_config(cfg: ModelConfig, kind: str, base: dict | None = None, **extra) -> dict:
    """config.json contents for `cfg` as architecture `kind`. `base` (an imported model's
    own config.json) keeps every field gptjax does not own (token ids, names, ...)."""
    hf = dict(base or {})
    for key in ("rope_scaling", "rope_parameters", "torch_dtype", "rotary_pct", "rotary_emb_base"):
        hf.pop(key, None)
    hf.update(model_type=kind, architectures=[ARCHITECTURES[kind]], dtype=cfg.param_dtype)
    hf["vocab_size"] = cfg.vocab_size
    hf["tie_word_embeddings"] = cfg.tie_embeddings
    if kind == "gpt2":
        hf.update(
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.d_ff,
            n_positions=cfg.max_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=_act(cfg),
        )
        hf.update(extra)
        return hf
    hf.update(
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_len,
    )
    if kind == "gpt_neox":
        hf.update(
            layer_norm_eps=cfg.norm_eps,
            hidden_act=_act(cfg),
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=cfg.qkv_bias,
            # Both spellings: transformers 5 reads rope_parameters, older readers these.
            rotary_pct=cfg.rope_fraction,
            rotary_emb_base=cfg.rope_theta,
            rope_parameters=dict(
                rope_type="default",
                rope_theta=cfg.rope_theta,
                partial_rotary_factor=cfg.rope_fraction,
            ),
        )
        hf.update(extra)
        return hf
    hf.update(
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        rope_theta=cfg.rope_theta,
    )
    if kind == "llama":
        hf.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    if kind == "qwen2":
        hf.setdefault("use_sliding_window", False)
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = dict(
            rope_type="llama3",
            factor=cfg.rope_factor,
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    hf.update(extra)
    return hf
