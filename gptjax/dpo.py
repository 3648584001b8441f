"""Direct preference optimisation: the policy trained on comparisons directly, no reward
model (Rafailov et al. 2023), or IPO (Azar et al. 2023), with the RM's batch layout.

For a prompt x and a pair of replies, y_w ranked above y_l, with h the difference of the
policy's and the frozen reference's log-ratios,

    h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)],

    DPO:  L = −log σ(β·h)               (eq. 7; its optimum, under Bradley–Terry preferences
                                          from a reward r, is π* ∝ π_ref·exp(r/β))
    IPO:  L = (h − 1/(2β))²             (eq. 17, τ = β; its optimum is π* ∝
                                          π_ref·exp(p(y ≻ π_ref)/β), the preference
                                          probability against the reference's own replies,
                                          which stays bounded when preferences are certain)

A ranked list of K replies gives every ordered pair (w ranked strictly above l; equal
ranks tie and give none), as the RM's loss does, in one batch element: each prompt's
loss is the mean over its pairs, and prompts with pairs weigh equally.

log π(y|x) is the sum of the reply tokens' log-probs (its EOS included if it ended), the
prompt and padding masked out, in the same truncated rows for the policy and the
reference (gptjax/data/iterators.py comparison_example keeps a row's end).
Shape legend: B prompts, K replies per prompt, T tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from gptjax import losses, sharding
from gptjax.config import need
from gptjax.model import Model
from gptjax.train_steps import accumulate_grads, finish_step

LOSSES = ("dpo", "ipo")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1  # β: the strength of the KL regularisation to the reference
    loss: str = "dpo"  # dpo (Rafailov et al. 2023) | ipo (Azar et al. 2023)

    def __post_init__(self):
        need(self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        need(self.loss in LOSSES, "loss", f"{self.loss!r} not in {'|'.join(LOSSES)}")


def reply_logp(model: Model, params, batch) -> jax.Array:
    """logp_BxK: each reply's summed log-prob (reply tokens only) under `params`."""
    b, k, t = batch["tokens"].shape
    # [B, K, T] -> [B·K, T] rows, split over the batch axes as every other batch.
    flat = lambda x: sharding.constrain_batch(x.reshape(b * k, t))  # noqa: E731
    tokens = flat(batch["tokens"])
    logits = model.apply(params, tokens, flat(batch["segment_ids"]), flat(batch["positions"]))
    mask = flat(batch["reply_mask"]).astype(jnp.float32)
    logp, _ = losses.reply_logprobs(logits[:, :-1], tokens[:, 1:], mask[:, 1:])
    return jnp.sum(logp, axis=1).reshape(b, k)


def preference_loss(logp_BxK, ref_logp_BxK, ranks_BxK, valid_BxK, beta: float, loss: str):
    """The DPO / IPO loss over every ordered pair of each prompt's replies. Returns
    (loss_sum over prompts, prompts with a pair, aux sums over pairs: pairs, correct_sum
    (implicit reward β·h > 0), margin_sum (β·h), chosen_sum / rejected_sum (the policy's
    log-ratio to the reference of the better / worse reply: how each one drifted))."""
    ratio_BxK = logp_BxK.astype(jnp.float32) - ref_logp_BxK.astype(jnp.float32)
    h_BxKxK = ratio_BxK[:, :, None] - ratio_BxK[:, None, :]  # w in dim 1, l in dim 2
    valid = valid_BxK.astype(jnp.float32)
    better = (ranks_BxK[:, :, None] < ranks_BxK[:, None, :]).astype(jnp.float32)
    pair_BxKxK = better * valid[:, :, None] * valid[:, None, :]
    if loss == "dpo":
        per_pair = -jax.nn.log_sigmoid(beta * h_BxKxK)
    else:
        per_pair = jnp.square(h_BxKxK - 1.0 / (2.0 * beta))
    pairs_B = pair_BxKxK.sum(axis=(1, 2))
    has_pair = pairs_B > 0
    loss_B = (per_pair * pair_BxKxK).sum(axis=(1, 2)) / jnp.maximum(pairs_B, 1.0)
    aux = {
        "pairs": pairs_B.sum(),
        "correct_sum": jnp.sum((h_BxKxK > 0) * pair_BxKxK),
        "margin_sum": jnp.sum(beta * h_BxKxK * pair_BxKxK),
        "chosen_sum": jnp.sum(ratio_BxK[:, :, None] * pair_BxKxK),
        "rejected_sum": jnp.sum(ratio_BxK[:, None, :] * pair_BxKxK),
    }
    return jnp.sum(jnp.where(has_pair, loss_B, 0.0)), jnp.sum(has_pair), aux


def dpo_train_step(
    state,
    batch,
    rng,
    *,
    model: Model,
    tx,
    schedule,
    cfg: DPOConfig,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
):
    """One step of the preference loss. Same contract as lm_train_step; batch: the RM's
    comparison batch with reply_mask [B, K, T] and ref_seq_logp [B, K] (the reference's
    reply log-probs, computed once before training)."""
    del rng  # no dropout here; kept for the shared step signature

    def loss_fn(params, mb, index):
        logp_BxK = reply_logp(model, params, mb)
        loss_sum, count, aux = preference_loss(
            logp_BxK, mb["ref_seq_logp"], mb["ranks"], mb["valid"], cfg.beta, cfg.loss
        )
        return loss_sum, (count, aux)

    (loss_sum, (count, aux)), grads = accumulate_grads(
        loss_fn, state["params"], batch, grad_accum_steps
    )
    state, metrics = finish_step(state, loss_sum, count, grads, tx, schedule, skip_nonfinite)
    pairs = jnp.maximum(aux["pairs"], 1.0)
    metrics.update(
        accuracy=aux["correct_sum"] / pairs,
        margin=aux["margin_sum"] / pairs,
        chosen_logratio=aux["chosen_sum"] / pairs,
        rejected_logratio=aux["rejected_sum"] / pairs,
        pairs=aux["pairs"],
    )
    return state, metrics


def dpo_eval_step(params, batch, *, model: Model):
    """logp_BxK of every reply under the params (the reference's, once before training;
    the policy's for held-out metrics)."""
    return reply_logp(model, params, batch)


def make_steps(model: Model, tx, schedule, *, cfg: DPOConfig, grad_accum_steps: int = 1):
    """The preference objective for gptjax.trainer.LMTrainer: (train_step, eval_step)."""
    train = functools.partial(
        dpo_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        cfg=cfg,
        grad_accum_steps=grad_accum_steps,
    )
    return train, functools.partial(dpo_eval_step, model=model)
