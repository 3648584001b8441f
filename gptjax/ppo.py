"""RLHF with clipped PPO: rollouts, KL-penalised rewards, GAE, the KL controller and the
jitted `ppo_train_step` (InstructGPT, Ouyang et al. 2022, sec. 3.5; the recipe and
details of lm-human-preferences, Ziegler et al. 2019, as catalogued by Huang et al. 2024,
"The N+ implementation details of RLHF with PPO").

One PPO iteration, each part its own jitted function:
  rollout  `rollout`: the policy samples replies with the KV-cache sampler;
  scoring  `score_rollout`: the frozen RM scores each reply at its last token, the frozen
           reference (SFT) model gives per-token log-probs;
  update   `ppo_train_step`: old log-probs and values are recomputed with the training
           forward pass (not taken from the sampler: the first minibatch then has ratio 1),
           rewards = RM score at the last token − β·(log π − log π_ref) at every token,
           GAE, advantage whitening, then epochs × shuffled minibatches of the clipped
           surrogate + clipped value loss (+ entropy bonus, + γ_ptx·LM loss) in nested
           `lax.scan`s, and the adaptive KL controller's update, all inside one jit.

The value model is separate (a scalar-head Model, initialised from the RM, as in
InstructGPT) or, with `value_head=True`, a scalar head on the policy's own trunk. The
KL coefficient β is an array in the train state, so it is checkpointed with it.

Shape legend: B rollouts per iteration, P prompt length (left-padded), N reply tokens
(max_new_tokens), T = P + N, V vocab, E epochs, K minibatches per epoch, M = B // K rows
per minibatch, R pretraining (ptx) rows per minibatch, S their length.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from gptjax import config as config_lib
from gptjax import losses, reward_model, sampling, sharding
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.train_steps import apply_update

HEAD_KEYS = ("score_w", "score_b", "score_logp")  # the scalar head's params (see model.Transformer)


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """The algorithm's hyper-parameters (documented field by field in configs/ppo.py)."""

    epochs: int = 4
    minibatches: int = 4
    clip_ratio: float = 0.2
    clip_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    ptx_coef: float = 0.0
    kl_coef: float = 0.1
    kl_target: float = 0.0  # 0: fixed β; > 0: adaptive toward this KL (nats per reply)
    kl_horizon: float = 10_000.0
    whiten_rewards: bool = False
    no_eos_penalty: float = 0.0
    temperature: float = 1.0
    # 0: off; > 0: an update after which the policy's KL to the reference on this rollout
    # exceeds kl_max (nats per reply) is discarded (the stage then stops or goes on).
    kl_max: float = 0.0
    value_head: bool = False

    @classmethod
    def from_dict(cls, d, prefix: str = "ppo") -> PPOConfig:
        return config_lib.from_dict(cls, d, prefix)

    def validate(self, prefix: str = "ppo") -> None:
        def need(ok, field, msg):
            if not ok:
                raise ConfigError(f"{prefix}.{field}", msg)

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


# ----------------------------------------------------------------------------- rollout


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
):
    """Samples one reply per left-padded prompt; returns the rollout batch.

    tokens/segment_ids/positions [B, T]: prompt then reply. Pads (left of the prompt,
    after the reply's EOS) are segment 0 and never attended to by real tokens; positions
    count real tokens only. response_mask [B, N]: 1 on reply tokens up to and including
    EOS. ended [B]: the reply emitted EOS (else it hit max_new_tokens).
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
    )
    seg_BxT = jnp.concatenate([prompt_mask_BxP, mask_BxN], axis=1).astype(jnp.int32)
    return {
        "tokens": jnp.concatenate([prompt_BxP, reply_BxN], axis=1).astype(jnp.int32),
        "segment_ids": seg_BxT,
        "positions": jnp.maximum(jnp.cumsum(seg_BxT, axis=1) - 1, 0).astype(jnp.int32),
        "response_mask": mask_BxN.astype(jnp.float32),
        "ended": jnp.any((reply_BxN == eos_id) & (mask_BxN > 0), axis=1).astype(jnp.float32),
    }


def response_logprobs(model: Model, params, batch, temperature: float = 1.0):
    """(logp_BxN, entropy_BxN) of the reply tokens under the policy, zero off the mask.

    The logits at column t predict token t + 1, so the N reply tokens (the last N columns)
    are scored by columns P-1 .. T-2. Log-softmax in float32 of logits / temperature: the
    distribution the sampler drew from (lm-human-preferences scales by the temperature in
    training as in sampling). At temperature 1 logp equals `sequence_logprobs`.
    """
    mask = batch["response_mask"]
    n = mask.shape[1]
    logits = model.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"])
    logp_BxNxV = jax.nn.log_softmax(logits[:, -n - 1 : -1].astype(jnp.float32) / temperature)
    logp = jnp.take_along_axis(logp_BxNxV, batch["tokens"][:, -n:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_BxNxV) * logp_BxNxV, axis=-1)
    return logp * mask, entropy * mask


def response_values(model: Model, params, batch):
    """values_BxN: the scalar head at the columns that predict each reply token (the state
    before the token is chosen), as lm-human-preferences reads its value head."""
    mask = batch["response_mask"]
    n = mask.shape[1]
    values_BxT = model.apply(params, batch["tokens"], batch["segment_ids"], batch["positions"])
    return values_BxT[:, -n - 1 : -1] * mask


def last_token_index(mask_BxN):
    """Column (within the reply) of each reply's last token: its EOS if it ended."""
    return jnp.maximum(jnp.sum(mask_BxN, axis=1).astype(jnp.int32) - 1, 0)


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
    scores_B = jnp.take_along_axis(values_BxT, index_B[:, None], axis=1)[:, 0]
    ref_logp, _ = response_logprobs(ref, ref_params, batch, temperature)
    ref_logp_t1 = (
        ref_logp if temperature == 1.0 else response_logprobs(ref, ref_params, batch, 1.0)[0]
    )
    mean_ref_logp_B = jnp.sum(ref_logp_t1, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    scores_B = scores_B + reward_model.reference_term(rm_params, mean_ref_logp_B)
    return {"scores": scores_B.astype(jnp.float32), "ref_logprobs": ref_logp}


# ------------------------------------------------------------------ rewards, KL control


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


# ------------------------------------------------------------------------ train state


def value_tree(policy_params, value_params, value_head: bool):
    """The params the value Model is applied with: its own, or (value_head) the policy's
    trunk with the value head's score_w / score_b."""
    if not value_head:
        return value_params
    trunk = {k: v for k, v in policy_params.items() if k not in HEAD_KEYS and k != "unembed"}
    return {**trunk, **value_params}


def initial_value_params(value_model: Model, rm_params, value_head: bool):
    """InstructGPT initialises the value function from the RM; a value head on the policy
    starts at zero (the RM's head was fitted to another trunk)."""
    if value_head:
        abstract = value_model.abstract_params
        return {k: jnp.zeros(abstract[k].shape, abstract[k].dtype) for k in HEAD_KEYS}
    return rm_params


def init_state(policy_params, value_params, tx, kl_coef: float):
    """The PPO train state. Params are copied: the state is donated to the step, and the
    frozen reference / RM params it starts from must survive that."""
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    policy, value = copy(policy_params), copy(value_params)
    return {
        "params": policy,
        "value": value,
        "opt_state": {"policy": tx.init(policy), "value": tx.init(value)},
        "kl": {"beta": jnp.asarray(kl_coef, jnp.float32)},
        "step": jnp.zeros((), jnp.int32),
    }


def _opt_shardings(tx, abstract_params, param_sh, mesh):
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_map_params(
        tx,
        lambda _, s: s,
        abstract_opt,
        param_sh,
        transform_non_params=lambda _: sharding.replicated(mesh),
    )


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
            "policy": _opt_shardings(tx, policy.abstract_params, policy_sh, mesh),
            "value": _opt_shardings(tx, value_abstract, value_sh, mesh),
        },
        "kl": {"beta": rep},
        "step": rep,
    }


# ------------------------------------------------------------------------ train step


def _constrain(tree, mesh):
    if mesh is None or tree is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, sharding.batch_sharding(mesh))


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
    mesh=None,
    skip_nonfinite: bool = True,
):
    """One PPO update on one rollout batch: `(state, batch, rng) -> (state, metrics)`.

    batch: the rollout (tokens / segment_ids / positions [B, T], response_mask [B, N],
    ended [B]) with its scores [B] and ref_logprobs [B, N] from `score_rollout`, and with
    cfg.ptx_coef > 0 a pretraining batch "ptx" (tokens / segment_ids / positions /
    loss_mask [K·R, S]; minibatch k trains on rows k·R .. (k+1)·R every epoch).

    1. Old log-probs and values with the training forward pass, in minibatch-sized
       chunks: the first minibatch of the first epoch then sees ratio 1 and clip fraction
       0 (Huang et al. 2024's check; bitwise 1 on CPU: the same computation on the same
       shapes), which log-probs from the sampler's cached decode would not give.
    2. KL-penalised rewards (β from the state), GAE, whitened advantages.
    3. E epochs, each a fresh permutation of the B rows cut into K minibatches; each
       minibatch one optimizer update of  L = L_clip + vf_coef·L_V − ent_coef·H
       + ptx_coef·L_ptx  (InstructGPT eq. 2's γ·E_pretrain[log π] as a loss). Policy and
       value params have their own optimizer states (and gradient clipping).
    4. β ← KL controller(β, mean KL per reply of this rollout).
    Metrics are means over the E·K minibatches, plus the first minibatch's ratio check.
    """
    rng = jax.random.fold_in(rng, state["step"])
    e, k = cfg.epochs, cfg.minibatches
    mask = batch["response_mask"].astype(jnp.float32)
    b, n = mask.shape
    m = b // k
    seq = {key: batch[key] for key in ("tokens", "segment_ids", "positions")}
    seq["response_mask"] = mask

    def old_pass(chunk):
        logp, entropy = response_logprobs(policy, state["params"], chunk, cfg.temperature)
        vals = response_values(
            value, value_tree(state["params"], state["value"], cfg.value_head), chunk
        )
        return logp, entropy, vals

    chunks = jax.tree.map(lambda x: x.reshape(k, m, *x.shape[1:]), seq)
    old_logp, old_entropy, old_values = (
        x.reshape(b, n) for x in jax.lax.map(lambda c: old_pass(_constrain(c, mesh)), chunks)
    )
    beta = state["kl"]["beta"]

    def finite_on_mask(x_BxN):
        return jnp.all(jnp.isfinite(jnp.where(mask > 0, x_BxN, 0.0)))

    # A non-finite log-prob, value or score would poison every minibatch and β: the whole
    # iteration is discarded instead, selected inside the jit (no host sync).
    inputs_finite = (
        finite_on_mask(old_logp)
        & finite_on_mask(batch["ref_logprobs"])
        & finite_on_mask(old_values)
        & jnp.all(jnp.isfinite(batch["scores"]))
    )
    rewards, kl = kl_penalized_rewards(
        old_logp,
        batch["ref_logprobs"],
        batch["scores"],
        mask,
        batch["ended"],
        beta,
        cfg.no_eos_penalty,
    )
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)
    data = {
        **seq,
        "old_logp": old_logp,
        "old_values": old_values,
        "advantages": advantages,
        "returns": returns,
    }
    ptx = None
    if cfg.ptx_coef > 0:
        ptx = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch["ptx"])

    def loss_fn(trainable, mb, ptx_mb):
        policy_params, value_params = trainable
        logp, entropy = response_logprobs(policy, policy_params, mb, cfg.temperature)
        vals = response_values(value, value_tree(policy_params, value_params, cfg.value_head), mb)
        mmask = mb["response_mask"]
        pg_sum, count, pg_aux = policy_loss(
            logp, mb["old_logp"], mb["advantages"], mmask, cfg.clip_ratio
        )
        vf_sum, _, vf_aux = value_loss(vals, mb["old_values"], mb["returns"], mmask, cfg.clip_value)
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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def minibatch(carry, xs):
        index_M, ptx_mb, update_index = xs
        mb = _constrain(jax.tree.map(lambda x: jnp.take(x, index_M, axis=0), data), mesh)
        ptx_mb = _constrain(ptx_mb, mesh)
        trainable = (carry["params"], carry["value"])
        (loss, stats), (g_policy, g_value) = grad_fn(trainable, mb, ptx_mb)
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

    def epoch(carry, xs):
        epoch_rng, epoch_index = xs
        perm_KxM = jax.random.permutation(epoch_rng, b).reshape(k, m)
        updates = state["step"] * (e * k) + epoch_index * k + jnp.arange(k)
        return jax.lax.scan(minibatch, carry, (perm_KxM, ptx, updates))

    before = {key: state[key] for key in ("params", "value", "opt_state")}
    trainable, stats_ExK = jax.lax.scan(epoch, before, (jax.random.split(rng, e), jnp.arange(e)))
    kl_per_reply = jnp.mean(jnp.sum(kl, axis=1))
    new_beta = kl_controller_update(beta, kl_per_reply, b, cfg.kl_target, cfg.kl_horizon)
    keep, guard = inputs_finite, {}
    if cfg.kl_max > 0:
        # The updated policy's KL to the reference on this rollout's replies (one more
        # forward pass): a blow-up is rolled back here, before it can be sampled from.
        new_logp = jax.lax.map(
            lambda c: response_logprobs(
                policy, trainable["params"], _constrain(c, mesh), cfg.temperature
            )[0],
            chunks,
        ).reshape(b, n)
        kl_after = jnp.mean(jnp.sum((new_logp - batch["ref_logprobs"]) * mask, axis=1))
        blown = ~(kl_after <= cfg.kl_max)  # NaN counts as a blow-up
        guard = {"kl_after": kl_after, "kl_blowup": (inputs_finite & blown).astype(jnp.float32)}
        keep = keep & ~blown
    trainable = jax.tree.map(lambda new, old: jnp.where(keep, new, old), trainable, before)
    new_beta = jnp.where(keep, new_beta, beta)
    new_state = {**trainable, "kl": {"beta": new_beta}, "step": state["step"] + 1}

    metrics = {key: jnp.mean(v) for key, v in stats_ExK.items()}
    metrics.update(guard)
    metrics["nonfinite"] = jnp.maximum(
        jnp.max(stats_ExK["nonfinite"]), 1.0 - inputs_finite.astype(jnp.float32)
    )
    metrics["first_ratio_dev_max"] = stats_ExK["ratio_dev_max"][0, 0]
    metrics["first_clipfrac"] = stats_ExK["clipfrac"][0, 0]
    del metrics["ratio_dev_max"]
    lengths = jnp.sum(mask, axis=1)
    metrics.update(
        score=jnp.mean(batch["scores"]),
        kl=kl_per_reply,
        kl_coef=beta,
        reward=jnp.mean(jnp.sum(rewards, axis=1)),
        policy_entropy=masked_mean(old_entropy, mask),
        explained_variance=explained_variance(old_values, returns, mask),
        value_mean=masked_mean(old_values, mask),
        return_mean=masked_mean(returns, mask),
        response_length=jnp.mean(lengths),
        eos_fraction=jnp.mean(batch["ended"]),
    )
    return new_state, metrics
