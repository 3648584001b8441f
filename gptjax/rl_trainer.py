"""The trainer of the online RL methods (PPO, GRPO, RLOO): an iteration's three jitted
phases, rollout, scoring and update, run in turn and timed, with the train state's init
and shardings.

Rollout: the policy samples G replies per prompt (G = 1 for PPO) with the KV-cache
sampler. Scoring: the frozen reference (SFT) model's log-probs of the replies, and the
reward: the frozen RM's score at each reply's last token on the device, or a host reward
(gptjax/rewards.py: the gold labeler, a user's function) of the decoded replies. Update:
ppo_step.ppo_train_step (with a value model) or grpo.group_train_step (critic-free).

A LoRA policy (its config's lora_rank) starts as the merged SFT model with zero adapters,
and its reference is that merged model: the policy's own base weights, frozen. The
reference is then read from the train state each iteration (`lora.base`) instead of being
held apart, and the policy params are donated to the state at init: one copy of the base
weights in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import numpy as np

from gptjax import grpo, lora, ppo_step, sharding, train_steps
from gptjax import rollout as rollout_lib
from gptjax.data.packing import host_slice
from gptjax.model import Model, get_model
from gptjax.optim import OptimConfig, make_optimizer
from gptjax.ppo import PPOConfig

# A host reward: (prompt records, reply tokens [B, N], reply mask [B, N], ended [B]) ->
# scores [B], for this process's rows (gptjax/rewards.py HostReward behind a decoder).
HostRewardFn = Callable[[list, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass
class RLTrainer:
    """The jitted phases of an iteration, the state init and its shardings."""

    policy: Model
    mesh: jax.sharding.Mesh
    shardings: dict
    init_state: Callable
    rollout: Callable
    score: Callable
    update: Callable
    frozen: tuple  # (rm params, reference params), or (reference params,) for a host reward
    sampling_seed: int
    group_size: int = 1
    host_reward: HostRewardFn | None = None
    # LoRA: the reference is lora.base(state["params"]), appended to `frozen` each iteration.
    reference_from_state: bool = False

    @classmethod
    def ppo(cls, policy: Model, sft_params, value: Model, value_params, rm_params,
            cfg: PPOConfig, optim: OptimConfig, mesh, *, iterations: int, max_new_tokens: int,
            eos_id: int, sampling_seed: int, host_reward: HostRewardFn | None = None,
            tools: ToolUse | None = None):  # fmt: skip
        """PPO. value: the value model, initialised from value_params (InstructGPT: the RM's);
        the reward is the RM (rm_params, the value model's architecture) or host_reward;
        tools: rollouts call them (multi-turn)."""
        tx, schedule = make_optimizer(optim, iterations * cfg.epochs * cfg.minibatches)
        shardings = ppo_step.state_shardings(policy, value, cfg.value_head, tx, mesh)
        lora_ref = bool(policy.cfg.lora_rank)
        init = jax.jit(
            functools.partial(
                ppo_step.init_state, tx=tx, kl_coef=cfg.kl_coef, copy_policy=not lora_ref
            ),
            out_shardings=shardings,
            donate_argnums=(0,) if lora_ref else (),
        )
        value_init = ppo_step.initial_value_params(value, value_params, cfg.value_head)
        step = functools.partial(
            ppo_step.ppo_train_step, policy=policy, value=value, tx=tx, schedule=schedule, cfg=cfg
        )
        rollout, score = _phases(policy, value, mesh, max_new_tokens, eos_id, cfg.temperature,
                                 1, host_reward, tools)  # fmt: skip
        return cls(
            policy,
            mesh,
            shardings,
            StateInit(init, sft_params, value_init),
            rollout,
            score,
            train_steps.jit_train_step(step, mesh, shardings),
            _frozen(rm_params, sft_params, host_reward, lora_ref),
            sampling_seed,
            host_reward=host_reward,
            reference_from_state=lora_ref,
        )

    @classmethod
    def group(cls, policy: Model, sft_params, rm: Model | None, rm_params,
              cfg: grpo.GroupConfig, optim: OptimConfig, mesh, *, iterations: int,
              max_new_tokens: int, eos_id: int, sampling_seed: int,
              host_reward: HostRewardFn | None = None, tools: ToolUse | None = None):  # fmt: skip
        """GRPO or RLOO: no value model; the reward is the RM (rm, rm_params) or host_reward;
        tools: rollouts call them (multi-turn)."""
        tx, schedule = make_optimizer(optim, iterations * cfg.epochs * cfg.minibatches)
        shardings = grpo.state_shardings(policy, tx, mesh)
        lora_ref = bool(policy.cfg.lora_rank)
        init = jax.jit(
            functools.partial(grpo.init_state, tx=tx, copy_policy=not lora_ref),
            out_shardings=shardings,
            donate_argnums=(0,) if lora_ref else (),
        )
        step = functools.partial(
            grpo.group_train_step, policy=policy, tx=tx, schedule=schedule, cfg=cfg
        )
        rollout, score = _phases(policy, rm, mesh, max_new_tokens, eos_id, cfg.temperature,
                                 cfg.group_size, host_reward, tools)  # fmt: skip
        return cls(
            policy,
            mesh,
            shardings,
            StateInit(init, sft_params),
            rollout,
            score,
            train_steps.jit_train_step(step, mesh, shardings),
            _frozen(rm_params, sft_params, host_reward, lora_ref),
            sampling_seed,
            cfg.group_size,
            host_reward,
            reference_from_state=lora_ref,
        )

    def seeds(self, step: int, batch: int) -> np.ndarray:
        """Per-row sampling seeds: a function of (seed, iteration), so a resumed run draws
        the same replies."""
        rng = np.random.default_rng([self.sampling_seed, step])
        return rng.integers(0, 2**31 - 1, size=batch, dtype=np.int64).astype(np.int32)

    def iteration(self, state, inputs, rng):
        """One iteration: (state, host inputs, rng) -> (state, metrics with timings).

        Each phase is waited for, so the split is real (the loop's overlap of logging with
        the next step is given up: on a CPU it is negligible next to an iteration).
        """
        put = functools.partial(sharding.global_batch, self.mesh)
        t0 = time.perf_counter()
        prompts = put(inputs["prompts"])
        rows = inputs["prompts"]["tokens"].shape[0] * self.group_size  # this host's rows
        block = sharding.host_block(self.mesh)
        seeds = self.seeds(int(state["step"]), rows * block.count)
        seeds = put(host_slice({"s": seeds}, block.index, block.count))["s"]
        batch = jax.block_until_ready(
            self.rollout(state["params"], prompts["tokens"], prompts["mask"], seeds)
        )
        t1 = time.perf_counter()
        if self.host_reward is not None:
            n = batch["response_mask"].shape[1]
            # The reward reads the whole reply, tool results included.
            whole = batch["response_mask"]
            if "tool_mask" in batch:
                whole = whole + batch["tool_mask"]
            host = sharding.host_rows(
                {"r": batch["tokens"][:, -n:], "m": whole, "e": batch["ended"]}
            )
            records = [r for r in inputs["records"] for _ in range(self.group_size)]
            scores = self.host_reward(records, host["r"], host["m"], host["e"])
            batch["scores"] = put({"s": np.asarray(scores, np.float32)})["s"]
        frozen = self.frozen
        if self.reference_from_state:
            frozen = (*frozen, lora.base(state["params"]))
        batch.update(jax.block_until_ready(self.score(*frozen, batch)))
        t2 = time.perf_counter()
        if "ptx" in inputs:
            batch["ptx"] = put(inputs["ptx"])
        state, metrics = self.update(state, batch, rng)
        metrics = jax.block_until_ready(metrics)
        t3 = time.perf_counter()
        metrics = dict(metrics)
        if "tool_mask" in batch:  # fed tool-result tokens per reply
            metrics["tool_tokens"] = float(np.asarray(batch["tool_mask"]).sum(axis=1).mean())
        metrics.update(
            time_rollout_s=t1 - t0,
            time_score_s=t2 - t1,
            time_update_s=t3 - t2,
            time_iteration_s=t3 - t0,
        )
        return state, metrics


class StateInit:
    """init_state(): the jitted init applied to its params. `release()` drops them once the
    state exists (built or restored: experiments/loop.py calls it), so the params a state
    was built from are not kept alive beside it."""

    def __init__(self, init: Callable, *args):
        self._init, self._args = init, args

    def __call__(self):
        if self._args is None:
            raise RuntimeError("init_state's params were released")
        return self._init(*self._args)

    def release(self) -> None:
        self._args = None


def _frozen(rm_params, sft_params, host_reward, reference_from_state: bool) -> tuple:
    """The scoring phase's frozen params before the batch: (rm, reference) or (reference,)
    for a host reward; without the reference when it is read from the state (LoRA)."""
    ref = () if reference_from_state else (sft_params,)
    return ref if host_reward else (rm_params, *ref)


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """What a multi-turn rollout needs: the tools, the markers' ids and caps, and the
    tokenizer that reads calls and writes results."""

    toolbox: object  # gptjax/tools.py Toolbox
    spec: object  # gptjax/tool_sampling.py ToolTokens
    tokenizer: object


def _phases(policy, rm, mesh, max_new_tokens, eos_id, temperature, samples, host_reward, tools):
    """(rollout, score), jitted under the mesh (a tool rollout is a host loop over jitted
    decode segments). score: (rm params, reference params, batch) -> {scores,
    ref_logprobs} for the RM; (reference params, batch) -> {ref_logprobs} for a host
    reward, whose scores the iteration adds. The reference is the policy's model, without
    its LoRA adapters."""
    sample, score = _jitted_phases(
        policy, rm, mesh, max_new_tokens, eos_id, temperature, samples, host_reward is None
    )
    if tools is None:
        return sample, score

    def sample_with_tools(params, prompt, mask, seeds):
        return rollout_lib.tool_rollout(
            policy, params, prompt, mask, seeds, max_new_tokens=max_new_tokens, eos_id=eos_id,
            tokenizer=tools.tokenizer, toolbox=tools.toolbox, spec=tools.spec,
            temperature=temperature, samples=samples,
        )  # fmt: skip

    # Not jitted: the host answers calls between the jitted decode segments it traces.
    return sharding.with_mesh(sample_with_tools, mesh), score


@functools.lru_cache(maxsize=16)
def _jitted_phases(policy, rm, mesh, max_new_tokens, eos_id, temperature, samples, rm_reward):
    """The jitted rollout (without tools) and scoring, one pair per setting in a process:
    stages that sample and score alike (ppo and ppo_ptx in the default run, a sweep's
    cells) share their compiled programs instead of compiling them again per trainer."""
    reference = get_model(lora.without_adapters(policy.cfg))

    def sample(params, prompt, mask, seeds):
        return rollout_lib.rollout(
            policy,
            params,
            prompt,
            mask,
            seeds,
            max_new_tokens=max_new_tokens,
            eos_id=eos_id,
            temperature=temperature,
            samples=samples,
        )

    def score_rm(rm_params, ref_params, batch):
        return rollout_lib.score_rollout(rm, rm_params, reference, ref_params, batch, temperature)

    def score_ref(ref_params, batch):
        logp, _ = rollout_lib.response_logprobs(reference, ref_params, batch, temperature)
        return {"ref_logprobs": logp}

    score = score_rm if rm_reward else score_ref
    return jax.jit(sharding.with_mesh(sample, mesh)), jax.jit(sharding.with_mesh(score, mesh))
