"""RLHF stages: PPO and PPO-ptx against the frozen reward model (InstructGPT sec. 3.5).

    python -m experiments.main --stages=ppo                 # after pretrain, sft, rm
    python -m experiments.main --stages=ppo_ptx             # the same, with ptx_coef > 0

Both stages run this code on the shared stage loop (experiments/loop.py), each with its
config section (`config.ppo`, `config.ppo_ptx`: configs/ppo.py) and stage directory.
One loop step is one PPO iteration of gptjax.ppo_trainer.PPOTrainer: a batch of prompts
in the chat template, replies sampled from the policy with the KV cache (rollout),
scored by the frozen RM and the frozen SFT model (scoring), then the update
(gptjax/ppo_step.py). Each phase is timed. The policy starts from the SFT model, the
value model from the RM.

Resuming is exact: policy, value and optimizer states, β, the step (which seeds the
rollout sampling and the minibatch shuffling) are in the checkpoint, the prompt and ptx
iterator positions in its metadata.
"""

from __future__ import annotations

import dataclasses
import sys

import jax

from experiments import sections, sources
from experiments.loop import run_stage, stage_meta
from experiments.rundir import StageContext
from gptjax import evaluate, ppo, sharding
from gptjax.data import chat
from gptjax.data.iterators import BatchIterator, lm_batches
from gptjax.errors import ConfigError
from gptjax.ppo_trainer import PPOTrainer
from gptjax.rollout import RolloutInputs, rollout_config
from gptjax.world.evaluation import METRICS

KL_GUARDS = ("rollback", "stop")


def prompt_messages(record) -> list[dict[str, str]]:
    """The turns up to the last user message (a world prompt, or a demonstration's)."""
    messages = chat.prompt_messages(record)
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    return messages


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


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read)."""
    section, name = ctx.section, ctx.name
    cfg = ppo.from_section(section, name)
    shape = rollout_config(section, name)
    if section.iterations < 1:
        raise ConfigError(f"{name}.iterations", f"must be >= 1, got {section.iterations}")
    loop = sections.loop_config(section, name, section.iterations)
    if section.kl_guard not in KL_GUARDS:
        raise ConfigError(f"{name}.kl_guard", f"{section.kl_guard!r} not in rollback|stop")
    if section.kl_guard == "stop":
        loop = dataclasses.replace(loop, stop_on=("kl_blowup",))
    optim = sections.optim_config(section, name)
    mesh = ctx.mesh()
    shape.check(
        mesh, sources.model_config(ctx.config, None), cfg.minibatches, cfg.ptx_coef > 0, name
    )
    return dict(cfg=cfg, shape=shape, loop=loop, optim=optim, mesh=mesh)


def eval_fn(ctx: StageContext, policy, tokenizer):
    """Gold reward etc. of the policy on the first `eval_prompts` world eval prompts, under
    the evaluator's fixed protocol (greedy and temperature 1); None off the world."""
    config, section = ctx.config, ctx.section
    if not section.eval_prompts or config.data.pretrain != sources.WORLD:
        return None
    records = sources.eval_records(config, ctx.workdir)[: section.eval_prompts]
    protocol = sources.protocol(config)

    def run(params):
        result = evaluate.evaluate(policy, params, tokenizer, records, METRICS, protocol)
        return {
            f"{proto}/{metric}": result[proto][metric]["mean"]
            for proto in ("greedy", "sample")
            for metric in ("gold_reward", "accuracy", "abstention_unknown", "eos_rate")
        }

    return run


def build(ctx: StageContext) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    s = settings(ctx)
    config, workdir, section, name = ctx.config, ctx.workdir, ctx.section, ctx.name
    cfg, shape, mesh = s["cfg"], s["shape"], s["mesh"]
    tokenizer = sources.get_tokenizer(config, workdir)
    policy, sft_params = sources.load_stage_params(
        config, workdir, ctx.inputs["policy"], tokenizer, directory=ctx.checkpoints("policy"),
        mesh=mesh,
    )  # fmt: skip
    rm, rm_params = sources.load_stage_params(
        config, workdir, ctx.inputs["rm"], tokenizer, head="scalar",
        directory=ctx.checkpoints("rm"), mesh=mesh,
    )  # fmt: skip
    trainer = PPOTrainer.build(
        policy,
        sft_params,
        rm,
        rm_params,
        cfg,
        s["optim"],
        mesh,
        iterations=section.iterations,
        max_new_tokens=shape.max_new_tokens,
        eos_id=tokenizer.eos_id,
        sampling_seed=config.seeds.sampling,
    )
    kw = sharding.host_block(mesh).iterator_kwargs()
    source = sources.prompt_source(config, workdir, section, name)

    def render(record):
        return chat.render_prompt(prompt_messages(record), tokenizer)

    report_long_prompts(source, render, shape.max_prompt_len, f"{name}.max_prompt_len")

    def prompt_example(record):
        ids = render(record)[-shape.max_prompt_len :]
        return ids, [0.0] * len(ids)

    prompts = BatchIterator(
        source,
        prompt_example,
        batch_size=shape.prompts_per_iteration,
        seq_len=shape.max_prompt_len,
        seed=config.seeds.data,
        packed=False,
        **kw,
    )
    ptx = None
    if cfg.ptx_coef > 0:
        train_src, _ = sources.pretrain_sources(config, workdir)
        ptx = lm_batches(
            train_src,
            tokenizer,
            batch_size=shape.ptx_batch_size,
            seq_len=shape.ptx_seq_len,
            seed=config.seeds.data,
            **kw,
        )
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=s["loop"],
        inputs=RolloutInputs(prompts, ptx),
        eval_fn=eval_fn(ctx, policy, tokenizer),
    )


def run(ctx: StageContext) -> dict:
    parts = build(ctx)
    trainer, name = parts["trainer"], ctx.name
    result = run_stage(
        name,
        ctx.dir,
        parts["loop"],
        init_state=trainer.init_state,
        state_shardings=trainer.shardings,
        train_step=trainer.iteration,
        batches=parts["inputs"],
        rng=jax.random.key(ctx.config.seeds.init),
        eval_fn=parts["eval_fn"],
        meta=stage_meta(ctx.config, parts["tokenizer"], name),
    )
    m, ev = result.last_metrics, result.eval_metrics
    lines = [
        f"\n== {name}: {result.steps_run} iterations in {result.wall_s:.0f} s"
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
        "stage": name,
        "text": "\n".join(lines),
        "steps_run": result.steps_run,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
        "last_metrics": m,
        "eval_metrics": ev,
    }
