"""The rollout and scoring phases shared by the online RL methods: the policy samples replies
to left-padded prompts with the KV-cache sampler, the frozen reward model scores each
reply at its last token and the frozen reference (SFT) model gives per-token log-probs;
plus the resumable stream of prompt batches a stage feeds them.

Shape legend: B rollouts per iteration, P prompt length (left-padded), N reply tokens
(max_new_tokens), T = P + N.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import losses, reward_model, sampling, sharding, tool_sampling
from gptjax.config import from_dict, need
from gptjax.data.iterators import BatchIterator
from gptjax.data.packing import host_slice
from gptjax.errors import ConfigError
from gptjax.model import Model, ModelConfig


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """The shapes of an RL iteration's batches."""

    prompts_per_iteration: int = 512  # rollouts per iteration (B)
    max_prompt_len: int = 128  # prompts are left-padded to this; longer ones keep their end
    max_new_tokens: int = 64  # reply length limit; max_prompt_len + max_new_tokens <= max_len
    ptx_batch_size: int = 256  # pretraining rows per iteration (ptx), split over minibatches
    ptx_seq_len: int = 1024  # their length

    def __post_init__(self):
        for name in ("prompts_per_iteration", "max_prompt_len", "max_new_tokens"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")

    def check(
        self, mesh, model: ModelConfig, minibatches: int, ptx: bool, prefix: str, samples: int = 1
    ) -> None:
        """The prompts divide over the data-parallel axes and their rollouts (`samples` per
        prompt) and ptx rows into minibatches over them too; a prompt and its reply (and a
        ptx row) fit the model."""
        field = f"{prefix}.prompts_per_iteration"
        sharding.check_batch(mesh, self.prompts_per_iteration, field)
        # The rollout's rows (prompts x samples) split into the update's minibatches.
        rows = self.prompts_per_iteration * samples
        sharding.check_batch(mesh, rows, field, minibatches, "minibatches")
        total = self.max_prompt_len + self.max_new_tokens
        if total > model.max_len:
            raise ConfigError(
                f"{prefix}.max_new_tokens",
                f"max_prompt_len + max_new_tokens = {total} exceeds model.max_len={model.max_len}",
            )
        if ptx:
            field = f"{prefix}.ptx_batch_size"
            sharding.check_batch(mesh, self.ptx_batch_size, field, minibatches, "minibatches")
            if self.ptx_seq_len > model.max_len:
                raise ConfigError(
                    f"{prefix}.ptx_seq_len",
                    f"{self.ptx_seq_len} exceeds model.max_len={model.max_len}",
                )


def rollout_config(section, prefix: str) -> RolloutConfig:
    """The batch-shape fields of an RL stage's config section, validated."""
    fields = {f.name: section[f.name] for f in dataclasses.fields(RolloutConfig)}
    return from_dict(RolloutConfig, fields, prefix)


def rollout(
    model: Model,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    seeds_B,
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 1.0,
    samples: int = 1,
):
    """Samples `samples` replies per left-padded prompt (one prefill each, sampling.generate)
    and returns the rollout batch, prompt-major.

    tokens/segment_ids/positions [B, T]: prompt then reply. Pads (left of the prompt,
    after the reply's EOS) are segment 0 and never attended to by real tokens; positions
    count real tokens only. response_mask [B, N]: 1 on reply tokens up to and including
    EOS. ended [B]: the reply emitted EOS (else it hit max_new_tokens). With samples G,
    B is the number of prompts times G (seeds_B has that many rows).
    """
    reply_BxN, _, mask_BxN = sampling.generate(
        model,
        params,
        prompt_BxP,
        prompt_mask_BxP,
        seeds_B,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        temperature=temperature,
        samples=samples,
    )
    return _batch(prompt_BxP, prompt_mask_BxP, reply_BxN, mask_BxN, eos_id, samples)


def _batch(prompt_BxP, prompt_mask_BxP, reply_BxN, mask_BxN, eos_id: int, samples: int):
    """The rollout batch of sampled replies (their prompts repeated `samples` times)."""
    if samples > 1:
        prompt_BxP = jnp.repeat(prompt_BxP, samples, axis=0)
        prompt_mask_BxP = jnp.repeat(prompt_mask_BxP, samples, axis=0)
    seg_BxT = jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1).astype(jnp.int32)
    return {
        "tokens": jnp.concatenate([prompt_BxP, reply_BxN], axis=1).astype(jnp.int32),
        "segment_ids": seg_BxT,
        "positions": jnp.maximum(jnp.cumsum(seg_BxT, axis=1) - 1, 0).astype(jnp.int32),
        "response_mask": mask_BxN.astype(jnp.float32),
        "ended": jnp.any((reply_BxN == eos_id) & (mask_BxN > 0), axis=1).astype(jnp.float32),
    }


def tool_rollout(
    model: Model,
    params,
    prompt_BxP,
    prompt_mask_BxP,
    seeds_B,
    *,
    max_new_tokens: int,
    eos_id: int,
    tokenizer,
    toolbox,
    spec,
    temperature: float = 1.0,
    samples: int = 1,
):
    """`rollout` with tool turns (gptjax/tool_sampling.py): the same batch, where the fed
    tool results are part of the sequence (attended to, in segment 1) but not of
    response_mask: the policy loss, the KL and the value loss never see them, and GAE
    carries values across them (ppo.gae_over_turns). tool_mask [B, N] marks them. Runs on
    the host between jitted segments: one process only."""
    if jax.process_count() > 1:
        raise ValueError("tool rollouts run on one process (the host answers each call)")
    out = tool_sampling.generate_with_tools(
        model, params, prompt_BxP, prompt_mask_BxP, seeds_B, max_new_tokens=max_new_tokens,
        eos_id=eos_id, tokenizer=tokenizer, toolbox=toolbox, spec=spec, temperature=temperature,
        samples=samples,
    )  # fmt: skip
    tool = jnp.asarray(out["tool_mask"])
    batch = _batch(
        prompt_BxP, prompt_mask_BxP, jnp.asarray(out["tokens"]), jnp.asarray(out["mask"]),
        eos_id, samples,
    )  # fmt: skip
    batch["response_mask"] = batch["response_mask"] * (1 - tool).astype(jnp.float32)
    batch["tool_mask"] = tool.astype(jnp.float32)
    return batch


def response_logprobs(model: Model, params, batch, temperature: float = 1.0):
    """(logp_BxN, entropy_BxN) of the reply tokens under the policy, zero off the mask.

    The logits at column t predict token t + 1, so the N reply tokens (the last N columns)
    are scored by columns P-1 .. T-2. Log-softmax in float32 of logits / temperature: the
    distribution the sampler drew from (lm-human-preferences scales by the temperature in
    training as in sampling). At temperature 1 logp equals `losses.token_logprobs`.
    """
    logits = model.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"])
    return _reply_logprobs(logits, batch, temperature)


def response_logprobs_and_values(policy: Model, params, head, batch, temperature: float = 1.0):
    """response_logprobs and response_values of a policy with a value head `head` on its
    own trunk (PPO's value_from="head"), from one pass of the trunk."""
    logits, values_BxT = policy.apply_lm_and_values(
        params, head, batch["tokens"], batch["segment_ids"], batch["positions"]
    )
    return *_reply_logprobs(logits, batch, temperature), _reply_values(values_BxT, batch)


def response_values(model: Model, params, batch):
    """values_BxN: the scalar head at the columns that predict each reply token (the state
    before the token is chosen), as lm-human-preferences reads its value head."""
    values_BxT = model.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"])
    return _reply_values(values_BxT, batch)


def _reply_logprobs(logits_BxTxV, batch, temperature: float):
    """The reply's N tokens scored by the columns before them, P-1 .. T-2."""
    mask = batch["response_mask"]
    n = mask.shape[1]
    targets = batch["tokens"][:, -n:]
    return losses.reply_logprobs(logits_BxTxV[:, -n - 1 : -1], targets, mask, temperature)


def _reply_values(values_BxT, batch):
    mask = batch["response_mask"]
    n = mask.shape[1]
    return values_BxT[:, -n - 1 : -1] * mask


def last_token_index(mask_BxN):
    """Column (within the reply) of each reply's last masked token: its EOS if it ended.
    The last column of the mask, not its count: a tool-using reply's mask has holes where
    tool results were fed (tool_rollout)."""
    cols = jnp.arange(mask_BxN.shape[1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask_BxN > 0, cols[None, :], 0), axis=1)


def score_rollout(rm: Model, rm_params, ref: Model, ref_params, batch, temperature: float = 1.0):
    """The scoring phase: RM score at each reply's last token (InstructGPT reads the reward
    at the EOS; the RM stage trains it there) and the frozen reference's log-probs.

    The reference (SFT) model is the one the RM's reference feature was computed with
    (gptjax/reward_model.py): its mean log-prob of the reply at temperature 1 enters the
    score with the RM's weight score_logp (0 for an RM trained without the feature).
    """
    mask = batch["response_mask"]
    n = mask.shape[1]
    values_BxT = rm.apply(rm_params, batch["tokens"], batch["segment_ids"], batch["positions"])
    index_B = values_BxT.shape[1] - n + last_token_index(mask)
    scores_B = reward_model.reward_at_last_token(values_BxT, index_B)
    ref_logp, _ = response_logprobs(ref, ref_params, batch, temperature)
    ref_logp_t1 = (
        ref_logp if temperature == 1.0 else response_logprobs(ref, ref_params, batch, 1.0)[0]
    )
    mean_ref_logp_B = jnp.sum(ref_logp_t1, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    score_logp = rm_params["score_logp"].astype(jnp.float32)
    scores_B = scores_B + reward_model.reference_term(score_logp, mean_ref_logp_B)
    return {"scores": scores_B.astype(jnp.float32), "ref_logprobs": ref_logp}


def left_align(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A right-padded [B, P] prompt batch -> left-padded tokens and mask (the sampler's)."""
    tokens, mask = batch["tokens"], (batch["segment_ids"] > 0).astype(np.int32)
    shift = tokens.shape[1] - mask.sum(axis=1)
    cols = (np.arange(tokens.shape[1])[None, :] - shift[:, None]) % tokens.shape[1]
    rows = np.arange(tokens.shape[0])[:, None]
    return {"tokens": tokens[rows, cols], "mask": mask[rows, cols]}


class RolloutInputs:
    """Prompt batches (and pretraining batches for ptx), resumable as one JSON position.
    Each batch also carries the prompt records of this process's rows (`records`), for
    rewards computed on the host."""

    def __init__(self, prompts: BatchIterator, ptx: BatchIterator | None = None, source=None):
        self.prompts, self.ptx, self.source = prompts, ptx, source

    def __iter__(self):
        return self

    def __next__(self):
        out = {"prompts": left_align(next(self.prompts))}
        if self.source is not None:
            p = self.prompts
            mine = host_slice({"i": np.asarray(p.last_records)}, p.process_index, p.process_count)
            out["records"] = [self.source[int(i)] for i in mine["i"]]
        if self.ptx is not None:
            out["ptx"] = next(self.ptx)
        return out

    def get_state(self):
        return {
            "prompts": self.prompts.get_state(),
            "ptx": self.ptx.get_state() if self.ptx is not None else None,
        }

    def set_state(self, state):
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])
