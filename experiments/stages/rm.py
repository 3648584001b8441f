"""Reward model: the SFT model with a scalar head, trained on ranked comparisons.

    python -m experiments.main --stages=compare,rm            # after sft, same workdir
    python -m experiments.main --stages=rm \\
        --config.data.comparisons=comparisons:/path/comparisons.jsonl

InstructGPT (Ouyang et al. 2022, sec. 3.5): the RM starts from the SFT params with a new
scalar head (score_w = 0, score_b = 0), reads the reward at each reply's last token
(its EOS), and minimises the mean of -log σ(r_w − r_l) over all C(K,2) pairs of a
prompt, the K replies of a prompt in one batch element (gptjax/reward_model.py). One
jitted, sharded, donated step on the shared stage loop (experiments/loop.py), resumable
from `<workdir>/rm/train/`.

After training, the bias is shifted so that SFT demonstrations average reward 0 (the
world's demos; the user's, if data.demos is a file; else the chosen replies), and the
shifted params are the stage's output: `<workdir>/rm/checkpoints` (item "params").
Metrics (gptjax/rm_eval.py) go to `<workdir>/rm/metrics.json` and the summary, with, on
world comparisons, a probe of what the RM knows (gptjax/world/probe.py). Measurements
behind the defaults: docs/notes.md.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from experiments import sections, sources
from experiments.loop import run_trainer, stage_meta
from experiments.rundir import StageContext, write_json
from gptjax import checkpoint as ckpt_lib
from gptjax import reward_model, rm_eval, sharding
from gptjax.data.iterators import ComparisonBatches, record_messages
from gptjax.model import Model
from gptjax.trainer import LMTrainer, check_fits
from gptjax.world import probe

BASELINES = {"shorter": rm_eval.shorter, "not_idk": probe.not_idk}


def demo_records(config, workdir: str, train_src, n: int) -> tuple[list[dict], str]:
    """Up to n single-reply records whose mean reward the bias is set to cancel."""
    if config.data.demos != sources.WORLD:
        src, what = sources.demo_sources(config, workdir)[0], "the user's demos"
    elif config.data.comparisons == sources.FROM_COMPARE:
        src, what = sources.world_data(config, workdir)["demos"], "world demos"
    else:
        src, what = None, "chosen replies (no demos for these comparisons)"
    out = []
    for i in range(min(n, len(src if src is not None else train_src))):
        if src is not None:
            messages = record_messages(src[i])
            context, reply = messages[:-1], messages[-1]["content"]
        else:
            rec = train_src[i]
            context, reply = rec["messages"], rec["responses"][int(np.argmin(rec["ranks"]))]
        out.append({"messages": context, "responses": [reply], "ranks": [0]})
    return out, f"{len(out)} {what}"


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read)."""
    train, optim, loop = sections.train_config(ctx.section, ctx.name)
    mesh = ctx.mesh()
    check_fits(mesh, train, optim, sources.model_config(ctx.config, None, head="scalar"), ctx.name)
    return dict(train=train, optim=optim, loop=loop, mesh=mesh)


def build(ctx: StageContext) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    s = settings(ctx)
    config, workdir, section, mesh, train_cfg = (
        ctx.config,
        ctx.workdir,
        ctx.section,
        s["mesh"],
        s["train"],
    )
    tokenizer = sources.get_tokenizer(config, workdir)
    train_src, heldout_src, k_max = sources.comparison_splits(
        config, workdir, ctx.input_dir("comparisons"), section, ctx.name
    )
    sft_model, sft_params = sources.load_stage_params(
        config, workdir, ctx.inputs["init"], tokenizer, directory=ctx.checkpoints("init"), mesh=mesh
    )
    model_cfg = sources.model_config(config, tokenizer, head="scalar")
    optim_cfg = s["optim"]
    trainer = LMTrainer.build(
        model_cfg,
        optim_cfg,
        train_cfg,
        mesh,
        config.seeds.init,
        init_params=reward_model.with_scalar_head(
            Model(model_cfg), sft_params, ref_weight=1.0 if section.ref_logprob else 0.0
        ),
        make_steps=functools.partial(
            reward_model.make_steps, grad_accum_steps=optim_cfg.grad_accum_steps
        ),
    )
    attach = lambda records: records  # noqa: E731
    if section.ref_logprob:
        attach = functools.partial(
            rm_eval.with_ref_logp, sft_model, sft_params, tokenizer, seq_len=train_cfg.seq_len
        )
        train_src, heldout_src = attach(train_src), attach(heldout_src)
    else:
        del sft_params
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        k_max=k_max,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    demos, demo_what = demo_records(config, workdir, train_src, section.demo_samples)
    demos = attach(demos)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=dataclasses.replace(
            s["loop"], tokens_per_step=train_cfg.batch_size * k_max * train_cfg.seq_len
        ),
        batches=ComparisonBatches(train_src, tokenizer, seed=config.seeds.data, **kw),
        batch_kw=kw,
        train_src=train_src,
        heldout_src=heldout_src,
        demos=demos,
        demo_what=demo_what,
        k_max=k_max,
        attach=attach,
    )


def run(ctx: StageContext) -> dict:
    parts = build(ctx)
    config, section, tokenizer, k_max = ctx.config, ctx.section, parts["tokenizer"], parts["k_max"]
    score = functools.partial(rm_eval.score, parts["trainer"], tokenizer, parts["batch_kw"])
    heldout = list(parts["heldout_src"])
    last = {}

    def evaluate(params):
        last["rewards"] = score(params, heldout)
        ranks, valid = rm_eval.labels(heldout, k_max)
        acc, margin, _ = rm_eval.pair_stats(last["rewards"], ranks, valid)
        return {"accuracy": acc, "margin": margin}

    result, _ = run_trainer(ctx, parts, stage_dir=os.path.join(ctx.dir, "train"), eval_fn=evaluate)
    params = result.state["params"]
    metrics = rm_eval.rm_metrics(heldout, last["rewards"], k_max, BASELINES)
    n_train = min(len(parts["train_src"]), section.eval_batches * section.batch_size)
    train_recs = [parts["train_src"][i] for i in range(n_train)]
    train_ranks, train_valid = rm_eval.labels(train_recs, k_max)
    metrics["train_accuracy"] = rm_eval.pair_stats(
        score(params, train_recs), train_ranks, train_valid
    )[0]
    demo_rewards = score(params, parts["demos"])[:, 0]
    bias = float(demo_rewards.mean())
    params = reward_model.normalise_bias(params, bias)
    metrics["demo_mean_reward_after"] = float(score(params, parts["demos"])[:, 0].mean())
    world_tasks_ = [r["meta"]["task"] for r in heldout if "task" in r.get("meta", {})]
    if world_tasks_ and k_max >= 3:
        probes = parts["attach"](probe.probe_records(world_tasks_))
        metrics["probe"] = probe.probe_metrics(probes, score(params, probes)[:, :3])
    meta = stage_meta(config, tokenizer, ctx.name)
    meta.update(bias_subtracted=bias, bias_demos=parts["demo_what"])
    ckpt_lib.save_params(os.path.join(ctx.dir, "checkpoints"), parts["loop"].steps, params, meta)
    summary = {
        "stage": ctx.name,
        "steps_run": result.steps_run,
        "resumed_from": result.resumed_from,
        "wall_s": result.wall_s,
        "train_loss": result.last_metrics.get("loss"),
        "comparisons": {"train": len(parts["train_src"]), "heldout": len(heldout), "k": k_max},
        "bias_subtracted": bias,
        "bias_demos": parts["demo_what"],
        # The learned weight of the reference feature (0 when rm.ref_logprob is off): with
        # it, PPO's optimum is partly SFT at a lower temperature (issue 19, item 3).
        "score_logp": float(np.asarray(params["score_logp"].addressable_data(0)).reshape(-1)[0]),
        # The headline numbers at the top level (gates and reports read these).
        "heldout_accuracy": metrics["accuracy"],
        "heldout_gold_accuracy": metrics.get("gold_accuracy"),
        "train_accuracy": metrics["train_accuracy"],
        "heldout": metrics,
    }
    write_json(os.path.join(ctx.dir, "metrics.json"), summary)
    return {**summary, "text": summary_text(ctx.name, summary, ctx.dir)}


def summary_text(name: str, s: dict, out_dir: str) -> str:
    m, c = s["heldout"], s["comparisons"]
    resumed = f" (resumed from step {s['resumed_from']})" if s["resumed_from"] else ""
    lines = [
        f"== {name}: {s['steps_run']} steps in {s['wall_s']:.0f} s{resumed}; {c['train']} train / "
        f"{c['heldout']} held-out comparisons, K <= {c['k']}; reference-feature weight "
        f"score_logp {s['score_logp']:.3f}",
        f"pairwise accuracy vs labels: train {m['train_accuracy']:.3f}, held-out "
        f"{m['accuracy']:.3f} over {m['pairs']} pairs; mean margin {m['margin']:.3f}",
    ]
    if "gold_accuracy" in m:
        lines += [
            f"  held-out accuracy vs the noiseless gold ranking: {m['gold_accuracy']:.3f}",
            f"  noise ceiling (labels agree with gold): {m['noise_ceiling']:.3f}; implied max "
            f"accuracy vs labels: {m['max_accuracy']:.3f} (RM: {m['accuracy']:.3f})",
        ]
    base = m["baselines"]
    lines.append(
        f"  baselines vs labels: shorter {base['shorter']:.3f}, not-idk {base['not_idk']:.3f}"
    )
    if "gold_baselines" in m:
        gb = m["gold_baselines"]
        lines.append(
            f"  baselines vs gold:   shorter {gb['shorter']:.3f}, not-idk {gb['not_idk']:.3f}"
        )
    for group, stats in m.get("probe", {}).items():
        pairs = ", ".join(f"{k} {v:.2f}" for k, v in stats.items() if k != "n")
        lines.append(f"  probe on {stats['n']} {group} prompts, P(reward order): {pairs}")
    cal = ", ".join(
        f"{b['predicted']:.2f}->{b['observed']:.2f} ({b['n']})" for b in m["calibration"]
    )
    lines += [
        f"  calibration, predicted -> observed win rate (pairs): {cal}",
        f"bias {s['bias_subtracted']:+.4f} subtracted so {s['bias_demos']} average "
        f"{m['demo_mean_reward_after']:+.4f}; RM at {out_dir}/checkpoints, metrics.json",
    ]
    return "\n".join(lines)
