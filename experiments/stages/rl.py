"""Online RL stages: PPO and PPO-ptx (InstructGPT sec. 3.5), GRPO and RLOO.

    python -m experiments.main --stages=ppo                 # after pretrain, sft, rm
    python -m experiments.main --stages=ppo_ptx             # the same, with ptx_coef > 0
    python -m experiments.main --stages=grpo,rloo           # critic-free, G replies a prompt
    python -m experiments.main --stages=grpo_gold           # GRPO on the gold labeler

Every instance runs this code on the shared stage loop (experiments/loop.py), with its
config section (`algorithm`: ppo | grpo | rloo; configs/ppo.py, configs/grpo.py) and
stage directory. One loop step is one iteration of gptjax.rl_trainer.RLTrainer: a batch of
prompts in the chat template, replies sampled from the policy with the KV cache
(rollout), scored (scoring: the frozen SFT model's log-probs and the reward: `reward` =
rm, the frozen reward model; gold, the world's labeler; or a user's module:function,
gptjax/rewards.py), then the update (gptjax/ppo_step.py, gptjax/grpo.py). Each phase is
timed. The policy starts from the SFT model; PPO's value model from the RM (from the SFT
trunk with a zero head when the reward is not the RM).

With `tools` set, rollouts call the run's tools (experiments/toolbox.py) and get their
results fed back (multi-turn); the results are masked out of the policy loss, the KL
and the value loss, and PPO's GAE steps over them. `prompts=reason:MODE` trains on the
world's reasoning tasks, and `reward=gold` then judges their final answers (1 right, 0
not: gptjax/world/reasoning.py is_correct).

Resuming is exact: policy, value and optimizer states, β, the step (which seeds the
rollout sampling and the minibatch shuffling) are in the checkpoint, the prompt and ptx
iterator positions in its metadata.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from experiments import sections, sources, toolbox
from experiments.loop import run_stage, stage_meta
from experiments.rundir import StageContext
from gptjax import config as config_lib
from gptjax import evaluate, grpo, lora, ppo, reward_model, rewards, sharding
from gptjax.data import chat
from gptjax.data.iterators import BatchIterator, lm_batches
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.rl_trainer import RLTrainer, ToolUse
from gptjax.rollout import RolloutInputs, rollout_config
from gptjax.world import evaluation as world_eval

KL_GUARDS = ("rollback", "stop")
ALGORITHMS = ("ppo", "grpo", "rloo")


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read; a user's reward function
    must load)."""
    section, name = ctx.section, ctx.name
    algorithm = section.get("algorithm", "ppo")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"{name}.algorithm", f"{algorithm!r} not in {'|'.join(ALGORITHMS)}")
    if algorithm == "ppo":
        cfg = ppo.from_section(section, name)
        samples, minibatches, ptx = 1, cfg.minibatches, cfg.ptx_coef > 0
    else:
        cfg = grpo.from_section(section, name)
        if cfg.algorithm != algorithm:
            raise ConfigError(
                f"{name}.algorithm", f"{algorithm!r} but the section is {cfg.algorithm!r}"
            )
        samples, minibatches, ptx = cfg.group_size, cfg.minibatches, False
    shape = rollout_config(section, name)
    if section.iterations < 1:
        raise ConfigError(f"{name}.iterations", f"must be >= 1, got {section.iterations}")
    loop = sections.loop_config(section, name, section.iterations)
    if section.get("kl_guard", "rollback") not in KL_GUARDS:
        raise ConfigError(f"{name}.kl_guard", f"{section.kl_guard!r} not in rollback|stop")
    if section.get("kl_guard") == "stop":
        loop = dataclasses.replace(loop, stop_on=("kl_blowup",))
    optim = sections.optim_config(section, name)
    mesh = ctx.mesh()
    model = sources.model_config(ctx.config, None)
    shape.check(mesh, model, minibatches, ptx, name, samples)
    reward = section.get("reward", rewards.RM)
    if reward == rewards.GOLD and ctx.config.data.pretrain != sources.WORLD:
        raise ConfigError(f"{name}.reward", "gold needs the built-in world (data.pretrain=world)")
    if reward == rewards.RM and "rm" not in ctx.inputs:
        raise ConfigError(f"{name}.reward", "this instance reads no RM: gold or module:function")
    if reward not in (rewards.RM, rewards.GOLD):
        config_lib.load_callable(reward, f"{name}.reward")
    if section.get("tools", False) and not toolbox.names_of(ctx.config):
        raise ConfigError(f"{name}.tools", "true, but tools.names is empty")
    if reasoning_prompts(section) and reward == rewards.RM:
        raise ConfigError(f"{name}.reward", "the RM never saw reasoning tasks: gold or a function")
    return dict(
        algorithm=algorithm, cfg=cfg, shape=shape, loop=loop, optim=optim, mesh=mesh, reward=reward
    )


def reasoning_prompts(section) -> bool:
    return str(section.get("prompts", "")).startswith(sources.REASON)


def host_reward(ctx: StageContext, spec: str, tokenizer):
    """The reward computed on the host from decoded replies (None for the RM): the world's
    gold labeler, or the user's function named in the section's `reward`."""
    if spec == rewards.RM:
        return None
    if spec == rewards.GOLD and reasoning_prompts(ctx.section):
        fn = rewards.HostReward("gold (the final answer)", world_eval.reasoning_rewards)
    elif spec == rewards.GOLD:
        weight = sources.world_config(ctx.config).length_weight
        fn = rewards.HostReward(
            "gold (the world's labeler)",
            functools.partial(world_eval.gold_rewards, length_weight=weight),
        )
    else:
        fn = rewards.HostReward(spec, config_lib.load_callable(spec, f"{ctx.name}.reward"))

    def score(records, reply_BxN, mask_BxN, ended_B):
        texts = [
            chat.decode_reply(row[m > 0].tolist(), tokenizer)[0]
            for row, m in zip(reply_BxN, mask_BxN)
        ]
        return fn(records, texts, [bool(e) for e in ended_B])

    return score


def eval_fn(ctx: StageContext, policy, tokenizer, trainer: RLTrainer, rm: Model):
    """Gold reward etc. of the policy on the first `eval_prompts` world eval prompts, under
    the evaluator's fixed protocol (greedy and temperature 1); None off the world.

    When the stage trains on the RM, the temperature-1 replies also get the proxy reward
    (the RM's score, as the scoring phase computes it) and their KL to SFT (the
    evaluator's estimator, evaluate.kl_to_reference), so a long run gives
    gold and proxy reward against KL along training: the RL curves of Gao et al. (2022),
    experiments/overopt.py."""
    config, section = ctx.config, ctx.section
    if not section.eval_prompts or config.data.pretrain != sources.WORLD:
        return None
    if reasoning_prompts(section):  # the reason stage evaluates it
        return None
    records = sources.eval_records(config, ctx.workdir)[: section.eval_prompts]
    protocol = sources.protocol(config)
    metrics = world_eval.metrics(sources.world_config(config).length_weight)

    def run(params):
        result = evaluate.evaluate(policy, params, tokenizer, records, metrics, protocol)
        out = {
            f"{proto}/{metric}": result[proto][metric]["mean"]
            for proto in ("greedy", "sample")
            for metric in ("gold_reward", "accuracy", "abstention_unknown", "eos_rate")
        }
        if trainer.host_reward is None:
            out.update(proxy_and_kl(trainer, policy, rm, params, tokenizer, records,
                                    result["replies"]["sample"], protocol))  # fmt: skip
        return out

    return run


def proxy_and_kl(trainer: RLTrainer, policy: Model, rm: Model, params, tokenizer, records,
                 replies, protocol) -> dict:  # fmt: skip
    """Mean RM reward (the proxy the policy is trained on) and mean KL to SFT of the
    policy's sampled replies (the evaluator's estimator, from one pass of policy and reference:
    evaluate.score_with_reference)."""
    rm_params, *ref = trainer.frozen
    ref_params = lora.base(params) if trainer.reference_from_state else ref[0]
    args = (tokenizer, records, replies, protocol)
    _, (ref_logp, _), kl = evaluate.score_with_reference(policy, params, policy, ref_params, *args)
    proxy = evaluate.rm_rewards((rm, rm_params), *args, ref_logp)
    return {"sample/rm_reward": float(proxy.mean()), "sample/kl_to_sft": float(kl.mean())}


def lora_policy(policy: Model, sft_params, value_params, seed: int):
    """A LoRA policy's start: the SFT model with its adapters merged (the reference, read
    back from the policy's state: gptjax/rl_trainer.py) and fresh adapters on it. Its
    arrays are donated to the train state, so none may be shared with the value model's
    (an RM or the SFT trunk)."""
    merged, _ = lora.merge(sft_params, policy.cfg)
    shardings = jax.tree.map(lambda a: a.sharding, sft_params)
    fresh = lora.add_adapters(merged, policy.cfg, jax.random.key(seed), shardings)
    shared = {id(x) for x in jax.tree.leaves((sft_params, value_params))}
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in shared else x, fresh)


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
    reward = host_reward(ctx, s["reward"], tokenizer)
    if reward is None:
        rm, rm_params = sources.load_stage_params(
            config, workdir, ctx.inputs["rm"], tokenizer, head="scalar",
            directory=ctx.checkpoints("rm"), mesh=mesh,
        )  # fmt: skip
    else:  # a value model (PPO) starts from the SFT trunk with a zero head
        rm = Model(sources.model_config(config, tokenizer, head="scalar"))
        rm_params = (
            reward_model.with_scalar_head(rm, sft_params) if s["algorithm"] == "ppo" else None
        )
    if policy.cfg.lora_rank:
        sft_params = lora_policy(policy, sft_params, rm_params, config.seeds.init)
    tools = None
    if section.get("tools", False):
        box = toolbox.build(config, workdir)
        tools = ToolUse(box, toolbox.tokens(config, tokenizer), tokenizer)
    kw = dict(
        iterations=section.iterations,
        max_new_tokens=shape.max_new_tokens,
        eos_id=tokenizer.eos_id,
        sampling_seed=config.seeds.sampling,
        host_reward=reward,
        tools=tools,
    )
    if s["algorithm"] == "ppo":
        trainer = RLTrainer.ppo(
            policy, sft_params, rm, rm_params, rm_params, cfg, s["optim"], mesh, **kw
        )
    else:
        trainer = RLTrainer.group(policy, sft_params, rm, rm_params, cfg, s["optim"], mesh, **kw)
    kw = sharding.host_block(mesh).iterator_kwargs()
    source = sources.prompt_source(config, workdir, section, name)

    def render(record):
        return chat.render_prompt(chat.question_turns(record), tokenizer)

    sources.report_long_prompts(source, render, shape.max_prompt_len, f"{name}.max_prompt_len")

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
    if s["algorithm"] == "ppo" and cfg.ptx_coef > 0:
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
        inputs=RolloutInputs(prompts, ptx, source if reward is not None else None),
        eval_fn=eval_fn(ctx, policy, tokenizer, trainer, rm),
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
            f"{ctx.section.get('reward', 'rm')} score {m['score']:.3f}  KL {m['kl']:.3f}  "
            f"β {m['kl_coef']:.4f}  "
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
        "reward": ctx.section.get("reward", "rm"),
        "text": "\n".join(lines),
        "steps_run": result.steps_run,
        "wall_s": result.wall_s,
        "resumed_from": result.resumed_from,
        "last_metrics": m,
        "eval_metrics": ev,
    }
