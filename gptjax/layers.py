"""The layers the transformer is built of, as functions of arrays (and one small NNX
module, Norm): normalisation, rotary positions, masked attention with grouped KV heads,
the GELU with a lean backward pass, and the dense products laid out for XLA:CPU.

Shape legend: B batch, T query length, S key length, D d_model, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim, F MLP hidden, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def param_normal(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=tuple(axes))


def param_const(shape, axes, value: float, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=tuple(axes))


class Norm(nnx.Module):
    """LayerNorm or RMSNorm, computed in float32 whatever the compute dtype."""

    def __init__(self, cfg, lead_shape=(), lead_axes=()):
        pdt = DTYPES[cfg.param_dtype]
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = param_const((*lead_shape, cfg.d_model), (*lead_axes, "embed"), 1.0, pdt)
        if cfg.norm == "layernorm":
            self.bias = param_const((*lead_shape, cfg.d_model), (*lead_axes, "embed"), 0.0, pdt)

    def __call__(self, x_BxTxD):
        x = x_BxTxD.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdims=True)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.kind == "layernorm":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x_BxTxD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None):
    """Rotary inverse frequencies [H/2], float32, bit for bit as transformers computes them.

    scaling: None, or Llama 3.1's `llama3` rule as (factor, low_freq_factor,
    high_freq_factor, original_max_len): wavelengths longer than original_max_len /
    low_freq_factor are stretched by `factor`, those shorter than original_max_len /
    high_freq_factor kept, and the band between blended linearly in original_max_len /
    wavelength (transformers' `_compute_llama3_parameters`).
    """

    def default():
        return 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)

    if scaling is None:
        return default()
    # A constant of the config, computed on the host in float32 one rounding per operation
    # as torch does (inside jit XLA would fuse multiply-adds and differ in the last bit).
    with jax.ensure_compile_time_eval():
        base = np.asarray(default())
    f32 = np.float32
    factor, low, high, original = (f32(v) for v in scaling)
    wavelen = (f32(1) / base) * f32(2 * math.pi)  # torch's `scalar / t` is 1/t * scalar
    scaled = np.where(wavelen > original / low, base / factor, base)
    smooth = ((f32(1) / wavelen) * original - low) / (high - low)
    blended = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return jnp.asarray(np.where(medium, blended, scaled).astype(f32))


def rope(x_BxTxNxH, positions_BxT, inv_freq_R2):
    """Rotary position embedding (Su et al. 2021, eq. 34), half-split layout as in LLaMA, on
    the first R = 2 * len(inv_freq) dims of each head (all of them unless partial, as in
    GPT-NeoX); the other H - R dims pass unchanged."""
    r = 2 * inv_freq_R2.shape[0]
    if r < x_BxTxNxH.shape[-1]:
        x_rot, x_pass = x_BxTxNxH[..., :r], x_BxTxNxH[..., r:]
        return jnp.concatenate([rope(x_rot, positions_BxT, inv_freq_R2), x_pass], axis=-1)
    angle_BxTxR2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq_R2
    sin, cos = jnp.sin(angle_BxTxR2)[:, :, None], jnp.cos(angle_BxTxR2)[:, :, None]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


def attention_mask(q_segment_BxT, k_segment_BxS, q_index_BxT, k_index_BxS):
    """True where query t may attend to key s: causal in row index, same segment.

    Segment 0 (padding) attends only to padding, so fully padded rows stay finite.
    """
    causal = q_index_BxT[:, :, None] >= k_index_BxS[:, None, :]
    same_doc = q_segment_BxT[:, :, None] == k_segment_BxS[:, None, :]
    return causal & same_doc


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """Softmax attention with grouped KV heads; logits and softmax in float32."""
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    logits = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) * (h**-0.5)
    logits = jnp.where(mask_BxTxS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out.reshape(b, t, n, h)


ATTENTION = ("einsum", "xla", "cudnn")


def attention(impl: str, q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """Softmax attention by ModelConfig.attention: "einsum" (`attend`, any mask), "xla"
    (jax.nn.dot_product_attention's XLA path, any mask), "cudnn" (its cuDNN flash
    attention, Dao 2023, on NVIDIA GPUs). cuDNN takes causal and padding masks but not the
    segment masks of packed documents, so the caller passes mask None only for batches of
    one causal document per row (Model.__call__ without segment ids); a cudnn model given
    packed or padded rows, or decoding from its KV cache, computes the XLA path."""
    if impl == "einsum":
        return attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS)
    if mask_BxTxS is None:
        return jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, is_causal=True, implementation="cudnn"
        )
    dt = v_BxSxKxH.dtype
    out = jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None], implementation="xla"
    )
    return out.astype(dt)


@jax.custom_vjp
def gelu_tanh(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, sec. 2): jax.nn.gelu(x, True).

    The custom backward saves only x and recomputes the derivative from it. Autodiff of
    jax.nn.gelu saves five [B, T, F] intermediates per layer, and XLA:CPU fuses their
    combination into the loop that also transposes the gradient for the weight-gradient
    dot: that one loop took longer than all the MLP's matmuls.
    """
    return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    # d/dx x/2 (1 + tanh u), u = c (x + a x^3):  (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 a x^2).
    c, a = math.sqrt(2 / math.pi), 0.044715
    x = x.astype(jnp.float32)
    x2 = x * x
    t = jnp.tanh(c * x * (1 + a * x2))
    dgelu = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * a * x2)
    return ((g.astype(jnp.float32) * dgelu).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def dense(x, w, dt, n_in: int = 1):
    """x @ w contracting x's last n_in axes with w's first n_in, as one 2-D matmul.

    The einsum ("btd,df->btf", "btnh,nhd->btd") on flat [B*T, D] rows: from 3-D activations
    XLA:CPU computes each weight gradient through a transposed copy of the activation
    gradient, a strided loop slower than the matmul itself; from 2-D ones, as a plain dot.
    """
    k = math.prod(w.shape[:n_in])
    lead = x.shape[: x.ndim - n_in]
    y = x.reshape(-1, k) @ w.astype(dt).reshape(k, -1)
    return y.reshape(*lead, *w.shape[n_in:])


def apply_dropout(x, rate: float, rng):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
