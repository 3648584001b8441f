"""RLHF stages: PPO and PPO-ptx against the frozen reward model (InstructGPT sec. 3.5).

    python -m experiments.main --stages=ppo                 # after pretrain, sft, rm
    python -m experiments.main --stages=ppo_ptx             # the same, with ptx_coef > 0

Both stages run this code on the shared stage loop (experiments/loop.py), each with its
config section (`config.ppo`, `config.ppo_ptx`: configs/ppo.py) and stage directory.
One loop step is one PPO iteration: a batch of prompts in the chat template, replies
sampled from the policy with the KV cache (rollout), scored by the frozen RM and the
frozen SFT model (scoring), then `gptjax.ppo.ppo_train_step` (update). Each phase is
timed. The policy starts from the SFT model, the value model from the RM.

Resuming is exact: policy, value and optimizer states, β, the step (which seeds the
rollout sampling and the minibatch shuffling) are in the checkpoint, the prompt and ptx
iterator positions in its metadata.

Measured at tiny (20 iterations of 64 prompts, 4 epochs x 2 minibatches, β 0.2; 3 PPO
seeds over one SFT and RM; all 512 eval prompts): gold reward greedy SFT -0.22, PPO
-0.08, PPO-ptx -0.13; T=1 SFT -0.31, PPO -0.18, PPO-ptx -0.26; accuracy greedy 0.17 ->
0.12 / 0.12; KL to SFT ~1.0 (PPO) and ~1.9 nats (PPO-ptx); held-out pretraining loss
SFT 3.3, PPO 3.4, PPO-ptx 1.4. That RM scores "i don't know" above correct answers,
so PPO buys its gold reward with abstention. ~2.3 s per iteration on 2 CPU cores, the
update ~90% of it (`python -m experiments.bench ppo`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import numpy as np

from experiments import common
from experiments import evaluate as eval_stage
from experiments.loop import run_stage
from gptjax import config as config_lib
from gptjax import evaluate, ppo, sharding, train_steps
from gptjax.data import builders, chat
from gptjax.data.iterators import BatchIterator, lm_batches
from gptjax.data.packing import host_slice
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.optim import OptimConfig, make_optimizer

STAGES = ("ppo", "ppo_ptx")
VALUE_FROM = ("rm", "head")
KL_GUARDS = ("rollback", "stop")
# Fields of a config section that are PPOConfig's (the rest configure the stage).
_ALGO = tuple(f.name for f in dataclasses.fields(ppo.PPOConfig) if f.name != "value_head")


def algo_config(section, prefix: str) -> ppo.PPOConfig:
    if section.value_from not in VALUE_FROM:
        raise ConfigError(f"{prefix}.value_from", f"{section.value_from!r} not in rm|head")
    fields = {name: section[name] for name in _ALGO}
    cfg = config_lib.from_dict(
        ppo.PPOConfig, {**fields, "value_head": section.value_from == "head"}, prefix
    )
    cfg.validate(prefix)
    return cfg


def prompt_messages(record) -> list[dict[str, str]]:
    """The turns up to the last user message (a world prompt, or a demonstration's)."""
    messages = chat.prompt_messages(record)
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    return messages


def prompt_source(config, workdir: str, section, prefix: str):
    spec = section.prompts
    if spec == common.WORLD:
        return common.world_data(config, workdir)["ppo_prompts"]
    try:
        return builders.load_split(spec, "train", common.data_dir(config, workdir))
    except ValueError as e:
        raise ConfigError(f"{prefix}.prompts", str(e)) from None


def report_long_prompts(source, render, limit: int, field: str) -> int:
    """Counts prompts longer than `limit` tokens and says so before training: they are
    cut to their last `limit` tokens (the end of a chat prompt is the turn to answer),
    never a crash. Returns the count."""
    lengths = [len(render(source[i])) for i in range(len(source))]
    if not lengths:
        raise ConfigError(field.rsplit(".", 1)[0] + ".prompts", "the prompt dataset is empty")
    n_long = sum(n > limit for n in lengths)
    if n_long:
        print(
            f"{field}: {n_long} of {len(lengths)} prompts are longer than {limit} tokens "
            f"(longest {max(lengths)}); each keeps its last {limit} tokens",
            file=sys.stderr,
        )
    return n_long


def left_align(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A right-padded [B, P] prompt batch -> left-padded tokens and mask (the sampler's)."""
    tokens, mask = batch["tokens"], (batch["segment_ids"] > 0).astype(np.int32)
    shift = tokens.shape[1] - mask.sum(axis=1)
    cols = (np.arange(tokens.shape[1])[None, :] - shift[:, None]) % tokens.shape[1]
    rows = np.arange(tokens.shape[0])[:, None]
    return {"tokens": tokens[rows, cols], "mask": mask[rows, cols]}


class RolloutInputs:
    """Prompt batches (and pretraining batches for ptx), resumable as one JSON position."""

    def __init__(self, prompts: BatchIterator, ptx: BatchIterator | None = None):
        self.prompts, self.ptx = prompts, ptx

    def __iter__(self):
        return self

    def __next__(self):
        out = {"prompts": left_align(next(self.prompts))}
        if self.ptx is not None:
            out["ptx"] = next(self.ptx)
        return out

    def get_state(self):
        return {
            "prompts": self.prompts.get_state(),
            "ptx": self.ptx.get_state() if self.ptx is not None else None,
        }

    def set_state(self, state):
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])


@dataclasses.dataclass
class PPOTrainer:
    """The three jitted phases of an iteration, the state init and its shardings."""

    policy: Model
    value: Model
    mesh: jax.sharding.Mesh
    cfg: ppo.PPOConfig
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
        cfg: ppo.PPOConfig,
        optim: OptimConfig,
        mesh,
        *,
        iterations: int,
        max_new_tokens: int,
        eos_id: int,
        sampling_seed: int,
    ) -> PPOTrainer:
        tx, schedule = make_optimizer(optim, iterations * cfg.epochs * cfg.minibatches)
        shardings = ppo.state_shardings(policy, rm, cfg.value_head, tx, mesh)
        init = jax.jit(
            functools.partial(ppo.init_state, tx=tx, kl_coef=cfg.kl_coef), out_shardings=shardings
        )
        value_init = ppo.initial_value_params(rm, rm_params, cfg.value_head)
        step = functools.partial(
            ppo.ppo_train_step,
            policy=policy,
            value=rm,
            tx=tx,
            schedule=schedule,
            cfg=cfg,
            mesh=mesh,
        )

        def rollout(params, prompt, mask, seeds):
            return ppo.rollout(
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
            return ppo.score_rollout(rm, rm_params, policy, ref_params, batch, cfg.temperature)

        return cls(
            policy,
            rm,
            mesh,
            cfg,
            shardings,
            functools.partial(init, sft_params, value_init),
            jax.jit(rollout),
            jax.jit(score),
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


def check_shapes(section, cfg: ppo.PPOConfig, policy: Model, mesh, prefix: str) -> None:
    dp = sharding.data_parallel_size(mesh) * sharding.host_block(mesh).count
    per = cfg.minibatches * dp
    if section.prompts_per_iteration % per:
        raise ConfigError(
            f"{prefix}.prompts_per_iteration",
            f"{section.prompts_per_iteration} is not divisible by minibatches x "
            f"data-parallel size = {per}",
        )
    if cfg.ptx_coef > 0 and section.ptx_batch_size % per:
        raise ConfigError(
            f"{prefix}.ptx_batch_size",
            f"{section.ptx_batch_size} is not divisible by minibatches x data-parallel "
            f"size = {per}",
        )
    total = section.max_prompt_len + section.max_new_tokens
    if total > policy.cfg.max_len:
        raise ConfigError(
            f"{prefix}.max_new_tokens",
            f"max_prompt_len + max_new_tokens = {total} exceeds model.max_len={policy.cfg.max_len}",
        )
    if cfg.ptx_coef > 0 and section.ptx_seq_len > policy.cfg.max_len:
        raise ConfigError(
            f"{prefix}.ptx_seq_len",
            f"{section.ptx_seq_len} exceeds model.max_len={policy.cfg.max_len}",
        )


def eval_fn(config, workdir: str, section, policy: Model, tokenizer):
    """Gold reward etc. of the policy on the first `eval_prompts` world eval prompts, under
    the evaluator's fixed protocol (greedy and temperature 1); None off the world."""
    if not section.eval_prompts or config.data.pretrain != common.WORLD:
        return None
    records = eval_stage.eval_records(config, workdir)[: section.eval_prompts]
    protocol = eval_stage.protocol(config)

    def run(params):
        result = evaluate.evaluate(policy, params, tokenizer, records, protocol)
        return {
            f"{proto}/{metric}": result[proto][metric]["mean"]
            for proto in ("greedy", "sample")
            for metric in ("gold_reward", "accuracy", "abstention_unknown", "eos_rate")
        }

    return run


def build(config, workdir: str, stage: str) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    section = config[stage]
    cfg = algo_config(section, stage)
    if section.iterations < 1:
        raise ConfigError(f"{stage}.iterations", f"must be >= 1, got {section.iterations}")
    loop = common.loop_config(section, stage, section.iterations)
    if section.kl_guard not in KL_GUARDS:
        raise ConfigError(f"{stage}.kl_guard", f"{section.kl_guard!r} not in rollback|stop")
    if section.kl_guard == "stop":
        loop = dataclasses.replace(loop, stop_on=("kl_blowup",))
    optim = config_lib.from_dict(OptimConfig, section.optim, f"{stage}.optim")
    optim.validate(f"{stage}.optim")
    mesh = common.make_mesh(config)
    tokenizer = common.get_tokenizer(config, workdir)
    policy, sft_params = common.load_stage_params(
        config, workdir, "sft", tokenizer, directory=section.policy_from or None
    )
    rm, rm_params = common.load_stage_params(
        config, workdir, "rm", tokenizer, head="scalar", directory=section.rm_from or None
    )
    check_shapes(section, cfg, policy, mesh, stage)
    trainer = PPOTrainer.build(
        policy,
        sft_params,
        rm,
        rm_params,
        cfg,
        optim,
        mesh,
        iterations=section.iterations,
        max_new_tokens=section.max_new_tokens,
        eos_id=tokenizer.eos_id,
        sampling_seed=config.seeds.sampling,
    )
    kw = sharding.host_block(mesh).iterator_kwargs()
    source = prompt_source(config, workdir, section, stage)

    def render(record):
        return chat.render_prompt(prompt_messages(record), tokenizer)

    report_long_prompts(source, render, section.max_prompt_len, f"{stage}.max_prompt_len")

    def prompt_example(record):
        ids = render(record)[-section.max_prompt_len :]
        return ids, [0.0] * len(ids)

    prompts = BatchIterator(
        source,
        prompt_example,
        batch_size=section.prompts_per_iteration,
        seq_len=section.max_prompt_len,
        seed=config.seeds.data,
        packed=False,
        **kw,
    )
    ptx = None
    if cfg.ptx_coef > 0:
        train_src, _ = common.pretrain_sources(config, workdir)
        ptx = lm_batches(
            train_src,
            tokenizer,
            batch_size=section.ptx_batch_size,
            seq_len=section.ptx_seq_len,
            seed=config.seeds.data,
            **kw,
        )
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=loop,
        inputs=RolloutInputs(prompts, ptx),
        eval_fn=eval_fn(config, workdir, section, policy, tokenizer),
    )


def run_ppo_stage(config, workdir: str, stage: str) -> dict:
    parts = build(config, workdir, stage)
    trainer = parts["trainer"]
    result = run_stage(
        stage,
        common.stage_dir(workdir, stage),
        parts["loop"],
        init_state=trainer.init_state,
        state_shardings=trainer.shardings,
        train_step=trainer.iteration,
        batches=parts["inputs"],
        rng=jax.random.key(config.seeds.init),
        eval_fn=parts["eval_fn"],
        meta={
            "config": common.resolved_config_json(config),
            "tokenizer_hash": parts["tokenizer"].hash,
            "stage": stage,
        },
    )
    m, ev = result.last_metrics, result.eval_metrics
    lines = [
        f"\n== {stage}: {result.steps_run} iterations in {result.wall_s:.0f} s"
        + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
    ]
    if m:
        lines.append(
            f"RM score {m['score']:.3f}  KL {m['kl']:.3f}  β {m['kl_coef']:.4f}  "
            f"length {m['response_length']:.1f}  EOS {m['eos_fraction']:.2f}  "
            f"s/iter {m['time_iteration_s']:.2f} (rollout {m['time_rollout_s']:.2f}, "
            f"score {m['time_score_s']:.2f}, update {m['time_update_s']:.2f})"
        )
    if ev:
        lines.append(
            f"gold reward greedy {ev['greedy/gold_reward']:.3f}  T=1 {ev['sample/gold_reward']:.3f}"
            f"  accuracy greedy {ev['greedy/accuracy']:.3f}  T=1 {ev['sample/accuracy']:.3f}"
        )
    return {
        "stage": stage,
        "text": "\n".join(lines),
        "steps_run": result.steps_run,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
        "last_metrics": m,
        "eval_metrics": ev,
    }


def run(config, workdir: str) -> dict:
    return run_ppo_stage(config, workdir, "ppo")


def run_ptx(config, workdir: str) -> dict:
    return run_ppo_stage(config, workdir, "ppo_ptx")
