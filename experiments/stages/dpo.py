"""DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023): the SFT policy trained on the
RM's comparisons directly, no reward model, no sampling.

    python -m experiments.main --stages=dpo                   # after pretrain, sft, compare
    python -m experiments.main --stages=dpo --config.dpo.beta=0.3 --config.dpo.loss=ipo

The policy and the frozen reference both start from SFT. Every ordered pair of a ranked
list is a (chosen, rejected) pair (gptjax/dpo.py). The reference's reply log-probs are
computed once, before training, and cached in `<workdir>/dpo/reference/<key>.npz`, the
key a hash of the reference checkpoint's manifest, the tokenizer, the truncation rule
(seq_len, k_max: a long row keeps its end) and the comparisons: a resumed run reads them
back, a changed reference recomputes them. One jitted, sharded, donated step on the shared
stage loop (experiments/loop.py); checkpoints in `<workdir>/dpo/checkpoints`, exact resume.

Metrics on the held-out comparisons (`metrics.json`, every eval_every steps in
metrics.jsonl): the implicit reward r = β·(log π − log π_ref)'s pair accuracy against the
labels (and the noiseless gold ranking on world comparisons) and margin, and how far the
chosen and the rejected replies' log-probs drifted from the reference's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import numpy as np

from experiments import sections, sources
from experiments.loop import run_trainer
from experiments.rundir import StageContext, on_process_0, write_json
from gptjax import checkpoint as ckpt_lib
from gptjax import config as config_lib
from gptjax import dpo, rm_eval, sharding
from gptjax.data.iterators import ComparisonBatches
from gptjax.trainer import LMTrainer, check_fits


def settings(ctx: StageContext) -> dict:
    """The stage's typed configs, validated (no data is read)."""
    train, optim, loop = sections.train_config(ctx.section, ctx.name)
    fields = {f.name: ctx.section[f.name] for f in dataclasses.fields(dpo.DPOConfig)}
    cfg = config_lib.from_dict(dpo.DPOConfig, fields, ctx.name)
    mesh = ctx.mesh()
    check_fits(mesh, train, optim, sources.model_config(ctx.config, None), ctx.name)
    return dict(cfg=cfg, train=train, optim=optim, loop=loop, mesh=mesh)


def cache_key(reference: str, tokenizer, seq_len: int, k_max: int, records) -> str:
    """What the reference log-probs depend on: the reference's bytes, the tokenizer, the
    truncation rule and the comparisons."""
    text = json.dumps(
        {
            "reference": ckpt_lib.fingerprint(reference),
            "tokenizer": tokenizer.hash,
            "truncation": {"seq_len": seq_len, "k_max": k_max, "keep": "end"},
            "records": [
                hashlib.sha256(json.dumps(list(src), sort_keys=True).encode()).hexdigest()
                for src in records
            ],
        },
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_logps(ctx, trainer, tokenizer, kw, ref_params, reference: str, splits):
    """[N, K] reference log-probs of each split's replies, from the cache or computed once
    (then cached by process 0)."""
    key = cache_key(reference, tokenizer, kw["seq_len"], kw["k_max"], splits)
    path = os.path.join(ctx.dir, "reference", f"{key}.npz")
    if os.path.exists(path):
        with np.load(path) as saved:
            return [saved[f"split{i}"] for i in range(len(splits))], path, True
    out = [rm_eval.score(trainer, tokenizer, kw, ref_params, list(src)) for src in splits]

    def save():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **{f"split{i}": x for i, x in enumerate(out)})
        os.replace(tmp, path)

    on_process_0("dpo reference cache", save)
    return out, path, False


def with_reference(records, logp_NxK) -> list[dict]:
    return [
        {**rec, "ref_seq_logp": [float(x) for x in row[: len(rec["responses"])]]}
        for rec, row in zip(records, logp_NxK)
    ]


def build(ctx: StageContext) -> dict:
    """Everything the stage needs, validated and built before training compiles."""
    s = settings(ctx)
    config, workdir, section, train_cfg = ctx.config, ctx.workdir, ctx.section, s["train"]
    tokenizer = sources.get_tokenizer(config, workdir)
    train_src, heldout_src, k_max = sources.comparison_splits(
        config, workdir, ctx.input_dir("comparisons"), section, ctx.name
    )
    reference = ctx.checkpoints("init")
    model, sft_params = sources.load_stage_params(
        config, workdir, ctx.inputs["init"], tokenizer, directory=reference, mesh=s["mesh"]
    )
    optim = s["optim"]
    trainer = LMTrainer.build(
        model.cfg,
        optim,
        train_cfg,
        s["mesh"],
        config.seeds.init,
        init_params=sft_params,
        make_steps=functools.partial(
            dpo.make_steps, cfg=s["cfg"], grad_accum_steps=optim.grad_accum_steps
        ),
    )
    kw = dict(
        batch_size=train_cfg.batch_size,
        seq_len=train_cfg.seq_len,
        k_max=k_max,
        **sharding.host_block(s["mesh"]).iterator_kwargs(),
    )
    splits = [list(train_src), list(heldout_src)]
    (ref_train, ref_heldout), path, cached = reference_logps(
        ctx, trainer, tokenizer, kw, sft_params, reference, splits
    )
    train_recs = with_reference(splits[0], ref_train)
    return dict(
        cfg=s["cfg"],
        trainer=trainer,
        tokenizer=tokenizer,
        loop=dataclasses.replace(
            s["loop"], tokens_per_step=train_cfg.batch_size * k_max * train_cfg.seq_len
        ),
        batches=ComparisonBatches(train_recs, tokenizer, seed=config.seeds.data, **kw),
        batch_kw=kw,
        n_train=len(train_recs),
        heldout=splits[1],
        ref_heldout=ref_heldout,
        k_max=k_max,
        reference_cache={"path": path, "reused": cached},
    )


def heldout_metrics(logp_NxK, ref_NxK, records, k_max: int, beta: float) -> dict:
    """Implicit-reward pair accuracy and margin against the labels (and gold), and the
    mean log-ratio to the reference of the chosen (best-ranked) and rejected replies."""
    ranks, valid = rm_eval.labels(records, k_max)
    ratio = np.asarray(logp_NxK, np.float64) - np.asarray(ref_NxK, np.float64)
    accuracy, margin, pairs = rm_eval.pair_stats(beta * ratio, ranks, valid)
    best = ranks == np.where(valid > 0, ranks, np.iinfo(np.int32).max).min(1, keepdims=True)
    worst = ranks == np.where(valid > 0, ranks, -1).max(1, keepdims=True)
    out = {
        "accuracy": accuracy,
        "margin": margin,
        "pairs": pairs,
        "chosen_logratio": float(ratio[best & (valid > 0)].mean()),
        "rejected_logratio": float(ratio[worst & (valid > 0)].mean()),
    }
    if all("gold_ranks" in (r.get("meta") or {}) for r in records):
        gold, _ = rm_eval.labels(records, k_max, "gold_ranks")
        out["gold_accuracy"] = rm_eval.pair_stats(beta * ratio, gold, valid)[0]
    return out


def run(ctx: StageContext) -> dict:
    parts = build(ctx)
    trainer, tokenizer, k_max = parts["trainer"], parts["tokenizer"], parts["k_max"]
    beta = parts["cfg"].beta
    score = functools.partial(rm_eval.score, trainer, tokenizer, parts["batch_kw"])
    heldout, last = parts["heldout"], {}

    def evaluate(params):
        logp = score(params, heldout)
        last.update(heldout_metrics(logp, parts["ref_heldout"], heldout, k_max, beta))
        return {k: v for k, v in last.items() if k != "pairs"}

    _, summary = run_trainer(ctx, parts, eval_fn=evaluate)  # evaluates at the end
    summary.update(
        algorithm=parts["cfg"].loss,
        beta=beta,
        comparisons={"train": parts["n_train"], "heldout": len(heldout), "k": k_max},
        reference_cache=parts["reference_cache"],
        heldout=dict(last),
        heldout_accuracy=last["accuracy"],
    )
    write_json(os.path.join(ctx.dir, "metrics.json"), summary)
    m = last
    gold = f", vs gold {m['gold_accuracy']:.3f}" if "gold_accuracy" in m else ""
    resumed = f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else ""
    text = "\n".join(
        [
            f"== {ctx.name} ({parts['cfg'].loss}, β {beta}): {summary['steps_run']} steps in "
            f"{summary['wall_s']:.0f} s{resumed}; reference log-probs "
            + ("read from" if parts["reference_cache"]["reused"] else "cached in")
            + f" {parts['reference_cache']['path']}",
            f"held-out implicit-reward accuracy vs labels {m['accuracy']:.3f}{gold} over "
            f"{m['pairs']} pairs; margin {m['margin']:.3f}",
            f"log-prob drift from the reference: chosen {m['chosen_logratio']:+.3f}, "
            f"rejected {m['rejected_logratio']:+.3f}; train loss {summary['train_loss']:.4f}",
        ]
    )
    return {**summary, "text": text}
