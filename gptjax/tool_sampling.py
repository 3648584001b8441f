"""Generation with tool turns: the model calls, the host answers, decoding goes on.

The decode loop is `sampling.generate`'s (same prefill, same per-row keys, same step), cut
into segments: a jitted `lax.while_loop` runs until some row emits `<|/call|>` (or every
row has ended). The host then reads each such row's call, runs the tool
(gptjax/tools.py Toolbox), and hands the loop that row's *forced tokens* — `<|result|>`,
the result's tokens, `<|/result|>` — which the next segment feeds in place of samples,
one per step, while the other rows keep sampling. Rows at different turns share every
step and no row ever waits, so replies stay contiguous (no holes in the cache) and
every shape is fixed: one compiled segment program serves every turn.

Caps: `max_calls` calls per reply (a further call ends the row there, unterminated, so
the reply's reward can penalise it), `max_result_tokens` per result (longer ones are
cut), and `max_new_tokens` for the whole reply, results included.

Outputs add `tool_mask_BxN` (1 on forced tokens: the world wrote them, so every loss and
the KL leave them out; their log-probs are 0) and the calls made per row.
Without any call the tokens and log-probs equal `sampling.generate`'s bitwise.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import tools
from gptjax.sampling import choose, prefill


@dataclasses.dataclass(frozen=True)
class ToolTokens:
    """The markers' ids and the caps (static: they shape the compiled program)."""

    call: int
    call_end: int
    result: int
    result_end: int
    max_calls: int = 3
    max_result_tokens: int = 24

    @classmethod
    def of(cls, tokenizer, **caps) -> ToolTokens:
        from gptjax.data.chat import tool_ids

        ids = tool_ids(tokenizer)
        if ids is None:
            raise ValueError(
                "the tokenizer has no tool tokens: set tools.names before pretraining "
                "(the tokenizer is trained with them)"
            )
        return cls(*(ids[t] for t in tools.TOKENS), **caps)


_STATIC = ("model", "max_new_tokens", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "samples", "forced_width"))
def _prefill(
    model, params, prompt_BxP, prompt_mask_BxP, seeds_B, *, max_new_tokens, samples, forced_width
):
    logits_BxV, pos_B, cache = prefill(
        model, params, prompt_BxP, prompt_mask_BxP, max_new_tokens, samples
    )
    b, n = logits_BxV.shape[0], max_new_tokens
    return {
        "i": jnp.zeros((), jnp.int32),
        "keys": jax.vmap(jax.random.key)(seeds_B),
        "logits": logits_BxV,
        "pos": pos_B,
        "cache": cache,
        "tokens": jnp.zeros((b, n), jnp.int32),
        "logp": jnp.zeros((b, n), jnp.float32),
        "mask": jnp.zeros((b, n), jnp.int32),
        "tool_mask": jnp.zeros((b, n), jnp.int32),
        "done": jnp.zeros((b,), jnp.bool_),
        "paused": jnp.zeros((b,), jnp.bool_),
        "forced": jnp.zeros((b, forced_width), jnp.int32),
        "n_forced": jnp.zeros((b,), jnp.int32),
        "forced_at": jnp.zeros((b,), jnp.int32),
    }


@functools.partial(
    jax.jit, static_argnames=(*_STATIC, "eos_id", "call_end_id"), donate_argnames="carry"
)
def _segment(
    model,
    params,
    carry,
    *,
    max_new_tokens,
    eos_id,
    call_end_id,
    temperature=0.0,
    top_k=0,
    top_p=1.0,
):
    """Decodes until a row closes a call, every row is done, or the length limit."""
    b = carry["tokens"].shape[0]
    rows = jnp.arange(b)

    def cond(c):
        return (c["i"] < max_new_tokens) & ~jnp.all(c["done"]) & ~jnp.any(c["paused"])

    def body(c):
        i = c["i"]
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(c["keys"], i)
        sampled, lp = choose(c["logits"], step_keys, temperature, top_k, top_p)
        live = ~c["done"]
        forcing = live & (c["forced_at"] < c["n_forced"])
        nxt = jnp.where(
            forcing,
            c["forced"][rows, jnp.minimum(c["forced_at"], c["forced"].shape[1] - 1)],
            sampled,
        )
        nxt = jnp.where(live, nxt, 0)
        out, cache = model.apply(
            params, nxt[:, None], jnp.ones((b, 1), jnp.int32), c["pos"][:, None], cache=c["cache"]
        )
        own = live & ~forcing  # the policy's own token
        return {
            **c,
            "i": i + 1,
            "logits": out[:, 0],
            "pos": c["pos"] + 1,
            "cache": cache,
            "tokens": c["tokens"].at[:, i].set(nxt),
            "logp": c["logp"].at[:, i].set(jnp.where(own, lp, 0.0)),
            "mask": c["mask"].at[:, i].set(live.astype(jnp.int32)),
            "tool_mask": c["tool_mask"].at[:, i].set(forcing.astype(jnp.int32)),
            "forced_at": c["forced_at"] + forcing,
            "done": c["done"] | (own & (nxt == eos_id)),
            "paused": own & (nxt == call_end_id),
        }

    return jax.lax.while_loop(cond, body, carry)


def _call_ids(row: np.ndarray, end: int, spec: ToolTokens) -> list[int] | None:
    """The ids between the row's last `<|call|>` and its `<|/call|>` at `end`; None when
    the close has no open (or the open was inside a result)."""
    for j in range(end - 1, -1, -1):
        if row[j] == spec.call:
            return row[j + 1 : end].tolist()
        if row[j] in (spec.call_end, spec.result_end):
            return None
    return None


def generate_with_tools(
    model,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    seeds_B,
    *,
    max_new_tokens: int,
    eos_id: int,
    tokenizer,
    toolbox: tools.Toolbox,
    spec: ToolTokens,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    samples: int = 1,
) -> dict:
    """`sampling.generate` with tool turns. Returns numpy arrays tokens_BxN, logp_BxN,
    mask_BxN, tool_mask_BxN, and `calls`: per row a list of (call text, result text,
    valid). Rows are prompt-major with `samples` replies per prompt, as in generate."""
    sampling_args = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p
    )
    width = spec.max_result_tokens + 2
    carry = _prefill(
        model,
        params,
        prompt_BxP,
        prompt_mask_BxP,
        seeds_B,
        max_new_tokens=max_new_tokens,
        samples=samples,
        forced_width=width,
    )
    b = carry["tokens"].shape[0]
    calls: list[list[tuple[str, str, bool]]] = [[] for _ in range(b)]
    while True:
        carry = _segment(
            model, params, carry, eos_id=eos_id, call_end_id=spec.call_end, **sampling_args
        )
        paused = np.asarray(carry["paused"])
        if not paused.any():
            break
        tokens, i = np.asarray(carry["tokens"]), int(carry["i"])
        done = np.asarray(carry["done"]).copy()
        # Rows still being fed an earlier result keep it.
        forced, n_forced, forced_at = (
            np.asarray(carry[k]).copy() for k in ("forced", "n_forced", "forced_at")
        )
        for r in np.flatnonzero(paused):
            if len(calls[r]) >= spec.max_calls:
                done[r] = True  # ends here, unterminated
                continue
            ids = _call_ids(tokens[r], i - 1, spec)
            text = tokenizer.decode(ids) if ids is not None else ""
            result, valid = (
                toolbox.run(text) if ids is not None else ("error: no call was opened", False)
            )
            calls[r].append((text, result, valid))
            result_ids = (
                tokenizer.encode(tools.SEP + result)[: spec.max_result_tokens] if result else []
            )
            row = [spec.result, *result_ids, spec.result_end]
            forced[r, : len(row)] = row
            n_forced[r], forced_at[r] = len(row), 0
        carry = {
            **carry,
            "forced": jnp.asarray(forced),
            "n_forced": jnp.asarray(n_forced),
            "forced_at": jnp.asarray(forced_at),
            "paused": jnp.zeros((b,), jnp.bool_),
            "done": jnp.asarray(done),
        }
    out = {k: np.asarray(carry[k]) for k in ("tokens", "logp", "mask", "tool_mask")}
    out["calls"] = calls
    return out
