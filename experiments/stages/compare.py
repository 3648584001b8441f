"""Comparison collection: K replies per prompt sampled from the SFT model, then ranked.

    python -m experiments.main --stages=compare                  # after sft, same workdir
    python -m experiments.main --stages=compare --config.compare.k=6 \\
        --config.compare.labeler=mypackage.labels:rank

For each of the first `compare.n_prompts` of the world's prompts kept for comparisons
(data.rm_prompt_share of its ppo_prompts; RL stages train on the others), K replies are
sampled at `compare.temperature` (or at `compare.temperatures`, cycled over the K; with
`compare.demonstration` the last is the world demonstrator's reply: replies from several
policies, as InstructGPT collected them) with the KV-cache sampler (fixed per-reply seeds
from seeds.sampling + compare.seed_offset, so a rerun draws the same replies) and ranked
by a labeler (InstructGPT, sec. 3.4: labelers rank K = 4..9 outputs per prompt). The
default labeler is the world's noisy gold labeler (Bradley-Terry noise at
world.label_noise); `compare.labeler` may name any callable "module:function"
`(prompt_record, replies) -> ranks`, rank 0 best, equal ranks tied. The prompt record it
gets is the world's task plus `ended` (whether each reply reached EOS).

Writes `<workdir>/compare/{train,heldout}.jsonl` in the ranked-list comparison format
(`gptjax/data/formats.py`), each record with `ended` and `meta` (the task, the gold
scores and the noiseless gold ranking, ties equal) so that the RM can be scored against
the truth, and `done.json`, whose fingerprint makes a rerun with the same settings a
no-op. Prompts whose replies the labeler ties all together give no pair and are dropped.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable

import numpy as np

from experiments import sources
from experiments.rundir import StageContext, write_json, write_text
from gptjax import config as config_lib
from gptjax import evaluate
from gptjax.data import chat, formats
from gptjax.errors import ConfigError
from gptjax.world import gold_score, noisy_ranking
from gptjax.world.generate import demonstrate

K_RANGE = (2, 9)
SPLITS = sources.COMPARE_SPLITS


def load_labeler(spec: str) -> Callable:
    """The callable named by "module:function" (errors name config.compare.labeler)."""
    return config_lib.load_callable(spec, "compare.labeler")


def check_ranks(ranks, k: int, where: str) -> list[int]:
    if (
        not isinstance(ranks, list | tuple | np.ndarray)
        or len(ranks) != k
        or not all(isinstance(r, int | np.integer) and r >= 0 for r in ranks)
    ):
        raise ConfigError(
            "compare.labeler",
            f"{where}: expected a list of {k} non-negative integer ranks, got {ranks!r}",
        )
    return [int(r) for r in ranks]


def temperatures(c) -> list[float]:
    """The sampled slots' temperatures: compare.temperatures (comma list, cycled over the
    slots) or compare.temperature for all."""
    spec = [t.strip() for t in str(c.temperatures).split(",") if t.strip()]
    return [float(t) for t in spec] if spec else [float(c.temperature)]


def slot_groups(c) -> dict[float, list[int]]:
    """{temperature: the reply slots sampled at it}, slots 0 … K−1 (the last is the
    demonstration's when compare.demonstration)."""
    temps, out = temperatures(c), {}
    for slot in range(c.k - int(c.demonstration)):
        out.setdefault(temps[slot % len(temps)], []).append(slot)
    return out


def demonstration_reply(index: int, task: dict, world, tokenizer, seed: int) -> evaluate.Reply:
    """The world demonstrator's reply to a task (as it wrote the SFT demos: a true answer
    for a known person, "i don't know" or a made-up one for an unknown), as a reply whose
    ids are its text in the chat template."""
    rng = random.Random(f"demonstration {seed} {index}")
    text = demonstrate(task, world, rng)["response"]
    ids = (*chat.encode_reply(text, tokenizer), tokenizer.eos_id)
    return evaluate.Reply(index, -1, text, True, len(ids), ids)


def gold_ranks(scores: list[float]) -> list[int]:
    """Dense ranks by gold score, 0 = best; equal scores tie (unlike noiseless_ranking,
    which breaks ties by index), so tied pairs are left out of gold accuracy."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) for s in scores]


def settings(ctx: StageContext) -> dict:
    """Validates the section (no data is read); the labeler must load."""
    c, name = ctx.section, ctx.name
    lo, hi = K_RANGE
    if not lo <= c.k <= hi:
        raise ConfigError(f"{name}.k", f"must be in {lo}..{hi}, got {c.k}")
    if not 0 < c.heldout_fraction < 1:
        raise ConfigError(
            f"{name}.heldout_fraction", f"must be in (0, 1), got {c.heldout_fraction}"
        )
    for field in ("n_prompts", "max_new_tokens", "batch_size"):
        if c[field] < (0 if field == "n_prompts" else 1):
            raise ConfigError(f"{name}.{field}", f"out of range: {c[field]}")
    try:
        temps = temperatures(c)
    except ValueError:
        raise ConfigError(
            f"{name}.temperatures", f"a comma list of numbers, got {c.temperatures!r}"
        ) from None
    if min(temps) <= 0:
        field = "temperatures" if c.temperatures else "temperature"
        raise ConfigError(f"{name}.{field}", f"must be > 0 to sample, got {c[field]}")
    if c.demonstration and c.k < 3:
        raise ConfigError(f"{name}.demonstration", f"needs k >= 3 (2 sampled replies), got {c.k}")
    n_rm = sources.world_prompt_split(ctx.config)
    if c.n_prompts > n_rm:
        raise ConfigError(
            f"{name}.n_prompts",
            f"{c.n_prompts} > the {n_rm} world prompts kept for comparisons "
            f"(data.rm_prompt_share {ctx.config.data.rm_prompt_share})",
        )
    return {"labeler": load_labeler(c.labeler) if c.labeler else None}


def fingerprint(ctx: StageContext, tokenizer) -> dict:
    """Everything the comparisons depend on: equal fingerprints, equal files."""
    config, sft_dir = ctx.config, ctx.checkpoints("init")
    steps = [int(d) for d in os.listdir(sft_dir) if d.isdigit()] if os.path.isdir(sft_dir) else []
    return {
        "compare": ctx.section.to_dict(),
        "world_hash": sources.world_config(config).content_hash(),
        "rm_prompt_share": config.data.rm_prompt_share,
        "seed": config.seeds.sampling,
        "tokenizer_hash": tokenizer.hash,
        "sft": [os.path.abspath(sft_dir), max(steps, default=None)],
        # A later round carries the earlier rounds' comparisons: their fingerprint too.
        "previous": _previous_done(ctx).get("fingerprint"),
    }


def _previous_done(ctx: StageContext) -> dict:
    """The earlier round's done.json (role "previous", an instance's read), or {}."""
    if "previous" not in ctx.inputs:
        return {}
    path = os.path.join(ctx.input_dir("previous"), "done.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no comparisons at {path}: run {ctx.inputs['previous']} first")
    with open(path) as f:
        return json.load(f)


def previous_round(ctx: StageContext) -> dict[str, list[dict]]:
    """The earlier round's comparisons by split ({} in a first round): InstructGPT's RM
    trained on every round collected so far."""
    if not _previous_done(ctx):
        return {split: [] for split in SPLITS}
    paths = sources.compare_paths(ctx.input_dir("previous"))
    return {split: list(formats.read_comparisons(paths[split])) for split in SPLITS}


def label(
    records, replies, k: int, labeler: Callable | None, config, tokenizer, seed: int
) -> list[dict]:
    """Ranked comparisons (with gold meta) from K replies per record, each reply with the
    token ids it was sampled as (`response_ids`, under `tokenizer`: its hash); seed: the
    world labeler's noise."""
    world = sources.world_config(config)
    out = []
    for i, task in enumerate(records):
        texts = [r.text for r in replies[i * k : (i + 1) * k]]
        ended = [r.ended for r in replies[i * k : (i + 1) * k]]
        scores = [gold_score(task, t, e, world.length_weight) for t, e in zip(texts, ended)]
        if labeler is None:
            rng = np.random.default_rng([seed, i])
            ranks = noisy_ranking(
                task, texts, ended, rng, world.label_temperature, world.length_weight
            )
        else:
            ranks = check_ranks(labeler({**task, "ended": ended}, list(texts)), k, f"prompt {i}")
        if len(set(ranks)) < 2:
            continue  # all tied: no comparison to learn from
        out.append(
            {
                "prompt": task["prompt"],
                "responses": texts,
                "ranks": ranks,
                "ended": ended,
                "response_ids": [list(r.ids) for r in replies[i * k : (i + 1) * k]],
                "tokenizer": tokenizer.hash,
                "meta": {"task": task, "gold_scores": scores, "gold_ranks": gold_ranks(scores)},
            }
        )
    return out


def _write_jsonl(path: str, records: list[dict]) -> None:
    write_text(
        path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    )


def run(ctx: StageContext) -> dict:
    labeler = settings(ctx)["labeler"]
    config, workdir, c = ctx.config, ctx.workdir, ctx.section
    tokenizer = sources.get_tokenizer(config, workdir)
    out_dir = ctx.dir
    done_path = os.path.join(out_dir, "done.json")
    fp = fingerprint(ctx, tokenizer)
    if os.path.exists(done_path):
        with open(done_path) as f:
            done = json.load(f)
        if done["fingerprint"] == fp:
            return {"stage": ctx.name, "text": _text(ctx.name, done, out_dir, reused=True), **done}

    source = sources.world_prompts(config, workdir, "compare")
    n = len(source) if not c.n_prompts else min(c.n_prompts, len(source))
    records = [source[i] for i in range(n)]
    model, params = sources.load_stage_params(
        config, workdir, ctx.inputs["init"], tokenizer, directory=ctx.checkpoints("init")
    )
    # Another seed_offset draws other replies, and other label noise, on the same prompts.
    seed = config.seeds.sampling + c.seed_offset
    protocol = evaluate.Protocol(
        max_new_tokens=c.max_new_tokens, seed=seed, batch_size=c.batch_size
    )
    replies = [None] * (n * c.k)
    for group, (temperature, slots) in enumerate(slot_groups(c).items()):
        sampled = evaluate.generate_replies(
            model,
            params,
            tokenizer,
            records,
            mode=evaluate.CHAT,
            temperature=temperature,
            samples=len(slots),
            protocol=protocol,
            seed_offset=group,  # each temperature its own draws
        )
        for r in sampled:
            replies[r.index * c.k + slots[r.sample]] = r
    if c.demonstration:
        world = sources.world_config(config)
        for i, task in enumerate(records):
            replies[i * c.k + c.k - 1] = demonstration_reply(i, task, world, tokenizer, seed)
    # Held-out prompts are the last ones, so a larger n_prompts keeps the same held-out set
    # only if heldout_fraction shrinks accordingly; the split is by prompt, never by reply.
    n_heldout = max(1, round(n * c.heldout_fraction))
    comparisons = {
        "train": label(
            records[: n - n_heldout],
            replies[: (n - n_heldout) * c.k],
            c.k,
            labeler,
            config,
            tokenizer,
            seed,
        ),
        "heldout": label(
            records[n - n_heldout :],
            replies[(n - n_heldout) * c.k :],
            c.k,
            labeler,
            config,
            tokenizer,
            seed,
        ),
    }
    fresh, earlier = comparisons, previous_round(ctx)
    new = {split: len(fresh[split]) for split in SPLITS}
    comparisons = {split: earlier[split] + fresh[split] for split in SPLITS}
    os.makedirs(out_dir, exist_ok=True)
    for split, path in sources.compare_paths(out_dir).items():
        _write_jsonl(path, comparisons[split])
    all_replies = [r for split in SPLITS for rec in fresh[split] for r in rec["responses"]]
    done = {
        "fingerprint": fp,
        "prompts": n,
        "comparisons": {s: len(comparisons[s]) for s in SPLITS},
        "dropped_all_tied": n - sum(new.values()),
        "this_round": new,  # the rest came from the previous round ("previous")
        "k": c.k,
        "labeler": c.labeler or "world noisy gold labeler",
        "distinct_reply_frac": _distinct_frac(fresh),
        "eos_rate": float(np.mean([r.ended for r in replies])),
        "mean_reply_words": float(np.mean([len(t.split()) for t in all_replies])),
    }
    write_json(done_path, done)
    return {"stage": ctx.name, "text": _text(ctx.name, done, out_dir, reused=False), **done}


def _distinct_frac(comparisons) -> float:
    """Mean over prompts of distinct replies / K: whether sampling gives the labeler a choice."""
    fracs = [len(set(r["responses"])) / len(r["responses"]) for s in SPLITS for r in comparisons[s]]
    return float(np.mean(fracs)) if fracs else float("nan")


def _text(name: str, done: dict, out_dir: str, reused: bool) -> str:
    n = done["comparisons"]
    fresh = done.get("this_round", n)
    head = f"== {name}: reused" if reused else f"== {name}:"
    rounds = (
        f"  this round {fresh['train']} + {fresh['heldout']}; the rest from the previous round\n"
        if fresh != n
        else ""
    )
    return (
        f"{head} {n['train']} train + {n['heldout']} held-out comparisons of K={done['k']} "
        f"replies ({done['prompts']} prompts, {done['dropped_all_tied']} dropped as all tied) "
        f"in {out_dir}\n{rounds}"
        f"  labeler: {done['labeler']}; distinct replies per prompt "
        f"{done['distinct_reply_frac']:.2f} of K, EOS rate {done['eos_rate']:.2f}, "
        f"{done['mean_reply_words']:.1f} words per reply"
    )
