"""Critic-free online RL: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024). Each
prompt gets G replies (one prefill, gptjax/sampling.py), scored like PPO's rollouts; a
reply's advantage compares its return with its group's, so no value model is trained.

Returns: R_i = score_i (the RM's, the gold labeler's or a user's), minus β·Σ_t k1_t when
the KL penalty is in the reward (k1_t = log π(y_t) − log π_ref(y_t), as PPO's penalty).

    GRPO  A_i = (R_i − mean_group R) / (std_group R + ε)   (eq. 4; std_normalize=False:
          Dr.GRPO's A_i = R_i − mean_group R)
    RLOO  A_i = R_i − mean_{j ≠ i} R_j                      (the leave-one-out baseline)

The loss is PPO's clipped surrogate with A_i at every token of reply i, on old log-probs
recomputed with the training forward pass, over epochs × minibatches of the rollout,
plus β·KL estimated per token when the penalty is in the loss (`kl_estimator`, below).
Aggregation over tokens, named as verl names it: token-mean (DAPO: one mean over every
reply token of the minibatch), seq-mean-token-mean (GRPO's: each reply's mean, then their
mean), seq-mean-token-sum-norm (Dr.GRPO: each reply's sum over the constant
max_new_tokens, then the mean, so long replies are not down-weighted).

Fixed points on a one-step bandit (tests/test_algorithms.py): with the KL in the reward,
RLOO maximises E[R] − β·KL(π‖π_ref) and converges to π* ∝ π_ref·exp(r/β); GRPO's group
mean includes the reply itself, which scales every advantage by (G−1)/G, so without std
normalisation and with k2 in the loss it converges to π_ref·exp(c·r/β), c = (G−1)/G.

Shape legend: B rollout rows (prompts × G), N reply tokens, G replies per prompt.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from gptjax import lora, losses, ppo, sharding
from gptjax.config import from_dict, need
from gptjax.model import Model
from gptjax.ppo_step import update_epoch
from gptjax.rollout import response_logprobs
from gptjax.train_steps import apply_update, grad_of_trainable, opt_state_shardings

ALGORITHMS = ("grpo", "rloo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """The hyper-parameters of GRPO and RLOO; the stage's own fields: configs/grpo.py."""

    algorithm: str = "grpo"  # grpo | rloo
    group_size: int = 4  # G (GRPO) or k (RLOO): replies sampled per prompt, >= 2
    epochs: int = 1  # passes over each rollout batch
    minibatches: int = 1  # updates per epoch; > 1 update per rollout makes the ratio move
    clip_ratio: float = 0.2  # PPO's ε for the probability ratio
    kl_coef: float = 0.04  # β
    kl_in: str = "loss"  # loss | reward (RLOO: reward only)
    kl_estimator: str = "k2"  # k2 | k3, the per-token estimate when the KL is in the loss
    loss_agg: str = "seq-mean-token-mean"  # AGGREGATIONS
    std_normalize: bool = True  # GRPO: divide by the group's std (False: Dr.GRPO)
    eps: float = 1e-4  # added to the group std: a group whose returns are all equal gets 0
    temperature: float = 1.0  # rollout temperature; training log-probs use the same
    no_eos_penalty: float = 0.0  # subtracted from the score of replies cut without EOS

    def __post_init__(self):
        need(self.algorithm in ALGORITHMS, "algorithm", f"{self.algorithm!r} not in grpo|rloo")
        need(
            isinstance(self.group_size, int) and self.group_size >= 2,
            "group_size",
            f"a group needs >= 2 replies to compare, got {self.group_size}",
        )
        for name in ("epochs", "minibatches"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, f"must be an int >= 1, got {value}")
        need(self.clip_ratio > 0, "clip_ratio", f"must be > 0, got {self.clip_ratio}")
        need(self.kl_coef >= 0, "kl_coef", f"must be >= 0, got {self.kl_coef}")
        need(self.kl_in in ("loss", "reward"), "kl_in", f"{self.kl_in!r} not in loss|reward")
        need(
            self.algorithm == "grpo" or self.kl_in == "reward",
            "kl_in",
            "RLOO puts the KL penalty in the reward (kl_in=reward)",
        )
        need(
            self.kl_estimator in losses.LOSS_KL_ESTIMATORS,
            "kl_estimator",
            f"{self.kl_estimator!r} not in {'|'.join(losses.LOSS_KL_ESTIMATORS)} (k1's "
            "gradient is zero in expectation on-policy: it cannot be a loss)",
        )
        need(self.loss_agg in AGGREGATIONS, "loss_agg", f"{self.loss_agg!r} not in {AGGREGATIONS}")
        need(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        need(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        need(self.no_eos_penalty >= 0, "no_eos_penalty", f"must be >= 0, got {self.no_eos_penalty}")


def from_section(section, prefix: str) -> GroupConfig:
    fields = {f.name: section[f.name] for f in dataclasses.fields(GroupConfig)}
    return from_dict(GroupConfig, fields, prefix)


# ------------------------------------------------------------------ returns, advantages


def returns(scores_B, ended_B, kl_BxN, cfg: GroupConfig):
    """R_B: the score (less no_eos_penalty for replies that never ended), less β·Σ_t k1_t
    when the KL penalty is in the reward."""
    r = scores_B - cfg.no_eos_penalty * (1.0 - ended_B)
    if cfg.kl_in == "reward":
        r = r - cfg.kl_coef * jnp.sum(kl_BxN, axis=1)
    return r


def group_advantages(returns_B, group_size: int, std_normalize: bool, eps: float):
    """GRPO: each reply's return against its group's mean (and std), groups of G
    consecutive rows (the sampler's prompt-major layout)."""
    r_GxN = returns_B.reshape(-1, group_size)
    adv = r_GxN - r_GxN.mean(axis=1, keepdims=True)
    if std_normalize:
        adv = adv / (r_GxN.std(axis=1, keepdims=True) + eps)
    return adv.reshape(-1)


def rloo_advantages(returns_B, group_size: int):
    """RLOO: each reply's return against the mean of the other G − 1 in its group."""
    r = returns_B.reshape(-1, group_size)
    others = (r.sum(axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


def advantages(returns_B, cfg: GroupConfig):
    if cfg.algorithm == "rloo":
        return rloo_advantages(returns_B, cfg.group_size)
    return group_advantages(returns_B, cfg.group_size, cfg.std_normalize, cfg.eps)


def aggregate(x_BxN, mask_BxN, mode: str):
    """The loss of per-token terms x over a minibatch, by `mode` (module docstring)."""
    mask = mask_BxN.astype(jnp.float32)
    if mode == "token-mean":
        return jnp.sum(x_BxN * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    per_seq = jnp.sum(x_BxN * mask, axis=1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    else:  # seq-mean-token-sum-norm: a constant divisor, the longest reply
        per_seq = per_seq / mask.shape[1]
    return jnp.mean(per_seq)


# ------------------------------------------------------------------------ the update


def init_state(params, tx, copy_policy: bool = True):
    """The train state; params are copied (the state is donated, the frozen reference
    params it starts from must survive), unless donated to it (copy_policy False: a LoRA
    policy, see ppo_step.init_state)."""
    params = jax.tree.map(jnp.copy, params) if copy_policy else params
    opt_state = tx.init(lora.trainable(params))
    return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def state_shardings(policy: Model, tx, mesh):
    param_sh = sharding.param_shardings(mesh, policy.logical_axes, policy.abstract_params)
    return {
        "params": param_sh,
        "opt_state": opt_state_shardings(tx, policy.abstract_params, param_sh, mesh),
        "step": sharding.replicated(mesh),
    }


def policy_objective(logp_BxN, mb, cfg: GroupConfig):
    """The loss on the policy's reply log-probs: the clipped surrogate with each reply's
    advantage at its tokens, + β·KL estimate when the penalty is in the loss, aggregated
    by cfg.loss_agg. mb: old_logp [B, N], advantages [B], ref_logprobs [B, N],
    response_mask [B, N]."""
    mask = mb["response_mask"]
    log_ratio = logp_BxN - mb["old_logp"]
    ratio = jnp.exp(log_ratio)
    adv_BxN = mb["advantages"][:, None] * jnp.ones_like(logp_BxN)
    pg1 = -adv_BxN * ratio
    pg2 = -adv_BxN * jnp.clip(ratio, 1 - cfg.clip_ratio, 1 + cfg.clip_ratio)
    pg = aggregate(jnp.maximum(pg1, pg2), mask, cfg.loss_agg)
    kl = aggregate(
        losses.kl_estimate(logp_BxN, mb["ref_logprobs"], cfg.kl_estimator), mask, cfg.loss_agg
    )
    loss = pg + (cfg.kl_coef * kl if cfg.kl_in == "loss" else 0.0)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    stats = {
        "policy_loss": pg,
        "kl_loss": kl,
        "clipfrac": jnp.sum((pg2 > pg1) * mask) / count,
        "approx_kl": jnp.sum(0.5 * jnp.square(log_ratio) * mask) / count,
        "ratio_dev_max": jnp.max(jnp.abs(ratio - 1.0) * mask),
        "loss": loss,
    }
    return loss, stats


def group_loss(params, mb, *, policy: Model, cfg: GroupConfig):
    """policy_objective of the policy's log-probs of a minibatch's replies."""
    logp, entropy = response_logprobs(policy, params, mb, cfg.temperature)
    loss, stats = policy_objective(logp, mb, cfg)
    mask = mb["response_mask"]
    stats["entropy"] = jnp.sum(entropy * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    return loss, stats


def update_minibatch(carry, xs, *, data, policy: Model, tx, schedule, cfg, skip_nonfinite):
    """One optimizer update on the rows index_M of `data`."""
    index_M, _, update_index = xs
    mb = sharding.constrain_batch(jax.tree.map(lambda x: jnp.take(x, index_M, axis=0), data))
    loss_fn = functools.partial(group_loss, policy=policy, cfg=cfg)
    grad_fn, view = grad_of_trainable(loss_fn, carry["params"])
    (loss, stats), grads = grad_fn(view, mb)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    part = {"params": carry["params"], "opt_state": carry["opt_state"], "step": update_index}
    part, upd = apply_update(part, grads, tx, schedule, skip_nonfinite, finite)
    stats.update(grad_norm=upd["grad_norm"], lr=upd["lr"], nonfinite=upd["nonfinite"])
    return {"params": part["params"], "opt_state": part["opt_state"]}, stats


def group_train_step(
    state, batch, rng, *, policy: Model, tx, schedule, cfg: GroupConfig, skip_nonfinite=True
):
    """One GRPO / RLOO update on one rollout batch: `(state, batch, rng) -> (state,
    metrics)`. batch: the rollout (B = prompts × G rows, prompt-major) with its scores [B]
    and ref_logprobs [B, N] (gptjax/rollout.py, or a host reward's scores)."""
    rng = jax.random.fold_in(rng, state["step"])
    mask = batch["response_mask"].astype(jnp.float32)
    b, n = mask.shape
    k = cfg.minibatches
    seq = {key: batch[key] for key in ("tokens", "segment_ids", "positions")}
    seq["response_mask"] = mask
    chunks = jax.tree.map(lambda x: x.reshape(k, b // k, *x.shape[1:]), seq)

    def old_pass(chunk):
        chunk = sharding.constrain_batch(chunk)
        return response_logprobs(policy, state["params"], chunk, cfg.temperature)

    old_logp, old_entropy = (x.reshape(b, n) for x in jax.lax.map(old_pass, chunks))
    kl = (old_logp - batch["ref_logprobs"]) * mask  # k1 per token: the KL we report
    r = returns(batch["scores"], batch["ended"], kl, cfg)
    adv = advantages(r, cfg)
    finite = (
        jnp.all(jnp.isfinite(jnp.where(mask > 0, old_logp, 0.0)))
        & jnp.all(jnp.isfinite(jnp.where(mask > 0, batch["ref_logprobs"], 0.0)))
        & jnp.all(jnp.isfinite(batch["scores"]))
    )
    data = {**seq, "old_logp": old_logp, "advantages": adv}
    data["ref_logprobs"] = batch["ref_logprobs"]
    minibatch_fn = functools.partial(
        update_minibatch,
        data=data,
        policy=policy,
        tx=tx,
        schedule=schedule,
        cfg=cfg,
        skip_nonfinite=skip_nonfinite,
    )
    epoch_fn = functools.partial(
        update_epoch, ptx=None, step=state["step"], cfg=cfg, rows=b, minibatch_fn=minibatch_fn
    )
    before = {key: state[key] for key in ("params", "opt_state")}
    after, stats_ExK = jax.lax.scan(
        epoch_fn, before, (jax.random.split(rng, cfg.epochs), jnp.arange(cfg.epochs))
    )
    after = jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before)
    metrics = {key: jnp.mean(v) for key, v in stats_ExK.items()}
    metrics["nonfinite"] = jnp.maximum(
        jnp.max(stats_ExK["nonfinite"]), 1.0 - finite.astype(jnp.float32)
    )
    metrics["first_ratio_dev_max"] = stats_ExK["ratio_dev_max"][0, 0]
    del metrics["ratio_dev_max"]
    metrics.update(
        score=jnp.mean(batch["scores"]),
        kl=jnp.mean(jnp.sum(kl, axis=1)),
        kl_coef=jnp.asarray(cfg.kl_coef, jnp.float32),
        reward=jnp.mean(r),
        advantage_abs=jnp.mean(jnp.abs(adv)),
        policy_entropy=ppo.masked_mean(old_entropy, mask),
        response_length=jnp.mean(jnp.sum(mask, axis=1)),
        eos_fraction=jnp.mean(batch["ended"]),
    )
    return {**after, "step": state["step"] + 1}, metrics
