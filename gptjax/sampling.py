"""Generation.

`greedy_uncached` re-runs the full forward pass for every new token inside one jitted
`lax.fori_loop`: simple and obviously correct, used for the samples printed after
pretraining and as the baseline the KV-cache sampler is benchmarked against.

Shape legend: B batch, P prompt length (left-padded), N new tokens, T = P + N, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.model import Model


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[B, P] tokens right-aligned so every prompt ends at column P-1, and their mask."""
    p = max(len(x) for x in prompts)
    tokens = np.full((len(prompts), p), pad_id, np.int32)
    mask = np.zeros((len(prompts), p), np.int32)
    for i, x in enumerate(prompts):
        tokens[i, p - len(x):] = x
        mask[i, p - len(x):] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def greedy_uncached(model: Model, params, prompt_BxP, prompt_mask_BxP, max_new_tokens: int,
                    eos_id: int = 1):
    """Greedy decoding with a full forward pass per token. Returns tokens_BxN, done_B.

    Left padding is segment 0 and real tokens segment 1, so pads are never attended to;
    positions count real tokens only, so a padded prompt is scored as if unpadded.
    """
    b, p = prompt_BxP.shape
    t = p + max_new_tokens
    tokens = jnp.zeros((b, t), jnp.int32).at[:, :p].set(prompt_BxP)
    seg = jnp.ones((b, t), jnp.int32).at[:, :p].set(prompt_mask_BxP)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)

    def body(i, carry):
        tokens, done = carry
        logits = model.apply(params, tokens, seg, positions)
        nxt = jnp.argmax(logits[:, p + i - 1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, 0, nxt)
        tokens = tokens.at[:, p + i].set(nxt)
        return tokens, done | (nxt == eos_id)

    tokens, done = jax.lax.fori_loop(0, max_new_tokens, body,
                                     (tokens, jnp.zeros((b,), jnp.bool_)))
    return tokens[:, p:], done
