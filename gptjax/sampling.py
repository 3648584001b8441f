"""Batched generation with a KV cache.

`generate`: one prefill over the left-padded prompts fills a cache sized to prompt + new
tokens, then a jitted `lax.while_loop` decodes one token per step and stops as soon as
every row has emitted EOS (or at the length limit). Greedy, temperature, top-k, top-p;
per-row seeds; returns tokens, their log-probs under the sampling policy, and a mask.
`generate_uncached` is the same loop re-running the full forward pass for every token:
the obviously-correct reference the cached sampler is tested and benchmarked against.
`greedy_completions` continues raw text prompts (fact probes, stage samples).

Left padding is segment 0 and real tokens segment 1, so pads are never attended to;
positions count real tokens only, so a padded prompt is scored as if unpadded.

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
        tokens[i, p - len(x) :] = x
        mask[i, p - len(x) :] = 1
    return tokens, mask


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
    """Top-k then nucleus (top-p) truncation: excluded logits become -inf.

    top_k = 0 and top_p = 1 keep everything. Top-p keeps the smallest set of tokens whose
    probability reaches top_p (Holtzman et al. 2020), always including the most likely.
    """
    neg = jnp.finfo(logits_BxV.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth, neg, logits_BxV)
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep a token if the mass strictly before it is < top_p.
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff, neg, logits_BxV)
    return logits_BxV


def choose(logits_BxV, keys_B, temperature: float, top_k: int, top_p: float):
    """Next tokens and their log-probs under the temperature-scaled distribution.

    temperature 0 is greedy (log-probs at temperature 1). The log-probs are of the full
    temperature-scaled softmax, before top-k/top-p truncation, so at temperature 1 they
    equal `losses.token_logprobs` of the chosen tokens.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if temperature == 0.0:
        tokens_B = jnp.argmax(logits_BxV, axis=-1)
        logp_BxV = jax.nn.log_softmax(logits_BxV, axis=-1)
    else:
        scaled = logits_BxV / temperature
        logp_BxV = jax.nn.log_softmax(scaled, axis=-1)
        truncated = filter_logits(scaled, top_k, top_p)
        tokens_B = jax.vmap(jax.random.categorical)(keys_B, truncated)
    tokens_B = tokens_B.astype(jnp.int32)
    return tokens_B, jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p")


def prefill(model: Model, params, prompt_BxP, prompt_mask_BxP, max_new_tokens: int, samples: int):
    """The prompt's pass that fills a cache of P + N positions: (logits of each row's next
    token [B·G, V], its position [B·G], the cache). With samples G > 1 each prompt is
    prefilled once and its cache copied to its G rows, prompt-major."""
    b, p = prompt_BxP.shape
    positions_BxP = jnp.maximum(jnp.cumsum(prompt_mask_BxP, axis=1) - 1, 0)
    cache = model.init_cache(b, p + max_new_tokens)
    logits_BxPxV, cache = model.apply(
        params, prompt_BxP, prompt_mask_BxP, positions_BxP, cache=cache
    )
    if samples > 1:
        grow = lambda x, axis=0: jnp.repeat(x, samples, axis=axis)  # noqa: E731
        rows = lambda a: grow(a, a.ndim - 4)  # B of [L, B, K, S, H] or [B, K, S, H]
        cache = {
            **cache,
            "k": jax.tree.map(rows, cache["k"]),
            "v": jax.tree.map(rows, cache["v"]),
            "segment_ids": grow(cache["segment_ids"]),
        }
        logits_BxPxV, positions_BxP = grow(logits_BxPxV), grow(positions_BxP)
    return logits_BxPxV[:, -1], positions_BxP[:, -1] + 1, cache


@functools.partial(jax.jit, static_argnames=(*_STATIC, "samples"))
def generate(
    model: Model,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    seeds_B,
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    samples: int = 1,
):
    """Samples replies to left-padded prompts. Returns (tokens_BxN, logprobs_BxN, mask_BxN).

    seeds_B: one integer seed per row, so a row's sample does not depend on its batch.
    mask_BxN is 1 on generated tokens up to and including the first EOS; the tokens after
    a row's EOS are pad (0) with log-prob 0.
    samples: G replies per prompt (GRPO's group, RLOO's k). Each prompt is prefilled once
    and its cache copied to its G rows, prompt-major (prompt i's replies are rows i·G ..
    i·G + G − 1); seeds_B and the outputs then have B·G rows.
    """
    n = max_new_tokens
    logits_BxV, pos_B, cache = prefill(model, params, prompt_BxP, prompt_mask_BxP, n, samples)
    cache = model.with_layer_weights(params, cache)
    b = logits_BxV.shape[0]
    keys_B = jax.vmap(jax.random.key)(seeds_B)

    def cond(carry):
        i, done = carry[0], carry[-1]
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits_BxV, pos_B, cache, tokens, logp, mask, done = carry
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
        nxt, lp = choose(logits_BxV, step_keys, temperature, top_k, top_p)
        live = ~done
        nxt = jnp.where(live, nxt, 0)
        tokens = tokens.at[:, i].set(nxt)
        logp = logp.at[:, i].set(jnp.where(live, lp, 0.0))
        mask = mask.at[:, i].set(live.astype(jnp.int32))
        out, cache = model.apply(
            params, nxt[:, None], jnp.ones((b, 1), jnp.int32), pos_B[:, None], cache=cache
        )
        return i + 1, out[:, 0], pos_B + 1, cache, tokens, logp, mask, done | (nxt == eos_id)

    init = (
        jnp.zeros((), jnp.int32),
        logits_BxV,
        pos_B,
        cache,
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b, n), jnp.float32),
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b,), jnp.bool_),
    )
    _, _, _, _, tokens, logp, mask, _ = jax.lax.while_loop(cond, body, init)
    return tokens, logp, mask


@functools.partial(jax.jit, static_argnames=_STATIC)
def generate_uncached(
    model: Model,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    seeds_B,
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """`generate` without a cache: a full forward pass per token (the reference)."""
    b, p = prompt_BxP.shape
    t = p + max_new_tokens
    tokens = jnp.zeros((b, t), jnp.int32).at[:, :p].set(prompt_BxP)
    seg = jnp.ones((b, t), jnp.int32).at[:, :p].set(prompt_mask_BxP)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    keys_B = jax.vmap(lambda s: jax.random.key(s))(seeds_B)

    def body(i, carry):
        tokens, logp, mask, done = carry
        logits = model.apply(params, tokens, seg, positions)[:, p + i - 1]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, i)
        nxt, lp = choose(logits, step_keys, temperature, top_k, top_p)
        live = ~done
        tokens = tokens.at[:, p + i].set(jnp.where(live, nxt, 0))
        logp = logp.at[:, i].set(jnp.where(live, lp, 0.0))
        mask = mask.at[:, i].set(live.astype(jnp.int32))
        return tokens, logp, mask, done | (nxt == eos_id)

    init = (
        tokens,
        jnp.zeros((b, max_new_tokens), jnp.float32),
        jnp.zeros((b, max_new_tokens), jnp.int32),
        jnp.zeros((b,), jnp.bool_),
    )
    tokens, logp, mask, _ = jax.lax.fori_loop(0, max_new_tokens, body, init)
    return tokens[:, p:], logp, mask


def greedy_completions(
    model, params, tokenizer, prefixes: list[str], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy raw-text continuations (cut at EOS), in fixed-size batches (one compile)."""
    # A prompt that leaves no room for max_new_tokens keeps its end (what is completed).
    room = max(model.cfg.max_len - max_new_tokens, 1)
    prompts = [tokenizer.encode(p)[-room:] for p in prefixes]
    width = max(len(p) for p in prompts)
    max_new_tokens = min(max_new_tokens, model.cfg.max_len - width)
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        tokens, mask = left_pad(chunk + [[tokenizer.eos_id]] * (batch_size - len(chunk)))
        tokens = np.pad(tokens, ((0, 0), (width - tokens.shape[1], 0)))
        mask = np.pad(mask, ((0, 0), (width - mask.shape[1], 0)))
        new, _, new_mask = generate(
            model,
            params,
            tokens,
            mask,
            np.zeros(batch_size, np.int32),
            max_new_tokens=max_new_tokens,
            eos_id=tokenizer.eos_id,
        )
        for row, m in zip(np.asarray(new)[: len(chunk)], np.asarray(new_mask)[: len(chunk)]):
            ids = row[m > 0].tolist()
            if tokenizer.eos_id in ids:
                ids = ids[: ids.index(tokenizer.eos_id)]
            out.append(tokenizer.decode(ids))
    return out
