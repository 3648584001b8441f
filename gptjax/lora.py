"""LoRA (Hu et al. 2021) around gptjax's train steps: what trains, merging, PEFT export.

The adapters live in the model's params (ModelConfig.lora_rank; gptjax/model.py
Block._dense computes x W + (alpha / r) x A B). Which params train is read from the tree
itself: a tree with adapters trains only its adapters and its scalar head (a reward or
value model's score_*); a tree without trains everything. `trainable(params)` is that
view, with every frozen leaf replaced by None (an empty subtree), so the train steps take
gradients of it alone and the optimizer state holds moments for it alone: the base
weights get no gradient, no moments, and keep their dtype (bf16 from a bf16 checkpoint)
while the adapters and their moments are float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import HEAD_KEYS, LORA_WEIGHTS, ModelConfig, Params

SUFFIXES = ("_lora_a", "_lora_b")


def is_adapter(name: str) -> bool:
    return name.endswith(SUFFIXES)


def has_adapters(params) -> bool:
    blocks = params.get("blocks") if isinstance(params, dict) else None
    return isinstance(blocks, dict) and any(is_adapter(k) for k in blocks)


def trainable(params):
    """The params that train: `params` itself without adapters; with adapters, a tree of
    the same structure holding the adapters and head leaves, None elsewhere. A tuple of
    trees (PPO's policy and value): each its view."""
    if isinstance(params, tuple):
        views = tuple(trainable(p) for p in params)
        return params if all(v is p for v, p in zip(views, params)) else views
    if not has_adapters(params):
        return params

    def view(tree, top: bool):
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = view(v, False)
            else:
                out[k] = v if is_adapter(k) or (top and k in HEAD_KEYS) else None
        return out

    return view(params, True)


def combine(view, params):
    """`params` with the leaves of `view` (a `trainable` view) put back in."""
    if view is params:
        return params
    if isinstance(params, tuple):
        return tuple(combine(v, p) for v, p in zip(view, params))
    if not isinstance(view, dict):
        return params if view is None else view
    return {k: combine(view.get(k), v) for k, v in params.items()}


def base(params: Params) -> Params:
    """The params without their adapters: the same arrays, a model of
    `without_adapters(cfg)`. With adapters started at zero on a merged SFT model, this is
    the RL reference, read from the policy's own state (one copy of the base weights)."""
    if not has_adapters(params):
        return params
    return {**params, "blocks": {k: v for k, v in params["blocks"].items() if not is_adapter(k)}}


def without_adapters(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, lora_rank=0)


def delta(a, b, n_in: int, scale: float):
    """(alpha / r) A B for one weight, stacked over layers: [L, *in, r] x [L, r, *out]."""
    lead, r = a.shape[: 1 + n_in], a.shape[-1]
    out = b.shape[2:]
    prod = jnp.einsum(
        "lir,lro->lio",
        a.reshape(a.shape[0], -1, r).astype(jnp.float32),
        b.reshape(b.shape[0], r, -1).astype(jnp.float32),
    )
    return scale * prod.reshape(*lead, *out)


def merge(params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
    """(params, config) of the same function without adapters: W + (alpha / r) A B, in
    W's dtype. The SFT model an RL stage starts from and takes as its reference."""
    if not cfg.lora_rank:
        return params, cfg
    scale = cfg.lora_alpha / cfg.lora_rank
    blocks = {k: v for k, v in params["blocks"].items() if not is_adapter(k)}
    for name in cfg.lora_target_set:
        w = blocks[name]
        d = delta(
            params["blocks"][name + "_lora_a"],
            params["blocks"][name + "_lora_b"],
            LORA_WEIGHTS[name],
            scale,
        )
        blocks[name] = (w.astype(jnp.float32) + d).astype(w.dtype)
    return {**params, "blocks": blocks}, without_adapters(cfg)


def add_adapters(params: Params, cfg: ModelConfig, rng, shardings=None) -> Params:
    """Fresh adapters (A random, B zero) on top of `params` (a model without them) for
    `cfg` (with lora_rank): the model's function is unchanged. Only the adapters are
    computed (under jit, the base weights' init is dead code), placed with `shardings`
    (the full params' shardings tree) when given."""
    from gptjax.model import get_model

    def adapters(key):
        blocks = get_model(cfg).init(key)["blocks"]
        return {k: v for k, v in blocks.items() if is_adapter(k)}

    out = None
    if shardings is not None:
        out = {k: v for k, v in shardings["blocks"].items() if is_adapter(k)}
    fresh = jax.jit(adapters, out_shardings=out)(rng)
    return {**params, "blocks": {**params["blocks"], **fresh}}


# PEFT's module names for gptjax's weights, per Hugging Face architecture (where one
# gptjax weight is one nn.Linear; GPT-2's and GPT-NeoX's fused q/k/v have no such module).
PEFT_MODULES = {
    "llama": {
        "wq": "self_attn.q_proj",
        "wk": "self_attn.k_proj",
        "wv": "self_attn.v_proj",
        "wo": "self_attn.o_proj",
        "w_gate": "mlp.gate_proj",
        "w_up": "mlp.up_proj",
        "w_down": "mlp.down_proj",
    }
}
PEFT_MODULES["mistral"] = PEFT_MODULES["qwen2"] = PEFT_MODULES["llama"]


def peft_adapter(params: Params, cfg: ModelConfig, kind: str, base_path: str = ""):
    """(tensors, adapter_config) in PEFT's LoRA format: per layer and module,
    `base_model.model.model.layers.{i}.{module}.lora_A.weight` [r, in] and `lora_B.weight`
    [out, r] (nn.Linear's [out, in] convention)."""
    if kind not in PEFT_MODULES:
        raise ValueError(
            f"PEFT export needs one nn.Linear per adapted weight; {kind} fuses q/k/v "
            "(export the merged model instead)"
        )
    modules = PEFT_MODULES[kind]
    blocks = jax.device_get(params["blocks"])
    tensors = {}
    for name in sorted(cfg.lora_target_set):
        a, b = np.asarray(blocks[name + "_lora_a"]), np.asarray(blocks[name + "_lora_b"])
        n_in = LORA_WEIGHTS[name]
        for i in range(cfg.n_layers):
            prefix = f"base_model.model.model.layers.{i}.{modules[name]}"
            a_i = a[i].reshape(math.prod(a.shape[1 : 1 + n_in]), cfg.lora_rank)
            b_i = b[i].reshape(cfg.lora_rank, -1)
            tensors[prefix + ".lora_A.weight"] = np.ascontiguousarray(a_i.T)
            tensors[prefix + ".lora_B.weight"] = np.ascontiguousarray(b_i.T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(modules[n].split(".")[-1] for n in cfg.lora_target_set),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": base_path,
        "inference_mode": True,
    }
    return tensors, config
