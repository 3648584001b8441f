"""The PPO trainer: its three jitted phases (rollout, scoring, update), the train state's
init and shardings, and one iteration that runs them in turn, timing each.

The policy starts from the SFT params, the value model from the RM's (or a zero head on
the policy's trunk, PPOConfig.value_head); the RM and the reference (SFT) params stay
frozen beside the state.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import numpy as np

from gptjax import ppo_step, sharding, train_steps
from gptjax import rollout as rollout_lib
from gptjax.data.packing import host_slice
from gptjax.model import Model
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.ppo import PPOConfig


@dataclasses.dataclass
class PPOTrainer:
    """The three jitted phases of an iteration, the state init and its shardings."""

    policy: Model
    value: Model
    mesh: jax.sharding.Mesh
    cfg: PPOConfig
    shardings: dict
    init_state: callable
    rollout: callable
    score: callable
    update: callable
    frozen: tuple  # (rm params, reference params)
    sampling_seed: int

    @classmethod
    def build(
        cls,
        policy: Model,
        sft_params,
        rm: Model,
        rm_params,
        cfg: PPOConfig,
        optim: OptimConfig,
        mesh,
        *,
        iterations: int,
        max_new_tokens: int,
        eos_id: int,
        sampling_seed: int,
    ) -> PPOTrainer:
        tx, schedule = make_optimizer(optim, iterations * cfg.epochs * cfg.minibatches)
        shardings = ppo_step.state_shardings(policy, rm, cfg.value_head, tx, mesh)
        init = jax.jit(
            functools.partial(ppo_step.init_state, tx=tx, kl_coef=cfg.kl_coef),
            out_shardings=shardings,
        )
        value_init = ppo_step.initial_value_params(rm, rm_params, cfg.value_head)
        step = functools.partial(
            ppo_step.ppo_train_step,
            policy=policy,
            value=rm,
            tx=tx,
            schedule=schedule,
            cfg=cfg,
        )

        def sample(params, prompt, mask, seeds):
            return rollout_lib.rollout(
                policy,
                params,
                prompt,
                mask,
                seeds,
                max_new_tokens=max_new_tokens,
                eos_id=eos_id,
                temperature=cfg.temperature,
            )

        def score(rm_params, ref_params, batch):
            return rollout_lib.score_rollout(
                rm, rm_params, policy, ref_params, batch, cfg.temperature
            )

        return cls(
            policy,
            rm,
            mesh,
            cfg,
            shardings,
            functools.partial(init, sft_params, value_init),
            jax.jit(sharding.with_mesh(sample, mesh)),
            jax.jit(sharding.with_mesh(score, mesh)),
            train_steps.jit_train_step(step, mesh, shardings),
            (rm_params, sft_params),
            sampling_seed,
        )

    def seeds(self, step: int, batch: int) -> np.ndarray:
        """Per-row sampling seeds: a function of (seed, iteration), so a resumed run draws
        the same replies."""
        rng = np.random.default_rng([self.sampling_seed, step])
        return rng.integers(0, 2**31 - 1, size=batch, dtype=np.int64).astype(np.int32)

    def iteration(self, state, inputs, rng):
        """One PPO iteration: (state, host inputs, rng) -> (state, metrics with timings).

        Each phase is waited for, so the split is real (the loop's overlap of logging with
        the next step is given up: on a CPU it is negligible next to an iteration).
        """
        put = functools.partial(sharding.global_batch, self.mesh)
        t0 = time.perf_counter()
        prompts = put(inputs["prompts"])
        rows = inputs["prompts"]["tokens"].shape[0]  # this host's share of the batch
        block = sharding.host_block(self.mesh)
        seeds = self.seeds(int(state["step"]), rows * block.count)
        seeds = put(host_slice({"s": seeds}, block.index, block.count))["s"]
        batch = jax.block_until_ready(
            self.rollout(state["params"], prompts["tokens"], prompts["mask"], seeds)
        )
        t1 = time.perf_counter()
        batch.update(jax.block_until_ready(self.score(*self.frozen, batch)))
        t2 = time.perf_counter()
        if "ptx" in inputs:
            batch["ptx"] = put(inputs["ptx"])
        state, metrics = self.update(state, batch, rng)
        metrics = jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        metrics = dict(metrics)
        metrics.update(
            time_rollout_s=t1 - t0,
            time_score_s=t2 - t1,
            time_update_s=t3 - t2,
            time_iteration_s=t3 - t0,
        )
        return state, metrics
