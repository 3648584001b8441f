"""PPO's train state and its jitted update, `ppo_train_step`, read top to bottom as in
purejaxrl: each part of an update is a top-level function and the step composes them.

One update on one scored rollout batch (InstructGPT, Ouyang et al. 2022, sec. 3.5):
  1. `old_logprobs_and_values`: old log-probs and values recomputed with the training
     forward pass in minibatch-sized chunks (not the sampler's: the first minibatch of
     the first epoch then sees ratio 1 and clip fraction 0, Huang et al. 2024's check;
     bitwise 1 on CPU, the same computation on the same shapes);
  2. `advantages`: rewards = RM score at the last token − β·(log π − log π_ref) at every
     token (β from the state), GAE, whitened advantages (gptjax/ppo.py);
  3. `update_epoch` × E, each a fresh permutation of the B rows cut into K minibatches,
     `update_minibatch` one optimizer update of `ppo_loss` = L_clip + vf_coef·L_V −
     ent_coef·H + ptx_coef·L_ptx (InstructGPT eq. 2's γ·E_pretrain[log π] as a loss);
     policy and value params have their own optimizer states (and gradient clipping);
  4. `kl_guard`: optionally, the updated policy's KL to the reference on this rollout;
     a blow-up (or non-finite inputs) discards the whole update inside the jit;
  5. β ← the KL controller(β, mean KL per reply of this rollout).

The value model is separate (a scalar-head Model, initialised from the RM, as in
InstructGPT) or, with `value_head=True`, a scalar head on the policy's own trunk. β is an
array in the train state, so it is checkpointed with it.

Shape legend: B rollouts, N reply tokens, E epochs, K minibatches per epoch, M = B // K
rows per minibatch, R pretraining (ptx) rows per minibatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from gptjax import lora, losses, ppo, sharding
from gptjax.model import HEAD_KEYS, Model
from gptjax.ppo import PPOConfig
from gptjax.rollout import response_logprobs, response_logprobs_and_values, response_values
from gptjax.train_steps import apply_update, grad_of_trainable, opt_state_shardings

# ------------------------------------------------------------------------ train state


def initial_value_params(value_model: Model, rm_params, value_head: bool):
    """InstructGPT initialises the value function from the RM; a value head on the policy
    starts at zero (the RM's head was fitted to another trunk)."""
    if value_head:
        abstract = value_model.abstract_params
        return {k: jnp.zeros(abstract[k].shape, abstract[k].dtype) for k in HEAD_KEYS}
    return rm_params


def init_state(policy_params, value_params, tx, kl_coef: float, copy_policy: bool = True):
    """The PPO train state. Params are copied: the state is donated to the step, and the
    frozen reference / RM params it starts from must survive that. copy_policy False: the
    policy params are donated to the state instead (a LoRA policy, whose reference is read
    from the state itself: gptjax/rl_trainer.py)."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    policy, value = (copy(policy_params) if copy_policy else policy_params), copy(value_params)
    return {
        "params": policy,
        "value": value,
        "opt_state": {
            "policy": tx.init(lora.trainable(policy)),
            "value": tx.init(lora.trainable(value)),
        },
        "kl": {"beta": jnp.asarray(kl_coef, jnp.float32)},
        "step": jnp.zeros((), jnp.int32),
    }


def state_shardings(policy: Model, value: Model, value_head: bool, tx, mesh):
    """Shardings of the whole PPO state from shapes alone (the rule table decides)."""
    pick = (lambda t: {k: t[k] for k in HEAD_KEYS}) if value_head else (lambda t: t)
    policy_sh = sharding.param_shardings(mesh, policy.logical_axes, policy.abstract_params)
    value_abstract = pick(value.abstract_params)
    value_sh = sharding.param_shardings(mesh, pick(value.logical_axes), value_abstract)
    rep = sharding.replicated(mesh)
    return {
        "params": policy_sh,
        "value": value_sh,
        "opt_state": {
            "policy": opt_state_shardings(tx, policy.abstract_params, policy_sh, mesh),
            "value": opt_state_shardings(tx, value_abstract, value_sh, mesh),
        },
        "kl": {"beta": rep},
        "step": rep,
    }


# ------------------------------------------------------------------------ the update


def old_logprobs_and_values(state, chunks, *, policy: Model, value: Model, cfg: PPOConfig):
    """(old_logp, old_entropy, old_values), each [B, N], of the rollout under the state's
    policy and value params, with the training forward pass in minibatch-sized chunks."""

    def old_pass(chunk):
        chunk = sharding.constrain_batch(chunk)
        return logprobs_and_values(policy, value, state["params"], state["value"], chunk, cfg)

    k, m, n = chunks["response_mask"].shape
    return tuple(x.reshape(k * m, n) for x in jax.lax.map(old_pass, chunks))


def logprobs_and_values(policy: Model, value: Model, policy_params, value_params, batch, cfg):
    """(logp, entropy, values) of the reply tokens: the policy's and the value model's
    passes, or with a value head on the policy (value_from="head") one pass of its trunk."""
    if cfg.value_head:
        return response_logprobs_and_values(
            policy, policy_params, value_params, batch, cfg.temperature
        )
    logp, entropy = response_logprobs(policy, policy_params, batch, cfg.temperature)
    return logp, entropy, response_values(value, value_params, batch)


def _finite_on_mask(x_BxN, mask_BxN):
    return jnp.all(jnp.isfinite(jnp.where(mask_BxN > 0, x_BxN, 0.0)))


def inputs_finite(batch, old_logp, old_values, mask):
    """Whether the iteration's inputs are finite: a non-finite log-prob, value or score
    would poison every minibatch and β, so the whole update is discarded instead,
    selected inside the jit (no host sync)."""
    return (
        _finite_on_mask(old_logp, mask)
        & _finite_on_mask(batch["ref_logprobs"], mask)
        & _finite_on_mask(old_values, mask)
        & jnp.all(jnp.isfinite(batch["scores"]))
    )


def advantages(batch, old_logp, old_values, mask, beta, cfg: PPOConfig):
    """(rewards, kl, advantages, returns), each [B, N]: the KL-penalised rewards, GAE and
    whitened advantages (gptjax/ppo.py)."""
    rewards, kl = ppo.kl_penalized_rewards(
        old_logp,
        batch["ref_logprobs"],
        batch["scores"],
        mask,
        batch["ended"],
        beta,
        cfg.no_eos_penalty,
    )
    if cfg.whiten_rewards:
        rewards = ppo.whiten(rewards, mask, shift_mean=False)
    # A tool-using rollout's mask has holes at the fed results: GAE skips them.
    gae = ppo.gae_over_turns if "tool_mask" in batch else ppo.gae
    adv, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    return rewards, kl, ppo.whiten(adv, mask), returns


def ppo_loss(trainable, mb, ptx_mb, *, policy: Model, value: Model, cfg: PPOConfig):
    """L = L_clip + vf_coef·L_V − ent_coef·H (+ ptx_coef·L_ptx) on one minibatch, as means
    over its reply tokens (and ptx target tokens); returns (loss, stats)."""
    policy_params, value_params = trainable
    logp, entropy, vals = logprobs_and_values(policy, value, policy_params, value_params, mb, cfg)
    mmask = mb["response_mask"]
    pg_sum, count, pg_aux = ppo.policy_loss(
        logp, mb["old_logp"], mb["advantages"], mmask, cfg.clip_ratio
    )
    vf_sum, _, vf_aux = ppo.value_loss(vals, mb["old_values"], mb["returns"], mmask, cfg.clip_value)
    denom = jnp.maximum(count, 1.0)
    pg, vf, ent = pg_sum / denom, vf_sum / denom, jnp.sum(entropy * mmask) / denom
    loss = pg + cfg.vf_coef * vf - cfg.ent_coef * ent
    stats = {
        "policy_loss": pg,
        "value_loss": vf,
        "entropy": ent,
        "clipfrac": pg_aux["clipfrac_sum"] / denom,
        "approx_kl": pg_aux["approxkl_sum"] / denom,
        "ratio": pg_aux["ratio_sum"] / denom,
        "ratio_dev_max": pg_aux["ratio_dev_max"],
        "vf_clipfrac": vf_aux["vf_clipfrac_sum"] / denom,
    }
    if ptx_mb is not None:
        logits = policy.apply(
            policy_params, ptx_mb["tokens"], ptx_mb["segment_ids"], ptx_mb["positions"]
        )
        tmask = losses.target_mask(ptx_mb["segment_ids"], ptx_mb["loss_mask"])
        ptx_sum, ptx_count, _ = losses.next_token_loss(logits, ptx_mb["tokens"], tmask)
        stats["ptx_loss"] = ptx_sum / jnp.maximum(ptx_count, 1.0)
        loss = loss + cfg.ptx_coef * stats["ptx_loss"]
    stats["loss"] = loss
    return loss, stats


def update_minibatch(
    carry, xs, *, data, policy: Model, value: Model, tx, schedule, cfg: PPOConfig,
    skip_nonfinite: bool,
):  # fmt: skip
    """One optimizer update of policy and value on the rows index_M of `data`."""
    index_M, ptx_mb, update_index = xs
    mb = sharding.constrain_batch(jax.tree.map(lambda x: jnp.take(x, index_M, axis=0), data))
    ptx_mb = sharding.constrain_batch(ptx_mb)
    loss_fn = functools.partial(ppo_loss, policy=policy, value=value, cfg=cfg)
    # Gradients of the trainable params only (gptjax/lora.py).
    grad_fn, views = grad_of_trainable(loss_fn, (carry["params"], carry["value"]))
    (loss, stats), (g_policy, g_value) = grad_fn(views, mb, ptx_mb)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm((g_policy, g_value)))

    def update(params, opt_state, grads, name):
        part = {"params": params, "opt_state": opt_state, "step": update_index}
        part, upd = apply_update(part, grads, tx, schedule, skip_nonfinite, finite)
        stats.update({f"{name}_{key}": upd[key] for key in ("grad_norm", "update_norm")})
        stats.update(lr=upd["lr"], nonfinite=upd["nonfinite"])
        return part["params"], part["opt_state"]

    opt = carry["opt_state"]
    policy_params, policy_opt = update(carry["params"], opt["policy"], g_policy, "policy")
    value_params, value_opt = update(carry["value"], opt["value"], g_value, "value")
    new = {
        "params": policy_params,
        "value": value_params,
        "opt_state": {"policy": policy_opt, "value": value_opt},
    }
    return new, stats


def update_epoch(carry, xs, *, ptx, step, cfg: PPOConfig, rows: int, minibatch_fn):
    """One pass over the rollout: a fresh permutation of its `rows` rows cut into K
    minibatches, each `minibatch_fn` (update_minibatch with its context); the optimizer
    schedules count updates, E·K per PPO step."""
    epoch_rng, epoch_index = xs
    e, k = cfg.epochs, cfg.minibatches
    perm_KxM = jax.random.permutation(epoch_rng, rows).reshape(k, rows // k)
    updates = step * (e * k) + epoch_index * k + jnp.arange(k)
    return jax.lax.scan(minibatch_fn, carry, (perm_KxM, ptx, updates))


def kl_guard(trainable, chunks, batch, mask, *, policy: Model, cfg: PPOConfig):
    """The updated policy's KL to the reference on this rollout's replies (one more forward
    pass) and whether it blew past cfg.kl_max: a blow-up is rolled back before it can be
    sampled from. NaN counts as a blow-up."""
    b, n = mask.shape
    new_logp = jax.lax.map(
        lambda c: response_logprobs(
            policy, trainable["params"], sharding.constrain_batch(c), cfg.temperature
        )[0],
        chunks,
    ).reshape(b, n)
    kl_after = jnp.mean(jnp.sum((new_logp - batch["ref_logprobs"]) * mask, axis=1))
    return kl_after, ~(kl_after <= cfg.kl_max)


def ppo_train_step(
    state,
    batch,
    rng,
    *,
    policy: Model,
    value: Model,
    tx,
    schedule,
    cfg: PPOConfig,
    skip_nonfinite: bool = True,
):
    """One PPO update on one rollout batch: `(state, batch, rng) -> (state, metrics)`.

    batch: the rollout (tokens / segment_ids / positions [B, T], response_mask [B, N],
    ended [B]) with its scores [B] and ref_logprobs [B, N] (gptjax/rollout.py), and with
    cfg.ptx_coef > 0 a pretraining batch "ptx" (tokens / segment_ids / positions /
    loss_mask [K·R, S]; minibatch k trains on rows k·R .. (k+1)·R every epoch).
    Metrics are means over the E·K minibatches, plus the first minibatch's ratio check.
    """
    rng = jax.random.fold_in(rng, state["step"])
    e, k = cfg.epochs, cfg.minibatches
    mask = batch["response_mask"].astype(jnp.float32)
    b, n = mask.shape
    seq = {key: batch[key] for key in ("tokens", "segment_ids", "positions")}
    seq["response_mask"] = mask
    chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:]), seq)
    models = dict(policy=policy, value=value, cfg=cfg)

    old_logp, old_entropy, old_values = old_logprobs_and_values(state, chunks, **models)
    beta = state["kl"]["beta"]
    finite = inputs_finite(batch, old_logp, old_values, mask)
    rewards, kl, adv, returns = advantages(batch, old_logp, old_values, mask, beta, cfg)
    data = {**seq, "old_logp": old_logp, "old_values": old_values}
    data.update(advantages=adv, returns=returns)
    ptx = None
    if cfg.ptx_coef > 0:
        ptx = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch["ptx"])

    minibatch_fn = functools.partial(
        update_minibatch,
        data=data,
        tx=tx,
        schedule=schedule,
        skip_nonfinite=skip_nonfinite,
        **models,
    )
    epoch_fn = functools.partial(
        update_epoch, ptx=ptx, step=state["step"], cfg=cfg, rows=b, minibatch_fn=minibatch_fn
    )
    before = {key: state[key] for key in ("params", "value", "opt_state")}
    trainable, stats_ExK = jax.lax.scan(epoch_fn, before, (jax.random.split(rng, e), jnp.arange(e)))

    kl_per_reply = jnp.mean(jnp.sum(kl, axis=1))
    new_beta = ppo.kl_controller_update(beta, kl_per_reply, b, cfg.kl_target, cfg.kl_horizon)
    keep, guard = finite, {}
    if cfg.kl_max > 0:
        kl_after, blown = kl_guard(trainable, chunks, batch, mask, policy=policy, cfg=cfg)
        guard = {"kl_after": kl_after, "kl_blowup": (finite & blown).astype(jnp.float32)}
        keep = keep & ~blown
    trainable = jax.tree.map(lambda new, old: jnp.where(keep, new, old), trainable, before)
    new_beta = jnp.where(keep, new_beta, beta)
    new_state = {**trainable, "kl": {"beta": new_beta}, "step": state["step"] + 1}

    rollout = dict(kl=kl, rewards=rewards, entropy=old_entropy, values=old_values, returns=returns)
    return new_state, step_metrics(stats_ExK, guard, finite, batch, mask, beta, rollout)


def step_metrics(stats_ExK, guard, finite, batch, mask, beta, rollout):
    """An update's metrics: means over its E·K minibatches, the first minibatch's ratio
    check, the KL guard's, and the rollout's (RM score, KL, rewards, entropy, values)."""
    metrics = {key: jnp.mean(v) for key, v in stats_ExK.items()}
    metrics.update(guard)
    metrics["nonfinite"] = jnp.maximum(
        jnp.max(stats_ExK["nonfinite"]), 1.0 - finite.astype(jnp.float32)
    )
    metrics["first_ratio_dev_max"] = stats_ExK["ratio_dev_max"][0, 0]
    metrics["first_clipfrac"] = stats_ExK["clipfrac"][0, 0]
    del metrics["ratio_dev_max"]
    lengths = jnp.sum(mask, axis=1)
    values, returns = rollout["values"], rollout["returns"]
    metrics.update(
        score=jnp.mean(batch["scores"]),
        kl=jnp.mean(jnp.sum(rollout["kl"], axis=1)),
        kl_coef=beta,
        reward=jnp.mean(jnp.sum(rollout["rewards"], axis=1)),
        policy_entropy=ppo.masked_mean(rollout["entropy"], mask),
        explained_variance=ppo.explained_variance(values, returns, mask),
        value_mean=ppo.masked_mean(values, mask),
        return_mean=ppo.masked_mean(returns, mask),
        response_length=jnp.mean(lengths),
        eos_fraction=jnp.mean(batch["ended"]),
    )
    return metrics
