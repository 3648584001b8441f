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
shifted params are the stage's output: `<workdir>/rm/checkpoints` (item "params"), which
`common.load_stage_params(config, workdir, "rm", tok, head="scalar")` returns. Metrics go
to `<workdir>/rm/metrics.json` and the summary (see `rm_metrics`), with, on world
comparisons, a probe of what the RM knows (`probe_metrics`).

Measured at `tiny` (K=4, 1536 prompts, default label noise; an SFT model whose T=1
replies are ~68% wrong answers, so ~70% of pairs tie in gold and their labels are coin
flips): held-out accuracy against the noiseless gold ranking 0.64-0.70 over lr 1e-4..3e-3
and 160-480 steps, against 0.46 / 0.40 for the shorter / not-idk baselines; trained on the
noiseless labels instead it reaches 0.76. lr 3e-4 and 160 steps (~2 epochs) are the
defaults: more epochs start fitting the label noise.

With world v3's SFT model (right 90% of the time on known people, greedy) that RM still
could not tell a true fact from a wrong one: the probe's P(r(true) > r(wrong)) on known
people was 0.46-0.53 for every RM tried (160/480 steps, lr 1e-4..1e-3, K=6, 4x the
comparisons). `rm.ref_logprob` (on for the CPU presets) adds the SFT model's mean
log-prob of the reply as a feature with a learned weight, starting at 1
(gptjax/reward_model.py). Same comparisons, same 160 steps: gold accuracy 0.689 -> 0.779,
probe true>wrong on known people 0.53 -> 0.99, idk>wrong on unknown people 0.60 -> 0.97;
true>idk on known people 0.47 (the SFT model hardly knows whom it does not know: its
top value's probability separates known from unknown people with AUC 0.70, so the RM
prices abstention between the two). The feature as a sum instead of a mean: gold 0.802,
true>idk 0.68, but arithmetic idk>wrong 0.05 and PPO against it drifts to KL 0.70.
World v4 (strangers' names look strange, WorldConfig.stranger_syllables): gold 0.852,
true>wrong 0.98, idk>wrong on unknown people 1.00, true>idk on known people 0.21 (the
RM learns that abstaining is right from unknown people and never sees SFT abstain on
known ones; the sum form there: gold 0.754, true>idk 0.72, and PPO against it learnt
no abstention at all).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, compare, sft
from gptjax import checkpoint as ckpt_lib
from gptjax import evaluate as evaluate_lib
from gptjax import reward_model, sharding
from gptjax.data import chat, formats
from gptjax.data.iterators import ComparisonBatches, record_messages
from gptjax.errors import ConfigError
from gptjax.model import Model
from gptjax.world import tasks as world_tasks
from gptjax.world.labeler import is_idk

STAGE = "rm"
FROM_COMPARE = "compare"


def comparison_sources(config, workdir: str):
    """(train, held-out) comparison records: the compare stage's files or the user's."""
    spec = config.data.comparisons
    if spec == FROM_COMPARE:
        p = compare.paths(workdir)
        if not os.path.exists(p["train"]):
            raise FileNotFoundError(
                f"no comparisons at {p['train']}: run --stages=compare first (same "
                f"--workdir), or set --config.data.comparisons=comparisons:/path/file.jsonl"
            )
        return [list(formats.read_comparisons(p[s])) for s in compare.SPLITS]
    if not spec.startswith("comparisons:"):
        raise ConfigError(
            "data.comparisons",
            f"expected {FROM_COMPARE!r} or comparisons:/path/file.jsonl, got {spec!r}",
        )
    return common.split_user_file(
        "data.comparisons",
        spec,
        config.data.comparisons_heldout_fraction,
        common.data_dir(config, workdir),
        common.max_bad_fraction(config),
    )


def demo_records(config, workdir: str, train_src, n: int) -> tuple[list[dict], str]:
    """Up to n single-reply records whose mean reward the bias is set to cancel."""
    if config.data.demos != common.WORLD:
        src, what = sft.demo_sources(config, workdir)[0], "the user's demos"
    elif config.data.comparisons == FROM_COMPARE:
        src, what = common.world_data(config, workdir)["demos"], "world demos"
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


def with_scalar_head(model: Model, lm_params, ref_weight: float = 0.0) -> dict:
    """The LM's params for `model` (head="scalar"): the trunk kept, the LM-only unembedding
    dropped, and a new zero head (InstructGPT starts the RM from SFT, head removed).

    ref_weight: the initial weight of the reference feature (gptjax/reward_model.py). An
    RM that uses it starts at 1, ranking replies by the SFT model's own likelihood: Adam
    moves one scalar by ~lr per step, so from 0 it could not reach a useful weight in
    the few hundred steps an RM trains (measured: 0.715 gold accuracy from 0).
    """
    params = {
        name: lm_params[name] if name in lm_params else jnp.zeros(shape.shape, shape.dtype)
        for name, shape in model.abstract_params.items()
    }
    params["score_logp"] = jnp.full_like(params["score_logp"], ref_weight)
    return params


def _steps(model, tx, schedule, grad_accum_steps: int):
    train = functools.partial(
        reward_model.rm_train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        grad_accum_steps=grad_accum_steps,
    )
    return train, functools.partial(reward_model.rm_eval_step, model=model)


def build(config, workdir: str) -> dict:
    """Everything the stage needs, validated and built before anything compiles."""
    train_cfg, optim_cfg, loop_cfg = common.stage_train_config(config.rm, STAGE)
    mesh = common.make_mesh(config)
    tokenizer = common.get_tokenizer(config, workdir)
    train_src, heldout_src = comparison_sources(config, workdir)
    if len(train_src) == 0 or len(heldout_src) == 0:
        raise ConfigError(
            "data.comparisons", f"{len(train_src)} train / {len(heldout_src)} held-out comparisons"
        )
    k_data = max(len(s[i]["responses"]) for s in (train_src, heldout_src) for i in range(len(s)))
    k_max = config.rm.k_max or k_data
    if k_max < k_data:
        raise ConfigError("rm.k_max", f"{k_max} < {k_data} responses in a comparison")
    sft_model, sft_params = common.load_stage_params(
        config, workdir, "sft", tokenizer, directory=config.rm.init_from or None
    )
    model_cfg = common.model_config(config, tokenizer, head="scalar")
    common.check_fits(train_cfg, optim_cfg, model_cfg, mesh, STAGE)
    trainer = common.LMTrainer.build(
        model_cfg,
        optim_cfg,
        train_cfg,
        mesh,
        config.seeds.init,
        init_params=with_scalar_head(
            Model(model_cfg), sft_params, ref_weight=1.0 if config.rm.ref_logprob else 0.0
        ),
        make_steps=functools.partial(_steps, grad_accum_steps=optim_cfg.grad_accum_steps),
    )
    attach = lambda records: records  # noqa: E731
    if config.rm.ref_logprob:
        attach = functools.partial(with_ref_logp, sft_model, sft_params, tokenizer)
        train_src, heldout_src = attach(train_src), attach(heldout_src)
    else:
        del sft_params
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        k_max=k_max,
        **sharding.host_block(mesh).iterator_kwargs(),
    )
    demos, demo_what = demo_records(config, workdir, train_src, config.rm.demo_samples)
    demos = attach(demos)
    return dict(
        trainer=trainer,
        tokenizer=tokenizer,
        loop=dataclasses.replace(
            loop_cfg, tokens_per_step=train_cfg.batch_size * k_max * train_cfg.seq_len
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


def with_ref_logp(sft: Model, sft_params, tokenizer, records: Sequence[dict]) -> list[dict]:
    """records with "ref_logp": each reply's mean log-prob under the SFT model (with its
    EOS if it ended), the RM's reference feature (gptjax/reward_model.py)."""
    replies = [
        evaluate_lib.Reply(i, k, text, done, 0, tuple(chat.encode_reply(text, tokenizer)) + eos)
        for i, rec in enumerate(records)
        for k, (text, done) in enumerate(
            zip(rec["responses"], rec.get("ended") or [True] * len(rec["responses"]))
        )
        for eos in [(tokenizer.eos_id,) if done else ()]
    ]
    protocol = evaluate_lib.Protocol(batch_size=64)
    feature = evaluate_lib.mean_logprobs(sft, sft_params, tokenizer, records, replies, protocol)
    out, start = [], 0
    for rec in records:
        k = len(rec["responses"])
        out.append({**rec, "ref_logp": [float(x) for x in feature[start : start + k]]})
        start += k
    return out


def score(parts: dict, params, records) -> np.ndarray:
    """rewards_NxK of every reply of `records` (padding slots: garbage, mask with valid)."""
    n, b = len(records), parts["batch_kw"]["batch_size"]
    batches = ComparisonBatches(
        records, parts["tokenizer"], seed=0, shuffle=False, **parts["batch_kw"]
    )
    trainer = parts["trainer"]
    out = [
        np.asarray(jax.device_get(trainer.eval_step(params, trainer.put_batch(next(batches)))))
        for _ in range(-(-n // b))
    ]
    return np.concatenate(out)[:n]


def labels(records, k_max: int, key: str | None = None):
    """(ranks_NxK, valid_NxK) of records' labels, or of meta[key] (e.g. gold_ranks)."""
    ranks = np.zeros((len(records), k_max), np.int32)
    valid = np.zeros((len(records), k_max), np.float32)
    for i, rec in enumerate(records):
        r = rec["ranks"] if key is None else rec["meta"][key]
        ranks[i, : len(r)], valid[i, : len(r)] = r, 1.0
    return ranks, valid


def pair_agreement(pred_NxK, ranks_NxK, valid_NxK) -> float:
    """Over pairs where ranks say w beats l: P(pred_w > pred_l), ties counting half."""
    better = (
        (ranks_NxK[:, :, None] < ranks_NxK[:, None, :])
        & (valid_NxK[:, :, None] > 0)
        & (valid_NxK[:, None, :] > 0)
    )
    diff = (pred_NxK[:, :, None] - pred_NxK[:, None, :])[better]
    if diff.size == 0:
        return float("nan")
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def _reply_features(records, k_max: int) -> dict[str, np.ndarray]:
    """Scores of the two baselines: shorter is better; not "i don't know" is better."""
    length = np.zeros((len(records), k_max))
    not_idk = np.zeros((len(records), k_max))
    for i, rec in enumerate(records):
        for k, reply in enumerate(rec["responses"]):
            length[i, k], not_idk[i, k] = -len(reply), float(not is_idk(reply))
    return {"shorter": length, "not_idk": not_idk}


def rm_metrics(records, rewards_NxK, k_max: int) -> dict:
    """Held-out metrics of the RM on `records` (labels = the records' ranks).

    accuracy: share of labelled pairs the RM orders like the label (ties wrong);
    margin: mean r_w − r_l over them. With the world's meta (gold_ranks):
    gold_accuracy: the same against the noiseless gold ranking (gold ties excluded);
    noise_ceiling: how often the noisy labels agree with gold on those pairs;
    max_accuracy: the label accuracy of a perfect gold ranker (gold ties count half),
    i.e. the most any RM can expect against these noisy labels.
    Baselines (shorter; not "i don't know") are scored on the same pairs, ties half.
    """
    ranks, valid = labels(records, k_max)
    acc, margin, n_pairs = reward_model.pair_stats(rewards_NxK, ranks, valid)
    features = _reply_features(records, k_max)
    out = {
        "accuracy": acc,
        "margin": margin,
        "pairs": n_pairs,
        "baselines": {k: pair_agreement(v, ranks, valid) for k, v in features.items()},
        "calibration": reward_model.calibration_bins(rewards_NxK, ranks, valid),
    }
    if all("gold_ranks" in (rec.get("meta") or {}) for rec in records):
        gold, _ = labels(records, k_max, "gold_ranks")
        out["gold_accuracy"] = reward_model.pair_stats(rewards_NxK, gold, valid)[0]
        out["noise_ceiling"] = pair_agreement(-ranks, gold, valid)
        out["max_accuracy"] = pair_agreement(-gold, ranks, valid)
        out["gold_baselines"] = {k: pair_agreement(v, gold, valid) for k, v in features.items()}
    return out


# What the gold labeler ranks, per kind of prompt: replies (better, worse).
PROBE_ORDERS = {
    "fact_known": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
    "fact_unknown": (("idk", "wrong"),),
    "arithmetic": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
    "string": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
}


def probe_records(tasks_: Sequence[dict], seed: int = 0) -> list[dict]:
    """For each world task, three replies in the demonstrator's sentence: the true answer,
    a wrong one (for an unknown person: a made-up value) and "i don't know"."""
    rng = random.Random(seed)
    out = []
    for task in tasks_:
        wrong = {**task, "answer": world_tasks.wrong_answer(task, rng)}
        replies = {
            "true": world_tasks.render_response(task, "sentence", rng),
            "wrong": world_tasks.render_response(wrong, "sentence", rng),
            "idk": world_tasks.render_response(task, "idk", rng),
        }
        out.append(
            {
                "prompt": task["prompt"],
                "responses": list(replies.values()),
                "ranks": [0, 0, 0],  # unused: these are only scored
                "task": task,
            }
        )
    return out


def probe_group(task: dict) -> str:
    if task["skill"] == "fact":
        return "fact_known" if task["answer"] is not None else "fact_unknown"
    return task["skill"]


def probe_metrics(records: Sequence[dict], rewards_Nx3: np.ndarray) -> dict:
    """P(r_a > r_b) (ties half) for each pair the gold labeler orders, per kind of prompt.

    A reward model can rank whole comparisons well on style alone (rambling, unfinished,
    "i don't know" for unknown people) and still not know which facts are true; PPO then
    optimises what it can see. Here: true vs wrong needs the facts, idk vs wrong on
    unknown people needs to know who is unknown, true vs idk says whether the RM
    pushes the policy to abstain where it should answer.
    """
    column = {"true": 0, "wrong": 1, "idk": 2}
    out = {}
    for group, pairs in PROBE_ORDERS.items():
        rows = [i for i, r in enumerate(records) if probe_group(r["task"]) == group]
        if not rows:
            continue
        r = rewards_Nx3[rows]
        out[group] = {
            f"{a}>{b}": float(
                np.mean(
                    (r[:, column[a]] > r[:, column[b]]) + 0.5 * (r[:, column[a]] == r[:, column[b]])
                )
            )
            for a, b in pairs
        }
        out[group]["n"] = len(rows)
    return out


def save_final(directory: str, step: int, params, meta: dict) -> None:
    """The normalised RM as `directory/<step>/params` (what later stages load)."""
    ckpt = ckpt_lib.Checkpointer(directory, ("params",), keep=1, async_save=False)
    try:
        if ckpt.latest_step() != step:
            ckpt.save(step, {"params": params}, meta)
    finally:
        ckpt.close()


def run(config, workdir: str) -> dict:
    parts = build(config, workdir)
    tokenizer, k_max = parts["tokenizer"], parts["k_max"]
    heldout = list(parts["heldout_src"])
    last = {}

    def evaluate(params):
        last["rewards"] = score(parts, params, heldout)
        ranks, valid = labels(heldout, k_max)
        acc, margin, _ = reward_model.pair_stats(last["rewards"], ranks, valid)
        return {"accuracy": acc, "margin": margin}

    result, _ = common.run_lm_stage(
        STAGE,
        config,
        workdir,
        {
            **parts,
            "stage_dir": os.path.join(common.stage_dir(workdir, STAGE), "train"),
            "eval_fn": evaluate,
        },
    )
    params = result.state["params"]
    metrics = rm_metrics(heldout, last["rewards"], k_max)
    n_train = min(len(parts["train_src"]), config.rm.eval_batches * config.rm.batch_size)
    train_recs = [parts["train_src"][i] for i in range(n_train)]
    train_ranks, train_valid = labels(train_recs, k_max)
    metrics["train_accuracy"] = reward_model.pair_stats(
        score(parts, params, train_recs), train_ranks, train_valid
    )[0]
    demo_rewards = score(parts, params, parts["demos"])[:, 0]
    bias = float(demo_rewards.mean())
    params = reward_model.normalise_bias(params, bias)
    metrics["demo_mean_reward_after"] = float(score(parts, params, parts["demos"])[:, 0].mean())
    world_tasks_ = [r["meta"]["task"] for r in heldout if "task" in r.get("meta", {})]
    if world_tasks_ and k_max >= 3:
        probes = parts["attach"](probe_records(world_tasks_))
        metrics["probe"] = probe_metrics(probes, score(parts, params, probes)[:, :3])
    out_dir = common.stage_dir(workdir, STAGE)
    save_final(
        os.path.join(out_dir, "checkpoints"),
        parts["loop"].steps,
        params,
        {
            "config": common.resolved_config_json(config),
            "tokenizer_hash": tokenizer.hash,
            "stage": STAGE,
            "bias_subtracted": bias,
            "bias_demos": parts["demo_what"],
        },
    )
    summary = {
        "stage": STAGE,
        "steps_run": result.steps_run,
        "resumed_from": result.resumed_from,
        "wall_s": result.wall_s,
        "train_loss": result.last_metrics.get("loss"),
        "comparisons": {"train": len(parts["train_src"]), "heldout": len(heldout), "k": k_max},
        "bias_subtracted": bias,
        "bias_demos": parts["demo_what"],
        # The headline numbers at the top level (gates and reports read these).
        "heldout_accuracy": metrics["accuracy"],
        "heldout_gold_accuracy": metrics.get("gold_accuracy"),
        "train_accuracy": metrics["train_accuracy"],
        "heldout": metrics,
    }
    common.write_json(os.path.join(out_dir, "metrics.json"), summary)
    return {**summary, "text": summary_text(summary, out_dir)}


def summary_text(s: dict, out_dir: str) -> str:
    m, c = s["heldout"], s["comparisons"]
    resumed = f" (resumed from step {s['resumed_from']})" if s["resumed_from"] else ""
    lines = [
        f"== rm: {s['steps_run']} steps in {s['wall_s']:.0f} s{resumed}; {c['train']} train / "
        f"{c['heldout']} held-out comparisons, K <= {c['k']}",
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
