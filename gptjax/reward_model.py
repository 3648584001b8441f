"""Reward model: K responses per prompt, one pairwise ranking loss over all their pairs.

InstructGPT (Ouyang et al. 2022, sec. 3.5, eq. 1):

    loss(θ) = -1/C(K,2) · E_{(x, y_w, y_l)} [ log σ( r_θ(x, y_w) − r_θ(x, y_l) ) ]

All K responses of a prompt sit in one batch element, so each response goes through the
model once and every one of the prompt's C(K,2) comparisons is used once per epoch (their
remedy for the overfitting that shuffling pairs independently caused). The reward is the
scalar head's value at the response's last token (its EOS), plus, for an RM trained with
the reference feature, score_logp x the response's mean per-token log-prob under the
frozen SFT model (`ref_logp`, computed once per response on the host; 0 otherwise):

    r(x, y) = w·h_EOS(x, y) + b + w_logp · (1/|y|) Σ_t log π_SFT(y_t | x, y_<t)

Why: a small RM trained on ~1k comparisons does not learn which facts are true (on
the world, P(r(true) > r(wrong)) stays ~0.5 however it is trained), while the SFT
model it starts from does know them; its likelihood of a reply is a calibrated signal
of correctness (Kadavath et al. 2022, "Language Models (Mostly) Know What They Know"),
and one learned weight lets the ranking loss use it. The same quantity is what DPO's
implicit reward is built from (Rafailov et al. 2023), here as one input of a classifier
RM. PPO reads it from the reference log-probs it computes anyway (gptjax/rollout.py).

Batch (numpy dict): tokens / segment_ids / positions [B, K, T]; reward_index [B, K] (the
column of the response's last token); ranks [B, K] (0 = best, equal = tie); valid [B, K]
(0 for padding responses when prompts have fewer than K); ref_logp [B, K] (the
reference feature above; zeros when the RM does not use it, so score_logp stays 0).

Shape legend: B prompts, K responses per prompt, T tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gptjax import losses
from gptjax.model import Model
from gptjax.train_steps import accumulate_grads, finish_step


def rewards(model: Model, params, batch) -> jax.Array:
    """rewards_BxK: the scalar head at each response's reward_index (+ the reference
    feature term, module docstring)."""
    b, k, t = batch["tokens"].shape
    flat = lambda x: x.reshape(b * k, t)
    values_NxT = model.apply(
        params, flat(batch["tokens"]), flat(batch["segment_ids"]), flat(batch["positions"])
    )
    head_BxK = reward_at_last_token(values_NxT, batch["reward_index"].reshape(b * k))
    head_BxK = head_BxK.reshape(b, k)
    if "ref_logp" not in batch:  # e.g. hand-built batches: the head alone
        return head_BxK
    score_logp = params["score_logp"].astype(jnp.float32)
    return head_BxK + reference_term(score_logp, batch["ref_logp"].astype(jnp.float32))


def reward_at_last_token(values_BxT, last_index_B):
    """The scalar head at each sequence's last token (InstructGPT reads the reward at the
    reply's EOS; the RM trains it there): the one place an RM's head becomes a reward (the
    RM's batches, PPO's scoring, the evaluator)."""
    return jnp.take_along_axis(values_BxT, last_index_B[:, None], axis=1)[:, 0]


def reference_term(score_logp, mean_ref_logp):
    """score_logp · (mean per-token log-prob of the reply under the SFT model): what an RM
    trained with the reference feature adds to its head (module docstring). Plain
    arithmetic, so host arrays (the evaluator's) and device arrays take the same path."""
    return score_logp * mean_ref_logp


def rm_train_step(
    state,
    batch,
    rng,
    *,
    model: Model,
    tx,
    schedule,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
):
    """One step of the K-way ranking loss. Same contract as lm_train_step."""
    del rng  # the RM has no dropout here; kept for the shared step signature

    def loss_fn(params, mb, index):
        r_BxK = rewards(model, params, mb)
        loss_sum, count, aux = losses.ranking_loss(r_BxK, mb["ranks"], mb["valid"])
        return loss_sum, (count, aux)

    (loss_sum, (count, aux)), grads = accumulate_grads(
        loss_fn, state["params"], batch, grad_accum_steps
    )
    state, metrics = finish_step(state, loss_sum, count, grads, tx, schedule, skip_nonfinite)
    pairs = jnp.maximum(aux["pairs"], 1.0)
    metrics.update(
        accuracy=aux["correct_sum"] / pairs,
        margin=aux["margin_sum"] / pairs,
        pairs=aux["pairs"],
    )
    return state, metrics


def rm_eval_step(params, batch, *, model: Model):
    """Rewards of every response (for accuracy, calibration, baselines on the host)."""
    return rewards(model, params, batch)


def make_steps(model: Model, tx, schedule, *, grad_accum_steps: int = 1):
    """The ranking objective for gptjax.trainer.LMTrainer: (train_step, eval_step)."""
    train = functools.partial(
        rm_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        grad_accum_steps=grad_accum_steps,
    )
    return train, functools.partial(rm_eval_step, model=model)


def with_scalar_head(model: Model, lm_params, ref_weight: float = 0.0) -> dict:
    """The LM's params for `model` (head="scalar"): the trunk kept, the LM-only unembedding
    dropped, and a new zero head (InstructGPT starts the RM from SFT, head removed).

    ref_weight: the initial weight of the reference feature (module docstring). An RM
    that uses it starts at 1, ranking replies by the SFT model's own likelihood: Adam
    moves one scalar by ~lr per step, so from 0 it could not reach a useful weight in
    the few hundred steps an RM trains (docs/notes.md).
    """
    params = {
        name: lm_params[name] if name in lm_params else jnp.zeros(shape.shape, shape.dtype)
        for name, shape in model.abstract_params.items()
    }
    params["score_logp"] = jnp.full_like(params["score_logp"], ref_weight)
    return params


def normalise_bias(params, mean_reward: float):
    """Shifts the head's bias so responses that averaged `mean_reward` average 0.

    InstructGPT normalises the RM so that the labeler demonstrations score 0 on average
    before RL; the shift is stored in the params, so every later reader gets it.
    """
    params = jax.tree.map(lambda x: x, params)
    params["score_b"] = params["score_b"] - jnp.asarray(mean_reward, params["score_b"].dtype)
    return params
