"""DPO, IPO, GRPO and RLOO: losses and advantages against NumPy, each method's fixed point
on a one-step bandit with a known optimum, 8 devices == 1, the group sampler, user
reward functions, config validation, and exact resume of every new stage after SIGTERM."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import dpo, grpo, losses, rewards, sampling, sharding, train_steps
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.rl_trainer import RLTrainer
from gptjax.sharding import MeshConfig
from tests.helpers import tiny_model_config
from tests.test_ppo import models, one_device, random_rollout

# ------------------------------------------------------------------ losses vs NumPy


def preference_reference(logp, ref, ranks, valid, beta, loss):
    """Plain loops: per prompt, the mean over its ordered pairs; prompts with a pair."""
    total, prompts = 0.0, 0
    for b in range(logp.shape[0]):
        k = range(logp.shape[1])
        pairs = [
            (w, l)
            for w in k
            for l in k
            if valid[b, w] and valid[b, l] and ranks[b, w] < ranks[b, l]
        ]
        if not pairs:
            continue
        values = []
        for w, l in pairs:
            h = (logp[b, w] - ref[b, w]) - (logp[b, l] - ref[b, l])
            values.append(
                math.log1p(math.exp(-beta * h)) if loss == "dpo" else (h - 0.5 / beta) ** 2
            )
        total, prompts = total + sum(values) / len(values), prompts + 1
    return total, prompts


@pytest.mark.parametrize("loss", dpo.LOSSES)
def test_dpo_and_ipo_losses_equal_numpy_with_padding_ties_and_k_way_lists(loss):
    rng = np.random.default_rng(0)
    logp, ref = rng.normal(size=(2, 5, 4)) * 3 - 10
    ranks = np.array([[0, 1, 2, 3], [0, 0, 1, 0], [1, 0, 0, 0], [2, 2, 2, 0], [0, 1, 0, 0]])
    valid = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    got, count, aux = dpo.preference_loss(logp, ref, ranks, valid, 0.3, loss)
    want, prompts = preference_reference(logp, ref, ranks, valid, 0.3, loss)
    # row 0: 6 pairs of a ranked list of 4; row 1: a tie gives 2 pairs, the pad none;
    # row 2: one pair; row 3: all tied; row 4: one reply: no pair, not counted.
    assert prompts == 3 and int(count) == 3 and int(aux["pairs"]) == 6 + 2 + 1
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_reply_logp_sums_exactly_the_reply_tokens():
    model = Model(tiny_model_config(vocab_size=32, max_len=16))
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 32, size=(2, 2, 12)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 1, 9:] = 0  # a shorter row, right-padded
    mask = np.zeros(tokens.shape, np.float32)
    mask[:, :, 6:] = 1
    mask *= seg
    batch = {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.broadcast_to(np.arange(12), tokens.shape).astype(np.int32),
        "reply_mask": mask,
    }
    got = np.asarray(dpo.reply_logp(model, params, batch))
    for b in range(2):
        for k in range(2):
            logits = model.apply(params, tokens[b, k][None], seg[b, k][None])[0]
            logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
            want = sum(logp[t - 1, tokens[b, k, t]] for t in range(1, 12) if mask[b, k, t])
            np.testing.assert_allclose(got[b, k], want, rtol=1e-5)


def test_group_and_leave_one_out_advantages_equal_numpy():
    r = np.array([1.0, 2.0, 4.0, 7.0, 3.0, 3.0, 3.0, 3.0, -1.0, 0.0, 5.0, 2.0], np.float32)
    groups = r.reshape(-1, 4)
    eps = 1e-4
    mean, std = groups.mean(1, keepdims=True), groups.std(1, keepdims=True)
    np.testing.assert_allclose(
        grpo.group_advantages(r, 4, True, eps), ((groups - mean) / (std + eps)).ravel(), rtol=1e-5
    )
    np.testing.assert_allclose(grpo.group_advantages(r, 4, False, eps), (groups - mean).ravel())
    loo = np.array([[g[i] - np.delete(g, i).mean() for i in range(4)] for g in groups])
    np.testing.assert_allclose(grpo.rloo_advantages(r, 4), loo.ravel(), rtol=1e-6)
    # A group whose returns are all equal has nothing to compare: advantage 0, not NaN.
    assert np.all(np.asarray(grpo.group_advantages(r, 4, True, eps))[4:8] == 0)
    # The GRPO mean includes the reply itself: (G − 1)/G times the leave-one-out advantage.
    np.testing.assert_allclose(
        grpo.group_advantages(r, 4, False, eps), 0.75 * grpo.rloo_advantages(r, 4), rtol=1e-6
    )


def test_each_aggregation_mode_equals_numpy_with_padded_tails():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    lengths = [6, 3, 1, 0]  # padded tails, an empty reply
    mask = (np.arange(6)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    sums = [x[i, : lengths[i]].sum() for i in range(4)]
    want = {
        "token-mean": sum(sums) / sum(lengths),
        "seq-mean-token-mean": np.mean([s / max(n, 1) for s, n in zip(sums, lengths)]),
        "seq-mean-token-sum-norm": np.mean([s / 6 for s in sums]),
    }
    for mode in grpo.AGGREGATIONS:
        np.testing.assert_allclose(grpo.aggregate(x, mask, mode), want[mode], rtol=1e-5)


def test_kl_estimators_and_their_loss_gradients():
    logp, ref = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -1.0, -0.5])
    d = logp - ref
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k1"), d)
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k2"), d**2 / 2)
    np.testing.assert_allclose(losses.kl_estimate(logp, ref, "k3"), np.exp(-d) - 1 + d, rtol=1e-6)
    # As a loss, k1's gradient vanishes in expectation on-policy: the configs refuse it.
    with pytest.raises(ConfigError, match="kl_estimator.*k1"):
        grpo.GroupConfig(kl_estimator="k1")


# ------------------------------------------------------------------ bandit fixed points

A = 6  # actions of a one-step bandit (a one-token reply)
REF_LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=A), jnp.float32)
R = jnp.asarray(np.random.default_rng(1).normal(size=A), jnp.float32)
BETA = 0.5


def tv(p, q) -> float:
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def tilted(scores) -> np.ndarray:
    """π_ref·exp(scores), normalised."""
    p = np.asarray(jax.nn.softmax(REF_LOGITS), np.float64) * np.exp(np.asarray(scores))
    return p / p.sum()


def preference_bandit(loss: str, iterations: int = 600, lr: float = 0.05) -> np.ndarray:
    """The policy DPO / IPO converge to on comparisons of two replies drawn from π_ref,
    labelled by Bradley–Terry from R: the expected loss over such draws, each ordered
    pair weighted by its probability, minimised with Adam."""
    mu, r = np.asarray(jax.nn.softmax(REF_LOGITS)), np.asarray(R)
    i, j = (x.ravel() for x in np.meshgrid(np.arange(A), np.arange(A), indexing="ij"))
    weight = jnp.asarray(mu[i] * mu[j] / (1 + np.exp(-(r[i] - r[j]))), jnp.float32)
    actions = jnp.asarray(np.stack([i, j], 1))  # i ranked above j
    ranks, valid = jnp.tile(jnp.array([0, 1]), (A * A, 1)), jnp.ones((A * A, 2))
    ref = jax.nn.log_softmax(REF_LOGITS)[actions]

    def one(logp_K, ref_K, ranks_K, valid_K):
        args = (x[None] for x in (logp_K, ref_K, ranks_K, valid_K))
        return dpo.preference_loss(*args, BETA, loss)[0]

    def expected_loss(theta):
        logp = jax.nn.log_softmax(theta)[actions]
        return jnp.sum(weight * jax.vmap(one)(logp, ref, ranks, valid))

    return _minimise(expected_loss, iterations, lr)


def _minimise(loss_fn, iterations, lr, keys=None):
    tx = optax.adam(optax.linear_schedule(lr, lr / 50, iterations))

    @jax.jit
    def run(keys):
        def step(carry, key):
            theta, opt = carry
            grads = jax.grad(loss_fn)(theta) if key is None else jax.grad(loss_fn)(theta, key)
            updates, opt = tx.update(grads, opt, theta)
            return (optax.apply_updates(theta, updates), opt), None

        carry = (REF_LOGITS, tx.init(REF_LOGITS))
        (theta, _), _ = jax.lax.scan(step, carry, keys, length=iterations)
        return jax.nn.softmax(theta)

    return np.asarray(run(keys))


def group_bandit(cfg: grpo.GroupConfig, iterations: int = 400, groups: int = 128, seed=0):
    """The policy GRPO / RLOO converge to: each iteration samples `groups` groups of G
    one-token replies, computes returns and advantages (gptjax/grpo.py) and takes one
    update on policy_objective (ratio 1: the on-policy gradient)."""
    ref_logp = jax.nn.log_softmax(REF_LOGITS)
    rows = groups * cfg.group_size

    def loss_fn(theta, key):
        a = jax.random.categorical(key, jax.lax.stop_gradient(theta), shape=(rows,))
        old = jax.lax.stop_gradient(jax.nn.log_softmax(theta))[a][:, None]
        ref, mask = ref_logp[a][:, None], jnp.ones((rows, 1))
        ret = grpo.returns(R[a], jnp.ones(rows), (old - ref) * mask, cfg)
        mb = {
            "old_logp": old,
            "advantages": grpo.advantages(ret, cfg),
            "ref_logprobs": ref,
            "response_mask": mask,
        }
        return grpo.policy_objective(jax.nn.log_softmax(theta)[a][:, None], mb, cfg)[0]

    keys = jax.random.split(jax.random.key(seed), iterations)
    return _minimise(loss_fn, iterations, 0.05, keys)


def test_dpo_converges_to_the_bradley_terry_optimum_and_ipo_to_its_own():
    dpo_optimum = tilted(np.asarray(R) / BETA)
    got = preference_bandit("dpo")
    assert tv(got, dpo_optimum) < 0.05 < tv(jax.nn.softmax(REF_LOGITS), dpo_optimum)
    # IPO (Azar et al. 2023): π* ∝ π_ref·exp(p(y ≻ π_ref)/τ), p the BT win rate.
    mu, r = np.asarray(jax.nn.softmax(REF_LOGITS)), np.asarray(R)
    win = (mu[None, :] / (1 + np.exp(-(r[:, None] - r[None, :])))).sum(1)
    ipo_optimum = tilted(win / BETA)
    got = preference_bandit("ipo")
    assert tv(got, ipo_optimum) < 0.05
    assert tv(got, dpo_optimum) > 0.15  # a different optimum, not DPO's


@pytest.mark.parametrize(
    "algorithm,kw,scale",
    [
        ("rloo", dict(kl_in="reward"), 1.0),  # E[r] − β·KL: π_ref·exp(r/β)
        ("grpo", dict(kl_estimator="k2", std_normalize=False), 0.75),  # c = (G − 1)/G
    ],
)
def test_online_methods_converge_to_their_kl_regularised_optimum(algorithm, kw, scale):
    cfg = grpo.GroupConfig(algorithm=algorithm, group_size=4, kl_coef=BETA, **kw)
    target = tilted(scale * np.asarray(R) / BETA)
    start = tv(jax.nn.softmax(REF_LOGITS), target)
    assert start > 0.15
    assert tv(group_bandit(cfg), target) < 0.05


def test_k3_and_std_normalised_grpo_land_elsewhere():
    """k3's gradient is the forward KL's; dividing by the group std rescales every
    advantage. Both move GRPO off π_ref·exp(c·r/β) (measured: docs/notes.md)."""
    target = tilted(0.75 * np.asarray(R) / BETA)
    k3 = grpo.GroupConfig(group_size=4, kl_coef=BETA, kl_estimator="k3", std_normalize=False)
    std = grpo.GroupConfig(group_size=4, kl_coef=BETA, kl_estimator="k2", std_normalize=True)
    assert tv(group_bandit(k3), target) > 0.03
    assert tv(group_bandit(std), target) > 0.2


# ------------------------------------------------------------------ 8 devices == 1


def group_step(mesh, cfg, tx):
    policy, _ = models()
    shardings = grpo.state_shardings(policy, tx, mesh)
    init = jax.jit(functools.partial(grpo.init_state, tx=tx), out_shardings=shardings)
    state = init(policy.init(jax.random.key(0)))
    step = functools.partial(
        grpo.group_train_step, policy=policy, tx=tx, schedule=lambda s: 1.0, cfg=cfg
    )
    return state, train_steps.jit_train_step(step, mesh, shardings)


@pytest.mark.parametrize("algorithm", grpo.ALGORITHMS)
def test_group_step_on_8_devices_equals_single_device_and_clips(algorithm):
    # 4 prompts x G=4 over 8 batch shards (2 rows each): every group spans two devices.
    cfg = grpo.GroupConfig(
        algorithm=algorithm,
        group_size=4,
        epochs=2,
        minibatches=2,
        kl_in="reward" if algorithm == "rloo" else "loss",
        loss_agg="token-mean",
    )
    batch = random_rollout(np.random.default_rng(3), 16)
    tx = optax.sgd(2.0)  # large steps: later minibatches see moved ratios and clip

    def run(mesh):
        state, step = group_step(mesh, cfg, tx)
        state, metrics = step(state, batch, jax.random.key(0))
        return jax.device_get(metrics), jax.device_get(state["params"])

    m1, p1 = run(one_device())
    m8, p8 = run(sharding.make_mesh(MeshConfig(data=4, fsdp=2)))
    assert float(m1["clipfrac"]) > 0 and float(m1["nonfinite"]) == 0
    for key in ("loss", "policy_loss", "kl_loss", "clipfrac", "kl", "advantage_abs", "entropy"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-6, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
        p1,
        p8,
    )


def test_dpo_step_on_8_devices_equals_single_device():
    model = Model(tiny_model_config(vocab_size=32, max_len=16))
    rng = np.random.default_rng(0)
    b, k, t = 8, 3, 12
    tokens = rng.integers(3, 32, size=(b, k, t)).astype(np.int32)
    mask = np.zeros((b, k, t), np.float32)
    mask[:, :, 7:] = 1
    batch = {
        "tokens": tokens,
        "segment_ids": np.ones_like(tokens),
        "positions": np.broadcast_to(np.arange(t), tokens.shape).astype(np.int32),
        "reply_mask": mask,
        "ranks": np.tile(np.arange(k, dtype=np.int32), (b, 1)),
        "valid": (np.arange(k)[None, :] < rng.integers(2, k + 1, size=b)[:, None]).astype(
            np.float32
        ),
        "ref_seq_logp": (-15 + rng.normal(size=(b, k))).astype(np.float32),
    }
    tx = optax.sgd(1.0)  # update = -grad: compares gradients

    def run(mesh):
        init, shardings = train_steps.jit_init(model, tx, mesh)
        state = init(jax.random.key(0))
        step, _ = dpo.make_steps(model, tx, lambda s: 1.0, cfg=dpo.DPOConfig(beta=0.2))
        step = train_steps.jit_train_step(step, mesh, shardings)
        before = jax.device_get(state["params"])
        state, metrics = step(state, batch, jax.random.key(0))
        grads = jax.tree.map(lambda a, b: a - b, before, jax.device_get(state["params"]))
        return jax.device_get(metrics), grads

    m1, g1 = run(one_device())
    m8, g8 = run(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    for key in ("loss", "accuracy", "margin", "chosen_logratio", "rejected_logratio"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=2e-5, atol=1e-6, err_msg=key)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max()),
        g1,
        g8,
    )


# ------------------------------------------------------------------ sampler, rewards


def test_a_group_sampled_from_one_prefill_equals_repeated_prompts():
    model = Model(tiny_model_config(vocab_size=32, max_len=24))
    params = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, 32, size=(2, 6)).astype(np.int32)
    mask = np.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    seeds = np.arange(6, dtype=np.int32)
    kw = dict(max_new_tokens=8, eos_id=1, temperature=1.0)
    grouped = sampling.generate(model, params, prompt, mask, seeds, samples=3, **kw)
    repeated = sampling.generate(
        model, params, np.repeat(prompt, 3, 0), np.repeat(mask, 3, 0), seeds, **kw
    )
    np.testing.assert_array_equal(grouped[0], repeated[0])
    np.testing.assert_array_equal(grouped[2], repeated[2])
    np.testing.assert_allclose(grouped[1], repeated[1], rtol=1e-5, atol=1e-6)
    assert len({tuple(r) for r in np.asarray(grouped[0])[:3]}) > 1  # a group differs


def test_a_user_reward_function_is_called_as_documented_and_its_errors_name_it():
    from tests import reward_fns

    records = [{"id": i, "prompt": f"question {i}"} for i in range(3)]
    fn = rewards.HostReward("tests.reward_fns:short_and_ended", reward_fns.short_and_ended)
    got = fn(records, ["ab", "abcd", ""], [True, False, True])
    np.testing.assert_allclose(got, [0.98, -0.04, 1.0], rtol=1e-6)
    call = reward_fns.CALLS[-1]
    assert call == {
        "prompts": records,
        "completions": ["ab", "abcd", ""],
        "ended": [True, False, True],
    }
    failing = rewards.HostReward("my_rewards:check", reward_fns.fails_on_the_second_prompt)
    with pytest.raises(
        rewards.RewardError, match=r"my_rewards:check failed on prompt 1 .*question 1.*KeyError"
    ):
        failing(records, ["a", "b", "c"], [True] * 3)
    short = rewards.HostReward("my_rewards:short", reward_fns.one_value_short)
    with pytest.raises(rewards.RewardError, match="my_rewards:short returned 2 values for 3"):
        short(records, ["a", "b", "c"], [True] * 3)
    words = rewards.HostReward("my_rewards:words", reward_fns.not_numbers)
    with pytest.raises(rewards.RewardError, match="my_rewards:words returned list"):
        words(records, ["a", "b", "c"], [True] * 3)


def test_a_non_finite_user_reward_discards_the_iteration():
    policy, _ = models()
    params = policy.init(jax.random.key(0))
    cfg = grpo.GroupConfig(group_size=2, minibatches=1)
    calls = []

    def nan_for_the_first_reply(records, reply, mask, ended):
        calls.append(len(records))
        return np.where(np.arange(len(records)) == 0, np.nan, 1.0)

    trainer = RLTrainer.group(
        policy, params, None, None, cfg, _optim(), one_device(),
        iterations=2, max_new_tokens=4, eos_id=1, sampling_seed=0,
        host_reward=nan_for_the_first_reply,
    )  # fmt: skip
    state = trainer.init_state()
    before = jax.device_get(state["params"])
    prompts = {"tokens": np.full((4, 6), 5, np.int32), "mask": np.ones((4, 6), np.int32)}
    inputs = {"prompts": prompts, "records": [{"id": i} for i in range(4)]}
    state, metrics = trainer.iteration(state, inputs, jax.random.key(0))
    assert calls == [8]  # 4 prompts x G=2, one record per row
    assert float(metrics["nonfinite"]) == 1.0
    jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state["params"]))


def _optim():
    from gptjax.optim import OptimConfig

    return OptimConfig(lr=1e-3, warmup_steps=0)


# ------------------------------------------------------------------ config, stages


@pytest.mark.parametrize(
    "override,field",
    [
        ({"grpo.group_size": 1}, "grpo.group_size"),
        ({"rloo.kl_in": "loss"}, "rloo.kl_in"),
        ({"grpo.loss_agg": "sum"}, "grpo.loss_agg"),
        ({"grpo.minibatches": 3}, "grpo.prompts_per_iteration"),
        ({"grpo.reward": "tests.reward_fns:missing"}, "grpo.reward"),
        ({"grpo_gold.reward": "rm"}, "grpo_gold.reward"),
        ({"dpo.loss": "kto"}, "dpo.loss"),
        ({"dpo.beta": 0.0}, "dpo.beta"),
    ],
)
def test_bad_algorithm_fields_fail_before_any_stage_runs(tmp_path, override, field):
    from configs import pipeline as presets
    from experiments import pipeline

    config = presets.get_config("tiny")
    for key, value in override.items():
        section, name = key.split(".")
        config[section][name] = value
    stages = ["pretrain", "sft", "compare", "rm", "grpo", "rloo", "grpo_gold", "dpo"]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        pipeline.run_stages(config, str(tmp_path), stages)
    assert not os.path.exists(tmp_path / "pretrain")  # nothing computed


# The subprocess: each new stage straight through in one workdir, then in another with a
# SIGTERM sent during its second step, and rerun: the stage resumes from its checkpoint.
_STRAIGHT_THEN_INTERRUPTED = """
import json, os, signal, sys
from experiments import pipeline
from experiments.loop import StageStopped
from gptjax import metrics
from tests.helpers import config_from_flags

flags, straight, cut, stages = json.loads(sys.argv[1])
config = config_from_flags(flags)
pipeline.run_stages(config, straight, stages)
real_write, sent = metrics.MetricsWriter.write, []

def write(self, step, values, prefix=""):
    real_write(self, step, values, prefix)
    if step == 2 and not prefix and not sent:
        sent.append(step)
        os.kill(os.getpid(), signal.SIGTERM)

metrics.MetricsWriter.write = write
stops = []
for stage in stages:
    sent.clear()
    try:
        pipeline.run_stages(config, cut, [stage])
    except StageStopped as e:
        stops.append(str(e))
        pipeline.run_stages(config, cut, [stage])
print("STOPS" + json.dumps(stops))
"""


def test_every_new_stage_resumes_bitwise_after_sigterm(tiny_run, tmp_path):
    from tests.fault_helpers import ROOT, fresh_copy, saved_items
    from tests.helpers import subprocess_env

    rl = dict(
        iterations=4, prompts_per_iteration=4, max_prompt_len=16, max_new_tokens=8,
        epochs=2, minibatches=2, eval_prompts=0, checkpoint_every=100, log_every=1,
    )  # fmt: skip
    flags = list(tiny_run["flags"])
    demos = f"demos:{tiny_run['files']['demos']}"
    for stage in ("grpo", "rloo"):
        flags += [f"--config.{stage}.{k}={v}" for k, v in rl.items()]
        flags.append(f"--config.{stage}.prompts={demos}")
    flags.append("--config.grpo.reward=tests.reward_fns:short_and_ended")
    flags += [
        f"--config.dpo.{k}={v}"
        for k, v in dict(
            steps=4, batch_size=4, seq_len=32, log_every=1, checkpoint_every=100
        ).items()
    ]
    stages = ["dpo", "grpo", "rloo"]
    workdirs = [fresh_copy(tiny_run, tmp_path / name) for name in ("straight", "cut")]
    args = json.dumps([flags, *map(str, workdirs), stages])
    out = subprocess.run(
        [sys.executable, "-c", _STRAIGHT_THEN_INTERRUPTED, args],
        env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    stops = json.loads(out.stdout.split("STOPS", 1)[1])
    assert [s.split(":")[0] for s in stops] == stages, stops  # each one was interrupted

    def per_step(workdir, stage):
        rows = [json.loads(x) for x in open(workdir / stage / "metrics.jsonl")]
        return {
            r["step"]: {
                k: v for k, v in r.items() if not k.startswith("time_") and "_per_s" not in k
            }
            for r in rows
            if "loss" in r
        }

    for stage in stages:
        a, b = per_step(workdirs[0], stage), per_step(workdirs[1], stage)
        assert sorted(a) == [1, 2, 3, 4] and a == b, stage  # bitwise, every metric
        names = ("params", "opt_state")
        got, want = (saved_items(w / stage / "checkpoints", 4, names) for w in workdirs)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    grpo_rows = per_step(workdirs[0], "grpo")
    assert all(math.isfinite(r["score"]) for r in grpo_rows.values())
