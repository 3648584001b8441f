"""PPO's algorithm, the parts that are equations: KL-penalised rewards, the adaptive KL
controller, GAE, whitening, the clipped policy and value losses (InstructGPT, Ouyang et
al. 2022, sec. 3.5; the recipe and details of lm-human-preferences, Ziegler et al. 2019,
as catalogued by Huang et al. 2024, "The N+ implementation details of RLHF with PPO").

The rollout and scoring are in gptjax/rollout.py, the update step composed of these in
gptjax/ppo_step.py, the trainer that runs an iteration in gptjax/rl_trainer.py.

Shape legend: B rollouts, N reply tokens (max_new_tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gptjax.config import from_dict, need
from gptjax.rollout import last_token_index


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The algorithm's hyper-parameters; the stage's own fields are in configs/ppo.py."""

    epochs: int = 4  # PPO epochs over each rollout batch
    minibatches: int = 4  # updates per epoch; the rollout rows split evenly among them
    clip_ratio: float = 0.2  # PPO's ε for the probability ratio
    clip_value: float = 0.2  # ε_v of the clipped value loss, in reward units
    gamma: float = 1.0  # GAE discount per token (1: the reply is one episode)
    lam: float = 0.95  # GAE λ
    vf_coef: float = 0.1  # value-loss weight in the summed loss
    ent_coef: float = 0.0  # entropy bonus
    ptx_coef: float = 0.0  # γ_ptx: weight of the pretraining LM loss (PPO-ptx); 0 = off
    # β, the per-token KL penalty to the reference (the start value when adaptive).
    # InstructGPT's 0.02 for the large presets; the CPU presets set their own.
    kl_coef: float = 0.02
    # 0: fixed β; > 0: lm-human-preferences' proportional controller moves β toward this
    # KL per reply (nats), at rate batch / kl_horizon.
    kl_target: float = 0.0
    kl_horizon: float = 10_000.0  # the controller's horizon, in rollouts
    whiten_rewards: bool = False  # whiten per-token rewards (mean kept) before GAE
    no_eos_penalty: float = 0.0  # subtracted from the score of replies cut without EOS
    temperature: float = 1.0  # rollout temperature; training log-probs use the same
    # KL blow-up guard: an update after which the policy's KL to the reference on this
    # rollout exceeds kl_max (nats per reply) is discarded; 0 = off (it costs one more
    # policy forward pass per iteration).
    kl_max: float = 0.0
    # "rm": a separate value model initialised from the RM (InstructGPT); "head": a scalar
    # head on the policy's own trunk, initialised at zero.
    value_from: str = "rm"

    @property
    def value_head(self) -> bool:
        return self.value_from == "head"

    def __post_init__(self):
        for name in ("epochs", "minibatches"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, f"must be an int >= 1, got {value}")
        need(self.clip_ratio > 0, "clip_ratio", f"must be > 0, got {self.clip_ratio}")
        need(self.clip_value > 0, "clip_value", f"must be > 0, got {self.clip_value}")
        need(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        need(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        for name in (
            "vf_coef",
            "ent_coef",
            "ptx_coef",
            "kl_coef",
            "kl_target",
            "no_eos_penalty",
            "kl_max",
        ):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(self.kl_horizon > 0, "kl_horizon", f"must be > 0, got {self.kl_horizon}")
        need(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        need(self.value_from in ("rm", "head"), "value_from", f"{self.value_from!r} not in rm|head")


def from_section(section, prefix: str) -> PPOConfig:
    """The algorithm's fields of a stage's config section (the rest configure the stage)."""
    fields = {f.name: section[f.name] for f in dataclasses.fields(PPOConfig)}
    return from_dict(PPOConfig, fields, prefix)


def kl_penalized_rewards(
    logp_BxN, ref_logp_BxN, scores_B, mask_BxN, ended_B, beta, no_eos_penalty: float = 0.0
):
    """Per-token rewards r_t = −β·(log π(y_t) − log π_ref(y_t)), plus the RM score at the
    reply's last token (Ziegler et al. 2019, eq. 2; InstructGPT eq. 2). Returns (rewards,
    kl_BxN) with kl the per-token estimate log π − log π_ref (its sum over a reply is an
    unbiased estimate of the reply's KL).

    no_eos_penalty is subtracted from the score of replies that hit the length limit
    without EOS (Huang et al. 2024 replace such scores by a constant; subtracting keeps the
    RM's ordering among unfinished replies).
    """
    mask = mask_BxN.astype(jnp.float32)
    kl = (logp_BxN - ref_logp_BxN) * mask
    score = scores_B - no_eos_penalty * (1.0 - ended_B)
    n = mask.shape[1]
    at_end = (jnp.arange(n) == last_token_index(mask)[:, None]) * mask
    return -beta * kl + at_end * score[:, None], kl


def kl_controller_update(beta, kl, n_steps, target: float, horizon: float):
    """lm-human-preferences' adaptive KL controller (Ziegler et al. 2019, sec. 2.2):
    proportional, with the error clipped to ±20%:

        e = clip(KL / target − 1, −0.2, 0.2),   β ← β · (1 + e · n_steps / horizon)

    KL is the mean KL per reply, n_steps the replies this iteration. target 0: β is fixed.
    """
    if target <= 0:
        return beta
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    return beta * (1.0 + error * n_steps / horizon)


# ------------------------------------------------------------------ advantages, losses


def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) as a reverse scan.

        δ_t = r_t + γ·V_{t+1} − V_t,    A_t = δ_t + γλ·A_{t+1}

    The reply's last token is terminal (V and A beyond it are 0), padded columns get 0.
    Returns (advantages_BxN, returns_BxN = A + V).
    """
    mask = mask_BxN.astype(jnp.float32)
    values = values_BxN * mask
    next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
    next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1))) * next_mask
    deltas = rewards_BxN + gamma * next_values - values

    def step(adv_next_B, xs):
        delta_B, next_mask_B, mask_B = xs
        adv_B = (delta_B + gamma * lam * next_mask_B * adv_next_B) * mask_B
        return adv_B, adv_B

    _, adv_NxB = jax.lax.scan(
        step, jnp.zeros(mask.shape[0], jnp.float32), (deltas.T, next_mask.T, mask.T), reverse=True
    )
    advantages = adv_NxB.T
    return advantages, (advantages + values) * mask


def gae_over_turns(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float):
    """GAE over the policy's own tokens of a tool-using reply: a column off the mask inside
    the reply (a tool result the host fed) is skipped, not terminal, so δ_t uses the value
    at the policy's next token after the result, and A_t that token's advantage:

        δ_t = r_t + γ·V_{next(t)} − V_t,   A_t = δ_t + γλ·A_{next(t)}

    the MDP whose steps are the policy's tokens (the tool is part of the environment). On
    a mask without holes it equals `gae`. Returns (advantages_BxN, returns_BxN)."""
    mask = mask_BxN.astype(jnp.float32)
    values = values_BxN * mask

    def step(carry, xs):
        adv_next, value_next = carry
        r, v, m = xs
        adv = r + gamma * value_next - v + gamma * lam * adv_next
        keep = m > 0
        carry = (jnp.where(keep, adv, adv_next), jnp.where(keep, v, value_next))
        return carry, adv * m

    zeros = jnp.zeros(mask.shape[0], jnp.float32)
    _, adv_NxB = jax.lax.scan(step, (zeros, zeros), (rewards_BxN.T, values.T, mask.T), reverse=True)
    advantages = adv_NxB.T
    return advantages, (advantages + values) * mask


def masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def whiten(x_BxN, mask_BxN, shift_mean: bool = True, eps: float = 1e-8):
    """(x − mean) / std over the masked entries only; 0 off the mask. shift_mean=False adds
    the mean back (lm-human-preferences' `whiten`, used for rewards)."""
    mask = mask_BxN.astype(jnp.float32)
    mean = masked_mean(x_BxN, mask)
    var = masked_mean(jnp.square(x_BxN - mean), mask)
    out = (x_BxN - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(logp_BxN, old_logp_BxN, advantages_BxN, mask_BxN, clip: float):
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ρ = π/π_old,   L = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))

    Returns (loss_sum, token count, aux sums: clipfrac, approxkl = ½(log ρ)², ratio).
    """
    mask = mask_BxN.astype(jnp.float32)
    log_ratio = logp_BxN - old_logp_BxN
    ratio = jnp.exp(log_ratio)
    pg1 = -advantages_BxN * ratio
    pg2 = -advantages_BxN * jnp.clip(ratio, 1.0 - clip, 1.0 + clip)
    aux = {
        "clipfrac_sum": jnp.sum((pg2 > pg1) * mask),
        "approxkl_sum": jnp.sum(0.5 * jnp.square(log_ratio) * mask),
        "ratio_sum": jnp.sum(ratio * mask),
        "ratio_dev_max": jnp.max(jnp.abs(ratio - 1.0) * mask),
    }
    return jnp.sum(jnp.maximum(pg1, pg2) * mask), jnp.sum(mask), aux


def value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, clip: float):
    """Clipped value loss (lm-human-preferences, as in OpenAI baselines' PPO2):

        V_clip = V_old + clip(V − V_old, −ε_v, ε_v),   L = ½·max((V − R)², (V_clip − R)²)

    Returns (loss_sum, token count, aux sums: vf_clipfrac).
    """
    mask = mask_BxN.astype(jnp.float32)
    clipped = old_values_BxN + jnp.clip(values_BxN - old_values_BxN, -clip, clip)
    err, err_clipped = jnp.square(values_BxN - returns_BxN), jnp.square(clipped - returns_BxN)
    aux = {"vf_clipfrac_sum": jnp.sum((err_clipped > err) * mask)}
    return jnp.sum(0.5 * jnp.maximum(err, err_clipped) * mask), jnp.sum(mask), aux


def explained_variance(values_BxN, returns_BxN, mask_BxN):
    """1 − Var(R − V) / Var(R) over reply tokens: 1 is a perfect value function."""
    mask = mask_BxN.astype(jnp.float32)
    var = lambda x: masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    return 1.0 - var(returns_BxN - values_BxN) / jnp.maximum(var(returns_BxN), 1e-8)
