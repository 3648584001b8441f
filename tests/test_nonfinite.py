"""Non-finite values (issue 10): a NaN batch follows the nonfinite policy and no
non-finite state is ever checkpointed; PPO discards an update with non-finite inputs or a
KL blow-up inside the step, and kl_guard=stop ends the stage."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import pipeline
from experiments.loop import LoopConfig, StageStopped, run_stage, run_trainer
from experiments.stages import pretrain
from gptjax import ppo
from gptjax.metrics import read_jsonl
from tests.fault_helpers import assert_same, complete_steps, fresh_copy, record, saved_items
from tests.helpers import config_from_flags


class NanAt:
    """Wraps an LM batch iterator: batch `n` gets a NaN loss mask (a NaN loss and grads)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.drawn = inner, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.drawn += 1
        if self.drawn == self.n:
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_batch_follows_the_policy_and_is_never_checkpointed(tiny_run, tmp_path, policy):
    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=())
    config = config_from_flags([*tiny_run["flags"], f"--config.pretrain.nonfinite={policy}"])
    # In-process on one device, as the CLI subprocess that trained tiny_run.
    ctx = pipeline.context(config, str(workdir), "pretrain", jax.devices()[:1])
    parts = pretrain.build(ctx)
    parts["batches"] = NanAt(parts["batches"], 3)
    ckpts = workdir / "pretrain" / "checkpoints"
    if policy == "stop":
        with pytest.raises(StageStopped, match=r"non-finite .* at step 3; stopped, .* is 2"):
            run_trainer(ctx, parts)
        assert complete_steps(ckpts) == [2]
        record("NaN batch at step 3 (nonfinite=stop)", "pretrain", "stopped, checkpoint 2 kept", 1)
    else:
        result, _ = run_trainer(ctx, parts)
        assert result.nonfinite_steps == 1
        rows = read_jsonl(workdir / "pretrain" / "metrics.jsonl")
        assert [r["step"] for r in rows if "nonfinite_step" in r] == [3]
        norm = {r["step"]: r["param_norm"] for r in rows if "param_norm" in r}
        assert norm[3] == norm[2] != norm[4]  # the update of step 3 was skipped, exactly
        assert complete_steps(ckpts) == [4, 6, 8]
        record(
            "NaN batch at step 3 (nonfinite=skip)", "pretrain", "update skipped, run finished", 0
        )
    for step in complete_steps(ckpts):
        assert _all_finite(saved_items(ckpts, step, ("params", "opt_state")))


TOY_SHARDINGS = {
    "params": {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])},
    "step": jax.sharding.SingleDeviceSharding(jax.devices()[0]),
}


class NoBatches:
    """A batch iterator for step functions that ignore their batch."""

    def __iter__(self):
        return self

    def __next__(self):
        return None

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def test_a_non_finite_state_is_never_saved(tmp_path):
    def step_fn(state, batch, rng):
        w = jnp.where(state["step"] >= 3, jnp.nan, state["params"]["w"] + 1.0)
        return {"params": {"w": w}, "step": state["step"] + 1}, {"loss": jnp.float32(0.0)}

    init = lambda: {"params": {"w": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)}
    loop = LoopConfig(steps=6, checkpoint_every=2, progress=False)
    with pytest.raises(StageStopped, match=r"step 4 has non-finite values; not checkpointed .*: 2"):
        run_stage(
            "toy",
            str(tmp_path),
            loop,
            init_state=init,
            state_shardings=TOY_SHARDINGS,
            train_step=step_fn,
            batches=NoBatches(),
            rng=jax.random.key(0),
        )
    assert complete_steps(tmp_path / "checkpoints") == [2]


def _ppo_setup(kl_max=0.0):
    from tests.test_ppo import make_step, one_device, random_rollout

    cfg = ppo.PPOConfig(epochs=1, minibatches=2, kl_max=kl_max)
    state, step = make_step(one_device(), cfg, optax.adam(1e-2))
    return state, step, random_rollout(np.random.default_rng(0), 8)


def _trainable(state):
    return jax.device_get({k: state[k] for k in ("params", "value", "opt_state", "kl")})


def test_ppo_non_finite_log_probs_discard_the_whole_update():
    state, step, batch = _ppo_setup()
    before = _trainable(state)
    batch["ref_logprobs"][2, 0] = np.nan  # a reply token: masked in
    assert batch["response_mask"][2, 0] == 1
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0 and int(state["step"]) == 1
    assert_same(_trainable(state), before)  # params, value, optimizer and β unchanged
    record("NaN reference log-prob", "ppo", "update discarded (nonfinite policy)", 0)


def test_ppo_kl_blow_up_is_rolled_back_inside_the_step():
    state, step, batch = _ppo_setup(kl_max=5.0)
    before = _trainable(state)
    batch["ref_logprobs"] = batch["ref_logprobs"] - 10.0 * batch["response_mask"]
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["kl_blowup"]) == 1.0 and float(metrics["kl_after"]) > 5.0
    assert float(metrics["nonfinite"]) == 0.0
    assert_same(_trainable(state), before)
    state, step, batch = _ppo_setup(kl_max=1e6)  # the same update under a loose limit
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["kl_blowup"]) == 0.0
    assert not np.array_equal(jax.device_get(state["params"]["embed"]), before["params"]["embed"])
    record("KL blow-up (kl_max)", "ppo", "update rolled back", 0)


def test_kl_guard_stop_ends_the_stage(tmp_path):
    def step_fn(state, batch, rng):
        blown = (state["step"] == 2).astype(jnp.float32)
        new = {"params": state["params"], "step": state["step"] + 1}
        return new, {"loss": jnp.float32(0.0), "kl_blowup": blown}

    loop = LoopConfig(steps=6, checkpoint_every=2, progress=False, stop_on=("kl_blowup",))
    with pytest.raises(StageStopped, match=r"kl_blowup at step 3 .* last good checkpoint is 2"):
        run_stage(
            "ppo",
            str(tmp_path),
            loop,
            init_state=lambda: {"params": {"w": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)},
            state_shardings=TOY_SHARDINGS,
            train_step=step_fn,
            batches=NoBatches(),
            rng=jax.random.key(0),
        )
    record("KL blow-up (kl_guard=stop)", "ppo (loop)", "stopped, checkpoint 2 kept", 1)
