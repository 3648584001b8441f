"""Decoder-only transformer in Flax NNX, used pure-functionally.

One model, configurable between GPT-2 conventions (learned positions, LayerNorm, GELU,
tied unembedding, multi-head attention) and LLaMA conventions (rotary positions, RMSNorm,
SwiGLU, separate unembedding, grouped KV heads). The NNX module is built once to get a
graphdef; training code holds only a params pytree (a nested dict of arrays) and calls
`Model.apply(params, tokens, ...)`, so every train step is a pure function of arrays.

The layer weights are always stored stacked along a leading `layers` axis. `scan_layers`
only chooses how they are applied (one `lax.scan` vs an unrolled Python loop), so a
checkpoint is valid under both, and "scan == unrolled" is a test of one set of params.

Every weight carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`,
`layers`, `pos`) in its `logical_axes` metadata; `gptjax.sharding` maps them to the mesh.

Shape legend:
  B batch, T query length, S key length, D d_model, N query heads, K kv heads,
  G = N // K query heads per kv head, H head dim, F MLP hidden, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import from_dict, need
from gptjax.data import tokenizer as tok_lib
from gptjax.errors import ConfigError
from gptjax.layers import (
    ATTENTION,
    DTYPES,
    Norm,
    apply_dropout,
    attention,
    attention_mask,
    dense,
    gelu_tanh,
    param_const,
    param_normal,
    rope,
    rope_inv_freq,
)
from gptjax.sharding import constrain

Params = dict[str, Any]
# Logical axes of the activations (gptjax/sharding.py RULES shards them).
BTD = ("batch", "length", "embed")
BTNH = ("batch", "length", "heads", "kv")
BSKH = ("batch", "length", "kv_heads", "kv")
BTF = ("batch", "length", "mlp")

REMAT_POLICIES = {
    "none": None,
    # Recompute everything in the backward pass: least memory.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keep matmul outputs, recompute the cheap elementwise ops (MaxText's common choice).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, between GPT-2 and LLaMA conventions. The presets are in configs/model.py."""

    vocab_size: int = 512  # padded vocabulary (a multiple of 128 on TPU: matmul tiles)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads: = n_heads is MHA, fewer is grouped-query
    d_ff: int = 512  # MLP hidden size
    max_len: int = 64  # longest sequence (sizes the learned position table)
    positions: str = "learned"  # learned (GPT-2) | rope (LLaMA)
    rope_theta: float = 10_000.0
    # Rotary frequency scaling: none | llama3 (Llama 3.1+; gptjax/layers.py rope_inv_freq),
    # with that rule's four numbers as Hugging Face's rope_scaling names them.
    rope_scaling: str = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm (LLaMA)
    norm_eps: float = 1e-5
    # gelu (GPT-2, tanh approximation) | gelu_exact (erf: GPT-NeoX/Pythia) | swiglu (LLaMA)
    mlp: str = "gelu"
    # Fraction of each head's dims that rotary positions rotate (the first ones; GPT-NeoX's
    # partial_rotary_factor, 0.25 in Pythia); the rest carry no position.
    rope_fraction: float = 1.0
    # x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX, GPT-J) instead of one after the other.
    parallel_residual: bool = False
    tie_embeddings: bool = True  # unembedding = embedding^T (GPT-2) or its own matrix
    # Biases, off in gptjax's own models, on where an imported checkpoint has them:
    qkv_bias: bool = False  # query/key/value projections (GPT-2, Qwen2)
    out_bias: bool = False  # attention output projection (GPT-2)
    mlp_bias: bool = False  # MLP projections (GPT-2)
    head: str = "lm"  # lm (logits over the vocabulary) | scalar (a value per position)
    dropout: float = 0.0  # on embeddings and residual branches
    # LoRA (Hu et al. 2021): rank-r adapters A [in, r] (random) and B [r, out] (zero) on the
    # named dense weights, y = x W + (alpha / r) x A B. Only adapters (and a reward or
    # value head) train; the base weights are frozen (gptjax/lora.py). 0 = no adapters.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wk,wv,wo,w_gate,w_up,w_down"  # comma-separated weight names
    init_std: float = 0.02
    # Storage and compute dtypes: float32 on CPU (XLA:CPU bf16 matmuls are slower than
    # fp32), bfloat16 compute on TPU.
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True  # one lax.scan over layers (fast compiles) or unrolled
    # einsum (gptjax's own, any mask) | xla | cudnn (flash attention on NVIDIA GPUs, for
    # batches of one document per row; others take the xla path): layers.attention.
    attention: str = "einsum"
    remat: str = "none"  # none | dots | full: recomputation in the backward pass

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def lora_target_set(self) -> frozenset[str]:
        if self.lora_rank == 0:
            return frozenset()
        names = {n.strip() for n in self.lora_targets.split(",") if n.strip()}
        return frozenset(
            names & set(LORA_WEIGHTS) - ({"w_gate"} if self.mlp != "swiglu" else set())
        )

    @property
    def rope_dims(self) -> int:
        """How many leading dims of each head rotary positions rotate (HF's rotary_ndims)."""
        return int(self.head_dim * self.rope_fraction)

    def rope_inv_freq(self):
        scaling = None
        if self.rope_scaling == "llama3":
            scaling = (
                self.rope_factor,
                self.rope_low_freq_factor,
                self.rope_high_freq_factor,
                self.rope_original_max_len,
            )
        return rope_inv_freq(self.rope_dims, self.rope_theta, scaling)

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_len",
        ):
            value = getattr(self, name)
            need(
                isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}"
            )
        need(
            self.d_model % self.n_heads == 0,
            "n_heads",
            f"n_heads={self.n_heads} must divide d_model={self.d_model}",
        )
        need(
            self.n_heads % self.n_kv_heads == 0,
            "n_kv_heads",
            f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}",
        )
        need(
            self.positions in ("learned", "rope"),
            "positions",
            f"{self.positions!r} not in learned|rope",
        )
        need(
            self.positions != "rope" or self.head_dim % 2 == 0,
            "positions",
            f"rope needs an even head dim, got d_model/n_heads={self.head_dim}",
        )
        need(
            self.rope_scaling in ("none", "llama3"),
            "rope_scaling",
            f"{self.rope_scaling!r} not in none|llama3",
        )
        need(
            self.rope_scaling == "none"
            or (self.rope_factor >= 1.0 and self.rope_high_freq_factor > self.rope_low_freq_factor),
            "rope_scaling",
            "llama3 needs rope_factor >= 1 and rope_high_freq_factor > rope_low_freq_factor",
        )
        need(
            self.norm in ("layernorm", "rmsnorm"), "norm", f"{self.norm!r} not in layernorm|rmsnorm"
        )
        need(
            self.mlp in ("gelu", "gelu_exact", "swiglu"),
            "mlp",
            f"{self.mlp!r} not in gelu|gelu_exact|swiglu",
        )
        need(
            0 < self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0,
            "rope_fraction",
            f"{self.rope_fraction} of head dim {self.head_dim} must be a positive even count",
        )
        need(self.head in ("lm", "scalar"), "head", f"{self.head!r} not in lm|scalar")
        need(
            self.attention in ATTENTION,
            "attention",
            f"{self.attention!r} not in {'|'.join(ATTENTION)}",
        )
        need(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        need(
            self.param_dtype in DTYPES, "param_dtype", f"{self.param_dtype!r} not in {list(DTYPES)}"
        )
        need(self.dtype in DTYPES, "dtype", f"{self.dtype!r} not in {list(DTYPES)}")
        need(
            isinstance(self.lora_rank, int) and self.lora_rank >= 0,
            "lora_rank",
            f"must be an int >= 0, got {self.lora_rank!r}",
        )
        unknown = {n.strip() for n in self.lora_targets.split(",") if n.strip()} - set(LORA_WEIGHTS)
        need(
            not unknown,
            "lora_targets",
            f"unknown weight(s) {sorted(unknown)}; choose from {list(LORA_WEIGHTS)}",
        )
        need(
            self.lora_rank == 0 or self.lora_target_set,
            "lora_targets",
            "names no weight this model has",
        )
        need(self.remat in REMAT_POLICIES, "remat", f"{self.remat!r} not in {list(REMAT_POLICIES)}")


def _b(bias, dt):
    return bias[...].astype(dt)


# The scalar head's params (head="scalar": a reward or value model).
HEAD_KEYS = ("score_w", "score_b", "score_logp")
# Dense weights LoRA can adapt -> how many leading axes of the weight are its input.
LORA_WEIGHTS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}


class Block(nnx.Module):
    """Pre-norm transformer block. Built with a leading `layers` axis of size n_layers;
    called on one layer's slice of its params (see Transformer._blocks)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        L, D, N, K, H, F = (
            cfg.n_layers,
            cfg.d_model,
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.head_dim,
            cfg.d_ff,
        )
        std = cfg.init_std
        # GPT-2: residual projections scaled by 1/sqrt(2L) so the stream's variance stays O(1).
        out_std = std / math.sqrt(2 * L)
        self.cfg = cfg
        self.attn_norm = Norm(cfg, (L,), ("layers",))
        self.wq = param_normal(rngs, (L, D, N, H), ("layers", "embed", "heads", "kv"), std, pdt)
        self.wk = param_normal(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "kv"), std, pdt)
        self.wv = param_normal(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "kv"), std, pdt)
        self.wo = param_normal(rngs, (L, N, H, D), ("layers", "heads", "kv", "embed"), out_std, pdt)
        self.mlp_norm = Norm(cfg, (L,), ("layers",))
        if cfg.mlp == "swiglu":
            self.w_gate = param_normal(rngs, (L, D, F), ("layers", "embed", "mlp"), std, pdt)
        self.w_up = param_normal(rngs, (L, D, F), ("layers", "embed", "mlp"), std, pdt)
        self.w_down = param_normal(rngs, (L, F, D), ("layers", "mlp", "embed"), out_std, pdt)
        # Biases start at zero and take no random draws: a config without them initialises
        # exactly as before they existed.
        if cfg.qkv_bias:
            self.bq = param_const((L, N, H), ("layers", "heads", "kv"), 0.0, pdt)
            self.bk = param_const((L, K, H), ("layers", "kv_heads", "kv"), 0.0, pdt)
            self.bv = param_const((L, K, H), ("layers", "kv_heads", "kv"), 0.0, pdt)
        if cfg.out_bias:
            self.bo = param_const((L, D), ("layers", "embed"), 0.0, pdt)
        if cfg.mlp_bias:
            if cfg.mlp == "swiglu":
                self.b_gate = param_const((L, F), ("layers", "mlp"), 0.0, pdt)
            self.b_up = param_const((L, F), ("layers", "mlp"), 0.0, pdt)
            self.b_down = param_const((L, D), ("layers", "embed"), 0.0, pdt)

    def add_lora(self, rngs: nnx.Rngs):
        """The LoRA adapters of cfg.lora_target_set. Called after every base weight of the
        model is drawn, so one seed gives the same base weights with and without them."""
        cfg, L = self.cfg, self.cfg.n_layers
        for name in sorted(cfg.lora_target_set):
            w = getattr(self, name)
            n_in = LORA_WEIGHTS[name]
            shape, axes = w.shape[1:], w.get_metadata()["logical_axes"][1:]
            fan_in = math.prod(shape[:n_in])
            # A as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))), B = 0:
            # the adapted model starts equal to the base model.
            a = jax.random.uniform(
                rngs.params(),
                (L, *shape[:n_in], cfg.lora_rank),
                jnp.float32,
                -1 / math.sqrt(fan_in),
                1 / math.sqrt(fan_in),
            )
            lora_axes = ("layers", *axes[:n_in], "lora")
            setattr(self, name + "_lora_a", nnx.Param(a, logical_axes=lora_axes))
            b_axes = ("layers", "lora", *axes[n_in:])
            b = param_const((L, cfg.lora_rank, *shape[n_in:]), b_axes, 0.0, jnp.float32)
            setattr(self, name + "_lora_b", b)

    def _dense(self, x, name: str, dt):
        """x @ W, plus the LoRA path (alpha / r) (x @ A) @ B when `name` is adapted: never
        merged into W, so W's gradient is never formed."""
        n_in = LORA_WEIGHTS[name]
        y = dense(x, getattr(self, name)[...], dt, n_in=n_in)
        if name in self.cfg.lora_target_set:
            a = getattr(self, name + "_lora_a")[...]
            b = getattr(self, name + "_lora_b")[...]
            scale = self.cfg.lora_alpha / self.cfg.lora_rank
            y = y + scale * dense(dense(x, a, dt, n_in=n_in), b, dt)
        return y

    def __call__(
        self, x_BxTxD, mask_BxTxS, positions_BxT, rng=None, kv_cache=None, cache_index=None
    ):
        """One layer. With kv_cache=(k, v, layer), this layer's new keys and values are
        written into its cache at cache_index and attention runs over the layer's whole
        cache; returns (x, (k, v)) then. k and v are the stacked [L, B, K, S, H] caches
        (scanned layers, `layer` a traced index) or this layer's own [B, K, S, H] (unrolled
        layers, `layer` None)."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        rng_attn, rng_mlp = jax.random.split(rng) if rng is not None else (None, None)
        h = self.attn_norm(x_BxTxD)
        q = self._dense(h, "wq", dt)
        k = self._dense(h, "wk", dt)
        v = self._dense(h, "wv", dt)
        if cfg.qkv_bias:
            q, k, v = q + _b(self.bq, dt), k + _b(self.bk, dt), v + _b(self.bv, dt)
        if cfg.positions == "rope":
            inv_freq_H2 = cfg.rope_inv_freq()
            q, k = rope(q, positions_BxT, inv_freq_H2), rope(k, positions_BxT, inv_freq_H2)
        q = constrain(q, BTNH)
        if kv_cache is not None:
            # In place inside the decode loop: XLA aliases a loop carry updated by
            # dynamic_update_slice, so no step copies the cache.
            # The cache is [.., B, K, S, H]: a layer's keys and values are then laid out as
            # the attention dots read them (batch dims B, K first), so reading a layer's
            # slice of the stacked cache is a plain copy, not a transposing one ([L, B, S,
            # K, H] made each decode step transpose every layer's whole cache; BUILD.md,
            # Benchmarks). A layer's own cache (unrolled layers) is read with no copy.
            k_cache, v_cache, layer = kv_cache
            k_cache, k = _write_and_read(k_cache, k, layer, cache_index)
            v_cache, v = _write_and_read(v_cache, v, layer, cache_index)
            kv_cache = (k_cache, v_cache)
        k, v = constrain(k, BSKH), constrain(v, BSKH)
        a = constrain(attention(cfg.attention, q, k, v, mask_BxTxS), BTNH)
        out = self._dense(a, "wo", dt)
        if cfg.out_bias:
            out = out + _b(self.bo, dt)
        attn_out = apply_dropout(out, cfg.dropout, rng_attn)
        if cfg.parallel_residual:
            h = self.mlp_norm(x_BxTxD)
        else:
            x_BxTxD = constrain(x_BxTxD + attn_out, BTD)
            h = self.mlp_norm(x_BxTxD)
        up_BxTxF = self._dense(h, "w_up", dt)
        if cfg.mlp_bias:
            up_BxTxF = up_BxTxF + _b(self.b_up, dt)
        if cfg.mlp == "swiglu":
            gate = self._dense(h, "w_gate", dt)
            if cfg.mlp_bias:
                gate = gate + _b(self.b_gate, dt)
            up_BxTxF = jax.nn.silu(gate) * up_BxTxF
        elif cfg.mlp == "gelu_exact":
            up_BxTxF = jax.nn.gelu(up_BxTxF, approximate=False)
        else:
            # tanh approximation: on XLA:CPU exact erf costs about half the MLP throughput.
            up_BxTxF = gelu_tanh(up_BxTxF)
        out = self._dense(constrain(up_BxTxF, BTF), "w_down", dt)
        if cfg.mlp_bias:
            out = out + _b(self.b_down, dt)
        mlp_out = apply_dropout(out, cfg.dropout, rng_mlp)
        if cfg.parallel_residual:
            x_BxTxD = constrain(mlp_out + attn_out + x_BxTxD, BTD)
        else:
            x_BxTxD = constrain(x_BxTxD + mlp_out, BTD)
        return x_BxTxD if kv_cache is None else (x_BxTxD, kv_cache)


def _write_and_read(cache, new_BxTxKxH, layer, index):
    """(cache with new_BxTxKxH written at position `index`, the layer's whole cache as
    [B, S, K, H]); `cache` stacked over layers ([L, B, K, S, H], `layer` an index) or one
    layer's own ([B, K, S, H], `layer` None)."""
    new = jnp.swapaxes(new_BxTxKxH, 1, 2).astype(cache.dtype)
    if layer is None:
        cache = jax.lax.dynamic_update_slice(cache, new, (0, 0, index, 0))
        return cache, jnp.swapaxes(cache, 1, 2)
    cache = jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, index, 0))
    return cache, jnp.swapaxes(jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False), 1, 2)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.embed = param_normal(
            rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt
        )
        if cfg.positions == "learned":
            self.pos_embed = param_normal(
                rngs, (cfg.max_len, cfg.d_model), ("pos", "embed"), cfg.init_std, pdt
            )
        self.blocks = Block(cfg, rngs)
        self.final_norm = Norm(cfg)
        if cfg.head == "lm" and not cfg.tie_embeddings:
            self.unembed = param_normal(
                rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt
            )
        if cfg.head == "scalar":
            self.score_w = param_const((cfg.d_model,), ("embed",), 0.0, pdt)
            self.score_b = param_const((), (), 0.0, pdt)
            # Weight of an input the head does not compute itself: a reward model may add
            # score_logp x (the reference model's mean log-prob of the reply), see
            # gptjax/reward_model.py. Zero, and so inert, unless an RM is trained with it.
            self.score_logp = param_const((), (), 0.0, pdt)
        if cfg.lora_rank:
            self.blocks.add_lora(rngs)

    def _blocks(self, x_BxTxD, mask_BxTxS, positions_BxT, rng):
        cfg = self.cfg
        graphdef, stacked = nnx.split(self.blocks)

        def layer(x, layer_params, layer_rng):
            return nnx.merge(graphdef, layer_params)(x, mask_BxTxS, positions_BxT, layer_rng)

        policy = REMAT_POLICIES[cfg.remat]
        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not cfg.scan_layers)
        rngs_L = jax.random.split(rng, cfg.n_layers) if rng is not None else None
        if cfg.scan_layers:

            def body(x, xs):
                layer_params, layer_rng = xs
                return layer(x, layer_params, layer_rng), None

            x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, (stacked, rngs_L))
        else:
            for i in range(cfg.n_layers):
                layer_params = jax.tree.map(lambda a, i=i: a[i], stacked)
                x_BxTxD = layer(x_BxTxD, layer_params, None if rngs_L is None else rngs_L[i])
        return x_BxTxD

    def _embed(self, tokens_BxT, positions_BxT, rng=None):
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        x_BxTxD = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
        if cfg.positions == "learned":
            x_BxTxD = x_BxTxD + jnp.take(self.pos_embed[...], positions_BxT, axis=0).astype(dt)
        return constrain(apply_dropout(x_BxTxD, cfg.dropout, rng), BTD)

    def _head(self, x_BxTxD):
        h_BxTxD = self.final_norm(x_BxTxD)
        if self.cfg.head == "scalar":
            return _scalar_head(h_BxTxD, self.score_w[...], self.score_b[...])
        return self._lm_head(h_BxTxD)

    def _lm_head(self, h_BxTxD):
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        unembed_DxV = self.embed[...].T if cfg.tie_embeddings else self.unembed[...]
        logits_BxTxV = jnp.einsum(
            "btd,dv->btv", h_BxTxD, unembed_DxV.astype(dt), preferred_element_type=jnp.float32
        )
        return constrain(logits_BxTxV, ("batch", "length", "vocab"))

    def lm_and_values(self, tokens_BxT, segment_ids_BxT, positions_BxT, score_w, score_b):
        """(logits_BxTxV, values_BxT) from one pass of the trunk: the LM head and a scalar
        head (score_w, score_b) on the same final hidden states (PPO's value head on the
        policy, value_from="head"). The same values as a scalar-head model with this trunk."""
        b, t = tokens_BxT.shape
        index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mask = attention_mask(segment_ids_BxT, segment_ids_BxT, index_BxT, index_BxT)
        x_BxTxD = self._embed(tokens_BxT, positions_BxT)
        h_BxTxD = self.final_norm(self._blocks(x_BxTxD, mask, positions_BxT, None))
        return self._lm_head(h_BxTxD), _scalar_head(h_BxTxD, score_w, score_b)

    def __call__(self, tokens_BxT, segment_ids_BxT=None, positions_BxT=None, rng=None, cache=None):
        """Returns float32 logits_BxTxV (head='lm') or values_BxT (head='scalar').

        segment_ids: documents packed in one row do not attend to each other (0 = padding).
        positions: restart at 0 per document; default 0..T-1.
        rng: dropout key; None means deterministic (eval, sampling, PPO scoring).
        cache: a KV cache from `init_cache`; the T tokens are written at cache["index"] and
          attend to everything cached before them. Returns (outputs, new cache) then.
        """
        b, t = tokens_BxT.shape
        index_BxT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # No segment ids: one causal document per row, the layout cuDNN's flash attention
        # takes (attention="cudnn", mask None); packed or padded rows need the full mask.
        one_doc = segment_ids_BxT is None and cache is None and self.cfg.attention == "cudnn"
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones((b, t), jnp.int32)
        if positions_BxT is None:
            positions_BxT = index_BxT
        if cache is not None:
            return self._cached(tokens_BxT, segment_ids_BxT, positions_BxT, cache)
        mask = None
        if not one_doc:
            mask = attention_mask(segment_ids_BxT, segment_ids_BxT, index_BxT, index_BxT)
        rng_embed, rng_blocks = jax.random.split(rng) if rng is not None else (None, None)
        x_BxTxD = self._embed(tokens_BxT, positions_BxT, rng_embed)
        x_BxTxD = self._blocks(x_BxTxD, mask, positions_BxT, rng_blocks)
        return self._head(x_BxTxD)

    def _cached(self, tokens_BxT, segment_ids_BxT, positions_BxT, cache):
        """Prefill (T = prompt length) or decode (T = 1) against the KV cache.

        Scanned layers (scan_layers; one compiled layer, so a 96-layer model's sampler
        compiles like a 1-layer one) keep one cache stacked over layers like the weights,
        each layer writing its new keys and values into it in place (a loop carry) and
        reading its slice back out, a copy of the layer's whole cache at every step.
        Unrolled layers keep one cache per layer, read in place, and take their weights
        from cache["layers"] when the sampler put them there (Model.with_layer_weights).
        """
        b, t = tokens_BxT.shape
        index = cache["index"]
        seg_BxS = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BxT, (0, index))
        s = seg_BxS.shape[1]
        q_index = index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        # Causality also hides the cache slots not written yet (k_index > q_index).
        mask = attention_mask(segment_ids_BxT, seg_BxS, q_index, k_index)
        x_BxTxD = self._embed(tokens_BxT, positions_BxT)
        graphdef, stacked = nnx.split(self.blocks)

        def layer(carry, xs):
            x, k_all, v_all = carry
            layer_params, i = xs
            block = nnx.merge(graphdef, layer_params)
            x, (k_all, v_all) = block(x, mask, positions_BxT, None, (k_all, v_all, i), index)
            return (x, k_all, v_all), None

        if self.cfg.scan_layers:
            layers = jnp.arange(self.cfg.n_layers, dtype=jnp.int32)
            carry = (x_BxTxD, cache["k"], cache["v"])
            (x_BxTxD, k, v), _ = jax.lax.scan(layer, carry, (stacked, layers))
        else:
            k, v = list(cache["k"]), list(cache["v"])
            weights = cache.get("layers") or _unstack(stacked, self.cfg.n_layers)
            for i in range(self.cfg.n_layers):
                (x_BxTxD, k[i], v[i]), _ = layer((x_BxTxD, k[i], v[i]), (weights[i], None))
            k, v = tuple(k), tuple(v)
        new_cache = {**cache, "k": k, "v": v, "segment_ids": seg_BxS, "index": index + t}
        return self._head(x_BxTxD), new_cache


def _unstack(stacked, n_layers: int) -> tuple:
    """The layers' weights, one tree per layer, from the tree stacked over layers."""
    return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n_layers))


def _scalar_head(h_BxTxD, w_D, b):
    w = w_D.astype(jnp.float32)
    values_BxT = h_BxTxD.astype(jnp.float32) @ w + b.astype(jnp.float32)
    return constrain(values_BxT, ("batch", "length"))


def _logical_axes(state) -> Params:
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.get_metadata()["logical_axes"],
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


class Model:
    """The pure-functional face of `Transformer`: params in, logits (or values) out."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
        self.graphdef, state = nnx.split(abstract)
        # Shapes and dtypes only: nothing is allocated until `init` runs (under jit).
        self.abstract_params: Params = nnx.to_pure_dict(state)
        # Same tree as params, each leaf a tuple of logical axis names.
        self.logical_axes: Params = _logical_axes(state)

    # A Model is its config: equal configs give equal (and equally hashed) models, so a
    # jitted function taking the model as a static argument compiles once per config,
    # not once per loaded stage (evaluation answers with several stages' params).
    def __eq__(self, other):
        return isinstance(other, Model) and other.cfg == self.cfg

    def __hash__(self):
        return hash(self.cfg)

    def init(self, rng: jax.Array) -> Params:
        return nnx.to_pure_dict(nnx.state(Transformer(self.cfg, nnx.Rngs(params=rng))))

    def apply(
        self,
        params: Params,
        tokens_BxT,
        segment_ids_BxT=None,
        positions_BxT=None,
        rng=None,
        cache=None,
    ):
        """Outputs for tokens_BxT; with a cache, (outputs, new cache) (see Transformer)."""
        model = nnx.merge(self.graphdef, params)
        return model(tokens_BxT, segment_ids_BxT, positions_BxT, rng, cache)

    def apply_lm_and_values(self, params: Params, head: Params, tokens_BxT, segment_ids_BxT,
                            positions_BxT):  # fmt: skip
        """(logits, values) of an LM with a scalar head `head` (score_w, score_b) on its
        own trunk, the trunk computed once (Transformer.lm_and_values)."""
        model = nnx.merge(self.graphdef, params)
        return model.lm_and_values(
            tokens_BxT, segment_ids_BxT, positions_BxT, head["score_w"], head["score_b"]
        )

    def init_cache(self, batch: int, length: int):
        """An empty KV cache for `batch` rows of up to `length` tokens (prompt + new): keys
        and values [L, B, K, S, H], stacked over layers like the weights (scan_layers), or
        L arrays [B, K, S, H], one per layer (unrolled layers)."""
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        dt = DTYPES[cfg.dtype]
        if cfg.scan_layers:
            k = v = jnp.zeros((cfg.n_layers, *shape), dt)
        else:
            k = v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
        return {
            "k": k,
            "v": v,
            "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }

    def with_layer_weights(self, params: Params, cache: dict) -> dict:
        """`cache` with the unrolled layers' weights sliced out of their stack, once per
        sampling call: inside the decode loop each step would slice (copy) them again, XLA
        not hoisting the slices out of the while loop (BUILD.md, Benchmarks). Costs one
        more copy of the blocks' weights while sampling. Scanned layers: `cache` as is."""
        if self.cfg.scan_layers:
            return cache
        _, stacked = nnx.split(nnx.merge(self.graphdef, params).blocks)
        return {**cache, "layers": _unstack(stacked, self.cfg.n_layers)}

    def param_count(self, include_embeddings: bool = True) -> int:
        leaves = jax.tree_util.tree_leaves_with_path(self.abstract_params)
        n = 0
        for path, leaf in leaves:
            name = jax.tree_util.keystr(path)
            if not include_embeddings and ("pos_embed" in name):
                continue
            n += math.prod(leaf.shape)
        return n


def from_pipeline(config, tokenizer_vocab: int | None = None, head: str = "lm") -> ModelConfig:
    """The model section of a pipeline config with its vocabulary resolved: vocab_size 0 is
    the tokenizer's size (`tokenizer_vocab`, default config.tokenizer.vocab_size, the size
    it will be trained to) padded to config.tokenizer.pad_vocab_to."""
    fields = config.model.to_dict()
    init_from = fields.pop("init_from", "")
    # With init_from, the dtypes the config asks for (empty: the checkpoint's).
    dtypes = {
        "param_dtype": fields.pop("init_param_dtype", ""),
        "dtype": fields.pop("init_dtype", ""),
    }
    if init_from:
        asked = {k: v for k, v in dtypes.items() if v}
        return _from_checkpoint(init_from, fields, tokenizer_vocab, head, asked)
    vocab = config.tokenizer.vocab_size if tokenizer_vocab is None else tokenizer_vocab
    if fields["vocab_size"] == 0:
        fields["vocab_size"] = tok_lib.padded_vocab_size(vocab, config.tokenizer.pad_vocab_to)
    else:
        try:
            tok_lib.check_vocab(vocab, fields["vocab_size"])
        except ValueError as e:
            raise ConfigError("model.vocab_size", str(e)) from None
    fields["head"] = head
    return from_dict(ModelConfig, fields, "model")


# The model fields a run from a checkpoint still takes from its config (how to compute,
# and the LoRA adapters to add): everything else is the checkpoint's.
FROM_CHECKPOINT_KEEPS = (
    "remat",
    "scan_layers",
    "dropout",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
)


def checkpoint_dir(init_from: str) -> str:
    """The directory of model.init_from ("hf:DIR"), checked to hold a config.json."""
    if not init_from.startswith("hf:"):
        raise ConfigError("model.init_from", f"expected hf:/path/to/dir, got {init_from!r}")
    directory = init_from[3:]
    if not os.path.exists(os.path.join(directory, "config.json")):
        raise ConfigError("model.init_from", f"{directory}: no config.json there")
    return directory


def _from_checkpoint(
    init_from: str, fields: dict, tokenizer_vocab, head: str, dtypes: dict
) -> ModelConfig:
    from gptjax.hf import config as hf_config

    directory = checkpoint_dir(init_from)
    keep = {k: fields[k] for k in FROM_CHECKPOINT_KEEPS}
    keep.update(dtypes)
    cfg = hf_config.to_model_config(
        hf_config.read(directory), f"{directory}/config.json", head=head, **keep
    )
    if tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
        raise ConfigError(
            "model.init_from",
            f"the tokenizer has {tokenizer_vocab} ids, the model's embedding {cfg.vocab_size}",
        )
    return cfg


@functools.cache
def _cached_model(cfg: ModelConfig) -> Model:
    return Model(cfg)


def get_model(cfg: ModelConfig) -> Model:
    """One Model per config: its graphdef is reused, so jitted steps are built once."""
    return _cached_model(cfg)
