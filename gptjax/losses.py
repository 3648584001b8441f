"""Losses, each returning a masked sum and a count plus diagnostics (Tunix/nanodo style).

Returning sums, not means, lets callers combine microbatches and hosts exactly: the mean
is sum(sums) / sum(counts), whatever the padding in each part.

Target convention used everywhere: position t of `tokens_BxT` is predicted from positions
< t, and only inside one document: `segment_ids[t] == segment_ids[t-1] != 0`. Masks are
weights on target tokens, aligned with `tokens_BxT`.

Shape legend: B batch, T sequence, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_mask(segment_ids_BxT, loss_mask_BxT=None, shape=None):
    """Weight of each target token: inside a document, not its first token, times loss_mask.

    Column 0 has no prediction (nothing precedes it), so it is always 0. segment_ids None:
    one document fills each row of `shape` (B, T).
    """
    seg = jnp.ones(shape, jnp.int32) if segment_ids_BxT is None else segment_ids_BxT
    same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
    mask = jnp.pad(same_doc.astype(jnp.float32), ((0, 0), (1, 0)))
    if loss_mask_BxT is not None:
        mask = mask * loss_mask_BxT.astype(jnp.float32)
    return mask


def reply_logprobs(logits_BxNxV, targets_BxN, mask_BxN, temperature: float = 1.0):
    """(logp_BxN, entropy_BxN): log p(target) and the entropy of the distribution at each
    position, in float32, zero off the mask: the one place reply log-probs are computed
    (PPO's policy, reference and old log-probs, KL, the evaluator, the RM's reference
    feature). logits_BxNxV[:, i] are the logits that predict targets_BxN[:, i] (the column
    before it); they are divided by the temperature the tokens were sampled at
    (lm-human-preferences scores training batches as it sampled them)."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32) / temperature, axis=-1)
    logp = jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)
    return logp * mask_BxN, entropy * mask_BxN


def token_kl(logits_BxNxV, ref_logits_BxNxV):
    """KL(p ‖ p_ref) over the full vocabulary at each position, in float32 [B, N]: the
    exact per-token KL, where the sampled log-ratio log p(y) − log p_ref(y) is its
    one-sample estimate. Summed along a reply sampled from p it estimates the sequence KL
    without bias (chain rule) and is never negative."""
    logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
    ref_logp = jax.nn.log_softmax(ref_logits_BxNxV.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)


def token_logprobs(logits_BxTxV, tokens_BxT, mask_BxT=None):
    """log p(tokens[t] | tokens[<t]) in float32, aligned with tokens (column 0, with nothing
    before it, is 0), times mask_BxT if given."""
    mask = jnp.ones(tokens_BxT[:, 1:].shape, jnp.float32) if mask_BxT is None else mask_BxT[:, 1:]
    logp, _ = reply_logprobs(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], mask)
    return jnp.pad(logp, ((0, 0), (1, 0)))


def _first_argmax(x_BxTxV):
    """jnp.argmax (first index of the maximum) as a max and a min: XLA:CPU runs the
    (value, index) reduction of argmax several times slower."""
    v = x_BxTxV.shape[-1]
    at_max = x_BxTxV == jnp.max(x_BxTxV, axis=-1, keepdims=True)
    return jnp.min(jnp.where(at_max, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def next_token_loss(logits_BxTxV, tokens_BxT, mask_BxT, z_loss: float = 0.0):
    """Masked next-token cross-entropy. Returns (loss_sum, count, aux).

    mask_BxT: weights on target tokens (see target_mask).
    z_loss: PaLM's auxiliary z_loss * log(Z)^2 (Chowdhery et al. 2022, sec. 5), which keeps
      the softmax normaliser near 1 for bf16 stability; 0 disables it.
    aux: sums of correct predictions and of the z term, for metrics.
    """
    # Position t predicts tokens[t + 1]; the last position has no target. It is kept and
    # zeroed rather than sliced off the logits: slicing copies the [B, T, V] logits and
    # pads their gradient back, which costs more than the extra row of softmax.
    t = tokens_BxT.shape[1]
    logits = logits_BxTxV.astype(jnp.float32)
    targets = jnp.pad(tokens_BxT[:, 1:], ((0, 0), (0, 1)))
    mask = jnp.pad(mask_BxT[:, 1:].astype(jnp.float32), ((0, 0), (0, 1)))
    has_target = jnp.arange(t) < t - 1
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jnp.where(has_target, log_z - target_logit, 0.0)
    z_term = jnp.where(has_target, z_loss * jnp.square(log_z), 0.0)
    loss_sum = jnp.sum((nll + z_term) * mask)
    correct = (_first_argmax(logits) == targets).astype(jnp.float32)
    aux = {
        "correct_sum": jnp.sum(correct * mask),
        "nll_sum": jnp.sum(nll * mask),
        "z_sum": jnp.sum(z_term * mask),
    }
    return loss_sum, jnp.sum(mask), aux


def ranking_loss(rewards_BxK, ranks_BxK, valid_BxK):
    """InstructGPT's K-way reward-model loss (Ouyang et al. 2022, eq. 1).

    Each prompt's loss is the mean of -log σ(r_w - r_l) over its ordered pairs (w ranked
    strictly better than l; rank 0 = best; equal ranks are ties and give no pair; invalid
    responses are padding). Returns (loss_sum over prompts, number of prompts with a pair,
    aux sums over pairs: pairs, correct_sum, margin_sum).
    """
    r = rewards_BxK.astype(jnp.float32)
    valid = valid_BxK.astype(jnp.float32)
    diff_BxKxK = r[:, :, None] - r[:, None, :]  # r_i - r_j
    better = (ranks_BxK[:, :, None] < ranks_BxK[:, None, :]).astype(jnp.float32)
    pair_BxKxK = better * valid[:, :, None] * valid[:, None, :]
    pairs_B = pair_BxKxK.sum(axis=(1, 2))
    nll_B = -(jax.nn.log_sigmoid(diff_BxKxK) * pair_BxKxK).sum(axis=(1, 2))
    has_pair = pairs_B > 0
    loss_sum = jnp.sum(jnp.where(has_pair, nll_B / jnp.maximum(pairs_B, 1.0), 0.0))
    aux = {
        "pairs": pairs_B.sum(),
        "correct_sum": jnp.sum((diff_BxKxK > 0) * pair_BxKxK),
        "margin_sum": jnp.sum(diff_BxKxK * pair_BxKxK),
    }
    return loss_sum, jnp.sum(has_pair.astype(jnp.float32)), aux


# The per-token KL estimates a loss may use (k1's gradient is zero in expectation).
LOSS_KL_ESTIMATORS = ("k2", "k3")


def kl_estimate(logp_BxN, ref_logp_BxN, estimator: str):
    """Per-token estimates of KL(π‖π_ref) from a sample y ~ π, with δ = log π(y) − log
    π_ref(y) (Schulman, "Approximating KL divergence", 2020):

      k1 = δ                  unbiased for the KL, and what PPO's reward penalty sums; as a
                              loss its gradient, E_π[∇ log π] = 0, vanishes on-policy;
      k2 = δ²/2               its gradient, E_π[δ ∇ log π], is ∇KL(π‖π_ref): a k2 loss
                              pulls toward the reverse-KL optimum π* ∝ π_ref·exp(r/β), the
                              same as the penalty in the reward;
      k3 = exp(−δ) − 1 + δ    unbiased and ≥ 0, but its gradient, E_π[(1 − e^{−δ}) ∇ log π]
                              = −E_{π_ref}[∇ log π], is that of KL(π_ref‖π) (the forward KL):
                              a k3 loss pulls toward another optimum (GRPO's choice).
    """
    delta = logp_BxN - ref_logp_BxN
    if estimator == "k1":
        return delta
    if estimator == "k2":
        return 0.5 * jnp.square(delta)
    if estimator == "k3":
        return jnp.exp(-delta) - 1.0 + delta
    raise ValueError(f"unknown KL estimator {estimator!r}; k1 | k2 | k3")
