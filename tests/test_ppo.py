"""PPO: GAE, losses, whitening, KL control against plain references; the train step's
first-minibatch ratio, a bandit with a known optimum, 8 devices == 1, exact resume."""

import dataclasses
import functools
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import ppo, ppo_step, sharding, train_steps
from gptjax import rollout as rollout_lib
from gptjax.model import Model
from gptjax.sharding import MeshConfig
from tests.helpers import subprocess_env, tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_mask(rng, b, n):
    """Reply masks: a prefix of random length per row, including an empty and a full row."""
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0], lengths[1] = n, 0
    return (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain loops over each reply's tokens, last to first."""
    b, n = rewards.shape
    adv = np.zeros((b, n))
    for i in range(b):
        length = int(mask[i].sum())
        last = 0.0
        for t in reversed(range(length)):
            next_value = values[i, t + 1] if t + 1 < length else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            last = delta + gamma * lam * last
            adv[i, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)])
def test_gae_equals_a_python_loop_with_padded_tails(gamma, lam):
    rng = np.random.default_rng(0)
    b, n = 7, 12
    mask = random_mask(rng, b, n)
    rewards = rng.normal(size=(b, n)).astype(np.float32) * mask
    values = rng.normal(size=(b, n)).astype(np.float32)
    values_padded = values.copy()
    values_padded[mask == 0] = 99.0  # garbage off the mask must not leak in
    want_adv, want_ret = gae_reference(rewards, values * mask, mask, gamma, lam)
    adv, ret = ppo.gae(rewards, values_padded, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_clipped_policy_loss_equals_numpy_on_both_clipped_branches():
    eps = 0.2
    # ratio, advantage: unclipped; A>0 and ratio above 1+ε (clipped); A<0 and ratio below
    # 1-ε (clipped); A>0 with ratio below 1-ε and A<0 above 1+ε (not clipped: max keeps ρ).
    ratio = np.array([[1.05, 1.5, 0.5, 0.5, 1.5, 1.0]], np.float32)
    adv = np.array([[0.7, 2.0, -1.5, 1.0, -0.5, 3.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 0]], np.float32)
    old = np.log(np.full_like(ratio, 0.3))
    logp = old + np.log(ratio)
    pg1, pg2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    want = (np.maximum(pg1, pg2) * mask).sum()
    loss_sum, count, aux = ppo.policy_loss(logp, old, adv, mask, eps)
    np.testing.assert_allclose(loss_sum, want, rtol=1e-5)
    assert float(count) == 5
    assert float(aux["clipfrac_sum"]) == 2  # exactly the two clipped branches
    np.testing.assert_allclose(
        aux["approxkl_sum"], (0.5 * np.log(ratio) ** 2 * mask).sum(), rtol=1e-5
    )
    # the clipped branches carry no gradient; the unclipped ones -A·ρ
    grad = jax.grad(lambda lp: ppo.policy_loss(lp, old, adv, mask, eps)[0])(jnp.asarray(logp))
    want_grad = np.where([[1, 0, 0, 1, 1, 0]], -adv * ratio, 0.0)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_clipped_value_loss_equals_numpy_on_both_branches():
    eps = 0.2
    old = np.array([[0.0, 0.0, 0.0, 0.0, 1.0]], np.float32)
    new = np.array([[0.1, 1.0, -1.0, 1.0, 5.0]], np.float32)
    ret = np.array([[0.3, 2.0, -2.0, -1.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 1, 0]], np.float32)
    clipped = old + np.clip(new - old, -eps, eps)
    err, err_c = (new - ret) ** 2, (clipped - ret) ** 2
    want = (0.5 * np.maximum(err, err_c) * mask).sum()
    loss_sum, count, aux = ppo.value_loss(new, old, ret, mask, eps)
    np.testing.assert_allclose(loss_sum, want, rtol=1e-6)
    # cols 1, 2: the value moved past the clip range toward the return, so the clipped
    # error is larger and taken (no gradient); col 3 moved away: the unclipped one.
    assert float(aux["vf_clipfrac_sum"]) == ((err_c > err) * mask).sum() == 2
    assert float(count) == 4


def test_whitening_uses_only_masked_entries():
    rng = np.random.default_rng(0)
    mask = random_mask(rng, 6, 10)
    x = rng.normal(3.0, 2.0, size=(6, 10)).astype(np.float32)
    garbage = np.where(mask > 0, x, 1e6).astype(np.float32)
    w = np.asarray(ppo.whiten(garbage, mask))
    on = w[mask > 0]
    assert abs(on.mean()) < 1e-5 and abs(on.std() - 1) < 1e-4
    assert np.all(w[mask == 0] == 0)
    np.testing.assert_allclose(w, np.asarray(ppo.whiten(x, mask)), rtol=1e-5, atol=1e-6)
    kept = np.asarray(ppo.whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(kept.mean(), x[mask > 0].mean(), rtol=1e-5)


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    up = ppo.kl_controller_update(0.1, 9.0, 64, 6.0, 10_000.0)
    down = ppo.kl_controller_update(0.1, 3.0, 64, 6.0, 10_000.0)
    assert float(up) > 0.1 > float(down)
    # errors are clipped to ±20%: KL 10x the target moves β like KL 1.2x
    far = ppo.kl_controller_update(0.1, 60.0, 64, 6.0, 10_000.0)
    np.testing.assert_allclose(far, 0.1 * (1 + 0.2 * 64 / 10_000), rtol=1e-6)
    np.testing.assert_allclose(float(up), float(far), rtol=1e-6)
    assert ppo.kl_controller_update(0.1, 60.0, 64, 0.0, 10_000.0) == 0.1  # target 0: fixed


def test_rewards_are_the_kl_penalty_plus_the_score_at_the_last_token():
    logp = np.array([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]], np.float32)
    ref = np.array([[-1.5, -1.0, -0.5, 0.0], [-2.0, -2.0, -2.0, -2.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
    rewards, kl = ppo.kl_penalized_rewards(
        logp, ref, np.array([2.0, 3.0]), mask, np.array([1.0, 0.0]), 0.1, no_eos_penalty=1.0
    )
    want = -0.1 * (logp - ref) * mask
    want[0, 2] += 2.0
    want[1, 3] += 3.0 - 1.0  # no EOS: the penalty comes off the score
    np.testing.assert_allclose(rewards, want, rtol=1e-6)
    np.testing.assert_allclose(kl, (logp - ref) * mask)


# --------------------------------------------------------------------------- train step

N_NEW = 6


@functools.cache
def models():
    policy = Model(tiny_model_config(vocab_size=32, max_len=16))
    value = Model(tiny_model_config(vocab_size=32, max_len=16, head="scalar"))
    return policy, value


def random_rollout(rng, b, p=8, n=N_NEW, vocab=32):
    prompt_mask = (np.arange(p)[None, :] >= rng.integers(0, 4, size=b)[:, None]).astype(np.int32)
    mask = random_mask(rng, b, n)
    mask[1, 0] = 1  # every reply has at least one token
    seg = np.concatenate([prompt_mask, mask.astype(np.int32)], axis=1)
    tokens = rng.integers(3, vocab, size=(b, p + n)).astype(np.int32) * (seg > 0)
    return {
        "tokens": tokens.astype(np.int32),
        "segment_ids": seg,
        "positions": np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32),
        "response_mask": mask,
        "ended": (rng.random(b) < 0.5).astype(np.float32),
        "scores": rng.normal(size=b).astype(np.float32),
        "ref_logprobs": (-3.5 + 0.3 * rng.normal(size=(b, n))).astype(np.float32) * mask,
    }


def make_step(mesh, cfg, tx, value_head=False, seed=0):
    policy, value = models()
    params = policy.init(jax.random.key(seed))
    value_params = value.init(jax.random.key(seed + 1))
    value_params["score_w"] = 0.1 * jax.random.normal(jax.random.key(seed + 2), (32,))
    value_params = ppo_step.initial_value_params(value, value_params, value_head)
    shardings = ppo_step.state_shardings(policy, value, value_head, tx, mesh)
    state = jax.jit(
        functools.partial(ppo_step.init_state, tx=tx, kl_coef=cfg.kl_coef), out_shardings=shardings
    )(params, value_params)
    step = functools.partial(
        ppo_step.ppo_train_step,
        policy=policy,
        value=value,
        tx=tx,
        schedule=lambda s: 1.0,
        cfg=cfg,
    )
    return state, train_steps.jit_train_step(step, mesh, shardings)


def one_device():
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


def first_minibatch_metrics(value_head: bool) -> dict:
    """One PPO update (2 epochs x 4 minibatches, Adam at lr 1e-2) on a random rollout, on
    one device: the metrics the first-minibatch test reads."""
    cfg = ppo.PPOConfig(
        epochs=2, minibatches=4, clip_ratio=0.2, value_from="head" if value_head else "rm"
    )
    state, step = make_step(one_device(), cfg, optax.adam(1e-2), value_head)
    batch = random_rollout(np.random.default_rng(0), 16)
    state, metrics = step(state, batch, jax.random.key(0))
    names = ("first_ratio_dev_max", "first_clipfrac", "approx_kl", "nonfinite")
    return {**{k: float(metrics[k]) for k in names}, "step": int(state["step"])}


@pytest.mark.parametrize("value_head", [False, True])
def test_first_minibatch_has_ratio_one_and_no_clipping(value_head):
    # The old log-probs' forward-only pass and the first minibatch's training pass give
    # bitwise the same numbers in the programs XLA builds at its default optimisation
    # level, the pipeline's (and at the suite's flags, tests/helpers.py xla_flags; not at -O1
    # or -O2, 2.4e-7 apart): the update runs in a child process with the pipeline's flags,
    # so the test checks the programs the pipeline runs.
    code = (
        "import json; from tests.test_ppo import first_minibatch_metrics as f; "
        f"print(json.dumps(f({value_head})))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(pipeline_flags=True),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    metrics = json.loads(child.stdout.splitlines()[-1])
    assert metrics["first_ratio_dev_max"] == 0.0  # bitwise: the same forward pass
    assert metrics["first_clipfrac"] == 0.0
    # later minibatches moved (lr 1e-2): the check above is not vacuous
    assert metrics["approx_kl"] > 1e-6 and metrics["nonfinite"] == 0
    assert metrics["step"] == 1


def test_ppo_step_on_8_devices_equals_single_device():
    cfg = ppo.PPOConfig(epochs=1, minibatches=1, ent_coef=0.01, ptx_coef=0.5)
    batch = random_rollout(np.random.default_rng(1), 16)
    rng = np.random.default_rng(2)
    ptx_tokens = rng.integers(3, 32, size=(8, 16)).astype(np.int32)
    batch["ptx"] = {
        "tokens": ptx_tokens,
        "segment_ids": np.ones_like(ptx_tokens),
        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy(),
        "loss_mask": np.ones((8, 16), np.float32),
    }
    tx = optax.sgd(1.0)  # update = -grad: compares gradients exactly

    def run(mesh):
        state, step = make_step(mesh, cfg, tx)
        before = jax.device_get({"params": state["params"], "value": state["value"]})
        state, metrics = step(state, batch, jax.random.key(0))
        after = jax.device_get({"params": state["params"], "value": state["value"]})
        return jax.device_get(metrics), jax.tree.map(lambda a, b: a - b, before, after)

    m1, g1 = run(one_device())
    m8, g8 = run(sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
    for key in ("loss", "policy_loss", "value_loss", "ptx_loss", "entropy", "kl", "score"):
        np.testing.assert_allclose(m1[key], m8[key], rtol=2e-5, atol=1e-6, err_msg=key)
    assert abs(float(m1["ptx_loss"])) > 0 and abs(float(m1["value_loss"])) > 0
    # float32 with another reduction order: errors scale with the largest gradient entry.
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-7
        ),
        g1,
        g8,
    )


def test_one_step_bandit_converges_to_the_kl_regularised_optimum():
    """One reply token, a fixed reward per token: maximising E[r] − β·KL(π‖π_ref) has the
    closed-form optimum π* ∝ π_ref·exp(r/β). A sign error in the KL penalty, the ratio or
    the advantages sends PPO elsewhere, which "the reward went up" would not catch."""
    vocab, b, beta, iterations = 16, 256, 0.5, 60
    policy = Model(tiny_model_config(vocab_size=vocab, max_len=4))
    value = Model(tiny_model_config(vocab_size=vocab, max_len=4, head="scalar"))
    ref_params = policy.init(jax.random.key(0))
    # A non-uniform reference: scale up the random tied embedding (sharper logits).
    ref_params["embed"] = ref_params["embed"] * 4.0
    r = np.random.default_rng(0).normal(size=vocab).astype(np.float32)
    cfg = ppo.PPOConfig(epochs=4, minibatches=4, kl_coef=beta, gamma=1.0, lam=1.0)
    tx = optax.adam(optax.linear_schedule(1e-2, 0.0, iterations * 16))
    mesh = one_device()
    shardings = ppo_step.state_shardings(policy, value, False, tx, mesh)
    state = jax.jit(
        functools.partial(ppo_step.init_state, tx=tx, kl_coef=beta), out_shardings=shardings
    )(ref_params, value.init(jax.random.key(1)))
    step = train_steps.jit_train_step(
        functools.partial(
            ppo_step.ppo_train_step,
            policy=policy,
            value=value,
            tx=tx,
            schedule=lambda s: 0.0,
            cfg=cfg,
        ),
        mesh,
        shardings,
    )
    rollout = jax.jit(
        functools.partial(rollout_lib.rollout, policy, max_new_tokens=1, eos_id=-1, temperature=1.0)
    )
    ref_logprobs = jax.jit(lambda p, batch: rollout_lib.response_logprobs(policy, p, batch)[0])
    prompt, prompt_mask = np.full((b, 1), 3, np.int32), np.ones((b, 1), np.int32)

    def probs(params):
        return np.asarray(jax.nn.softmax(policy.apply(params, prompt[:1])[0, -1]), np.float64)

    for it in range(iterations):
        seeds = np.arange(it * b, (it + 1) * b, dtype=np.int32)
        batch = dict(rollout(state["params"], prompt, prompt_mask, seeds))
        batch["scores"] = jnp.asarray(r)[batch["tokens"][:, -1]]
        batch["ref_logprobs"] = ref_logprobs(ref_params, batch)
        state, metrics = step(state, batch, jax.random.key(it))
    pi_ref = probs(ref_params)
    target = pi_ref * np.exp(r / beta)
    target /= target.sum()
    tv = 0.5 * np.abs(probs(state["params"]) - target).sum()
    start = 0.5 * np.abs(pi_ref - target).sum()
    assert start > 0.3, start  # the optimum is far from where PPO starts
    assert tv < 0.05, (tv, start)


# ------------------------------------------------------------------------ the stage


def tiny_workdir(workdir, tools: str = ""):
    """A tiny world, its tokenizer, and stand-in SFT / RM checkpoints (random init; the
    RM is the SFT trunk with a random scalar head), as the earlier stages would leave.
    tools: tools.names (the tokenizer then has the tool markers)."""
    from configs import pipeline
    from experiments import sources
    from gptjax import checkpoint as ckpt_lib

    config = pipeline.get_config("tiny")
    config.tools.names = tools
    config.model.update(d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=32)
    config.tokenizer.vocab_size = 320
    config.world.update(
        n_known=8,
        n_unknown=4,
        n_demo_unknown=2,
        n_obscure=2,
        bios_per_person=4,
        n_worksheets=40,
        n_ignorance_docs=10,
        n_noise_docs=20,
        n_pretrain_heldout=8,
        n_demos=16,
        n_demos_heldout=4,
        n_ppo_prompts=40,
        n_eval_prompts=8,
    )
    train_src, _ = sources.pretrain_sources(config, str(workdir))
    tokenizer = sources.get_tokenizer(config, str(workdir), corpus=train_src)
    policy = Model(sources.model_config(config, tokenizer))
    params = policy.init(jax.random.key(0))
    if tools:  # the random policy closes a call often: its (tied) embedding row x 40
        from gptjax.tools import CALL_END

        assert policy.cfg.tie_embeddings and params["embed"].shape[0] >= tokenizer.vocab_size
        params["embed"] = params["embed"].at[tokenizer.special_id(CALL_END)].multiply(40.0)
    rm_params = {
        **params,
        "score_w": jax.random.normal(jax.random.key(1), (32,)),
        "score_b": jnp.zeros(()),
        "score_logp": jnp.asarray(0.3),  # the RM reads the SFT model's log-probs too
    }
    for stage, tree in (("sft", params), ("rm", rm_params)):
        ckpt = ckpt_lib.Checkpointer(
            os.path.join(workdir, stage, "checkpoints"), ("params",), async_save=False
        )
        ckpt.save(1, {"params": tree}, {"tokenizer_hash": tokenizer.hash})
        ckpt.close()
    config.ppo_ptx.update(
        iterations=4,
        prompts_per_iteration=8,
        epochs=2,
        minibatches=2,
        max_prompt_len=20,
        max_new_tokens=8,
        ptx_batch_size=4,
        ptx_seq_len=32,
        eval_prompts=0,  # the world's eval prompts do not fit max_len=32
        checkpoint_every=100,
    )
    return config


def _resume_is_bitwise(tmp_path, monkeypatch, stage: str, tool_names: str = "", **section):
    """Runs `stage` (4 iterations) straight, and again stopped by SIGTERM during iteration
    3 then resumed; asserts every metric of every iteration and the final checkpoint are
    equal bitwise. Returns the per-iteration metrics."""
    from experiments import pipeline
    from experiments.loop import StageStopped
    from experiments.stages import rl as rl_stage
    from gptjax.metrics import read_jsonl
    from gptjax.rollout import RolloutInputs

    def setup(workdir):
        config = tiny_workdir(workdir, tool_names)
        if stage != "ppo_ptx":
            config[stage].update({**config.ppo_ptx.to_dict(), "ptx_coef": 0.0, **section})
        return config

    def run(workdir):
        # One device: the stage's mesh is the config's, over every (8 simulated) device.
        ctx = pipeline.context(config, str(workdir), stage, jax.devices()[:1])
        return rl_stage.run(ctx)

    config = setup(tmp_path / "straight")
    straight = run(tmp_path / "straight")
    assert straight["steps_run"] == 4

    resumed = tmp_path / "resumed"
    setup(resumed)
    real_next, calls = RolloutInputs.__next__, []

    def next_then_sigterm(self):
        calls.append(1)
        if len(calls) == 3:  # arrives during iteration 3: saved after it, then stopped
            os.kill(os.getpid(), signal.SIGTERM)
        return real_next(self)

    monkeypatch.setattr(RolloutInputs, "__next__", next_then_sigterm)
    with pytest.raises(StageStopped, match="received SIGTERM at step 3"):
        run(resumed)
    monkeypatch.setattr(RolloutInputs, "__next__", real_next)
    again = run(resumed)
    assert again["resumed_from"] == 3 and again["steps_run"] == 1

    def per_step(workdir):
        rows = read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
        return {
            r["step"]: {k: v for k, v in r.items() if not k.startswith("time_")}
            for r in rows
            if "loss" in r
        }

    a, b = per_step(tmp_path / "straight"), per_step(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert a == b  # bitwise: every metric of every iteration, β and the ptx loss included

    def final(workdir):
        from gptjax import checkpoint as ckpt_lib

        names = ("params", "value", "opt_state", "kl")
        ckpt = ckpt_lib.Checkpointer(
            os.path.join(workdir, stage, "checkpoints"), names, async_save=False
        )
        meta = ckpt._manager.item_metadata(4)
        abstract = {
            k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta[k])
            for k in names
        }
        _, items, _ = ckpt.restore(abstract, 4)
        ckpt.close()
        return jax.device_get(items)

    jax.tree.map(np.testing.assert_array_equal, final(tmp_path / "straight"), final(resumed))
    return a


def test_resume_mid_ppo_reproduces_the_uninterrupted_run_bitwise(tmp_path, monkeypatch):
    a = _resume_is_bitwise(tmp_path, monkeypatch, "ppo_ptx")
    assert a[4]["ptx_loss"] > 0 and a[4]["kl"] != 0


def test_resume_mid_multi_turn_ppo_is_bitwise(tmp_path, monkeypatch):
    """PPO whose rollouts call tools: results fed back between decode segments, masked out
    of the losses. The random policy closes calls by chance (a malformed call is answered
    with an error result, fed back the same way)."""
    a = _resume_is_bitwise(tmp_path, monkeypatch, "ppo", tool_names="calc", tools=True)
    assert any(row["tool_tokens"] > 0 for row in a.values()) and a[4]["kl"] != 0


def test_in_stage_proxy_and_kl_read_the_frozen_rm_and_reference(tmp_path):
    """The RL curves of experiments/overopt.py: the in-stage evaluation's RM reward and KL
    to SFT. KL is 0 at the reference itself; the proxy depends on the replies only (the
    RM and its SFT feature are frozen), not on the policy being evaluated."""
    from experiments import pipeline
    from experiments.stages import rl as rl_stage
    from gptjax import evaluate

    config = tiny_workdir(tmp_path)
    config.ppo.update({**config.ppo_ptx.to_dict(), "ptx_coef": 0.0})
    ctx = pipeline.context(config, str(tmp_path), "ppo", jax.devices()[:1])
    parts = rl_stage.build(ctx)
    trainer, tokenizer = parts["trainer"], parts["tokenizer"]
    policy, sft_params = trainer.policy, trainer.frozen[-1]
    rm = Model(dataclasses.replace(policy.cfg, head="scalar"))
    records = [{"prompt": p} for p in ("who is mo?", "2 + 3 = ?", "hi", "where is lyon?")]
    protocol = evaluate.Protocol(max_new_tokens=6, batch_size=8)
    replies = evaluate.generate_replies(
        policy, sft_params, tokenizer, records, mode=evaluate.CHAT, temperature=1.0,
        samples=2, protocol=protocol,
    )  # fmt: skip
    args = (tokenizer, records, replies, protocol)
    at_sft = rl_stage.proxy_and_kl(trainer, policy, rm, sft_params, *args)
    assert at_sft["sample/kl_to_sft"] == 0.0
    other = jax.tree.map(lambda x: x * 1.5, sft_params)
    moved = rl_stage.proxy_and_kl(trainer, policy, rm, other, *args)
    assert moved["sample/kl_to_sft"] != 0.0
    assert moved["sample/rm_reward"] == at_sft["sample/rm_reward"]
    head_only = evaluate.score_replies(rm, trainer.frozen[0], *args)
    assert not np.isclose(head_only.mean(), at_sft["sample/rm_reward"])  # the feature is in


def test_rl_stages_with_the_same_rollout_settings_share_its_compiled_programs():
    """A second PPO trainer (ppo_ptx after ppo) gets the first's jitted rollout and scoring,
    so they compile once in a process; another reply length gets its own."""
    from gptjax.optim import OptimConfig
    from gptjax.rl_trainer import RLTrainer

    policy, rm = Model(tiny_model_config()), Model(tiny_model_config(head="scalar"))
    params, rm_params = policy.init(jax.random.key(0)), rm.init(jax.random.key(1))
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])

    def trainer(new_tokens):
        kw = dict(iterations=3, max_new_tokens=new_tokens, eos_id=-1, sampling_seed=0)
        return RLTrainer.ppo(policy, params, rm, rm_params, rm_params, ppo.PPOConfig(),
                             OptimConfig(), mesh, **kw)  # fmt: skip

    a, b, c = trainer(6), trainer(6), trainer(5)
    assert a.rollout is b.rollout and a.score is b.score
    assert c.rollout is not a.rollout
