"""Evaluates every trained stage of a workdir on the world's held-out eval prompts, or on
a user's prompts.

    python -m experiments.main --stages=eval
    python -m experiments.main --stages=eval --config.eval.prompts=demos:/path/prompts.jsonl \
        --config.eval.reward=my_rewards:exact_answer      # off the world

Variants (those whose stages exist in the workdir): base zero-shot (chat template), base
few-shot (a worksheet prompt that makes the base model act as an assistant), SFT,
best-of-n over SFT samples picked by the RM (n = eval.best_of_n), SFT sampled at each of
eval.sft_temperatures (matched-temperature baselines), PPO, PPO-ptx, GRPO, RLOO, DPO,
and the methods trained on the gold reward (reported in their own rows). Each
answers the same prompts under the fixed protocol of gptjax/evaluate.py (greedy, and
temperature 1 x samples, fixed seeds) and gets, with bootstrap intervals over prompts:
gold reward and accuracies (the world's labeler), RM reward, win rates against SFT
(gold- and RM-judged), KL to SFT (temperature-1 samples; best-of-n: exact over a pool of
SFT samples, eval_stats.best_of_n_kl_pool),
per-token entropy, diversity, length, and per model the held-out pretraining loss (the
alignment tax) and few-shot (in-context) accuracy with worksheet prompts.

Off the world (eval.prompts a file): the same variants but base few-shot, judged by the
RM (reward, win rate against SFT) and, with eval.reward, by the user's function in the
gold column (reward, win rate, length-controlled win rate); KL to SFT, entropy,
diversity, length, EOS rate and the held-out LM loss as always.

Writes <workdir>/eval/results.json and prints the table.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from experiments import sources
from experiments.rundir import StageContext, write_json
from gptjax import config as config_lib
from gptjax import eval_stats, evaluate, rewards, train_steps
from gptjax.data.iterators import lm_batches
from gptjax.errors import ConfigError
from gptjax.world import evaluation as world_eval


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    role: str  # the input (experiments/pipeline.py) whose params answer
    mode: str = "chat"  # prompt mode (gptjax/world/evaluation.py MODES)
    best_of: int = 0  # > 0: best-of-n over this stage's samples, picked by the RM
    # > 0: the "sample" protocol's temperature for this variant (matched-temperature SFT:
    # SFT sharpened by temperature alone, the baseline any method's KL is matched to).
    temperature: float = 0.0
    trained_on: str = "rm"  # "gold": trained on the gold reward, reported apart


# The trained-policy variants: (name, stage, reward it was trained on).
POLICIES = (
    ("PPO", "ppo", "rm"),
    ("PPO-ptx", "ppo_ptx", "rm"),
    ("GRPO", "grpo", "rm"),
    ("RLOO", "rloo", "rm"),
    ("DPO", "dpo", "rm"),
    ("PPO (gold reward)", "ppo_gold", "gold"),
    ("GRPO (gold reward)", "grpo_gold", "gold"),
    ("RLOO (gold reward)", "rloo_gold", "gold"),
)


def off_world(config) -> bool:
    """Whether the evaluated prompts are a user's (eval.prompts) rather than the world's."""
    return config.eval.get("prompts", sources.WORLD) != sources.WORLD


def user_reward(config):
    """The eval.reward function as a checked host reward, or None."""
    spec = config.eval.get("reward", "")
    if not spec:
        return None
    return rewards.HostReward(spec, config_lib.load_callable(spec, "eval.reward"))


def own_section(ctx: StageContext) -> StageContext:
    """The context with `config.eval` set to this instance's section: an evaluator
    instance (eval_2, …) runs with its own settings, which the code below reads as
    config.eval like the default instance's."""
    if ctx.name == "eval":
        return ctx
    config = ctx.config.copy_and_resolve_references()
    config.eval = config[ctx.name]
    return dataclasses.replace(ctx, config=config)


def settings(ctx: StageContext) -> dict:
    """Validated before any stage runs: the protocol's counts, eval.reward loads, and is
    used only off the world."""
    name, ctx = ctx.name, own_section(ctx)  # an instance's errors name its own section
    e = ctx.config.eval
    for field in ("batch_size", "samples", "max_new_tokens"):
        config_lib.need(e[field] >= 1, f"{name}.{field}", f"must be >= 1, got {e[field]}")
    fn = user_reward(ctx.config)
    if fn is not None and not off_world(ctx.config):
        raise ConfigError(
            "eval.reward", "the world's prompts are judged by its gold labeler; set eval.prompts"
        )
    return {"reward": fn}


def has_stage(ctx: StageContext, role: str) -> bool:
    if role == "base" and ctx.config.model.get("init_from"):
        return True  # the Hugging Face checkpoint the run started from
    return role in ctx.inputs and os.path.isdir(os.path.join(ctx.input_dir(role), "checkpoints"))


def variants(ctx: StageContext) -> list[Variant]:
    """Every variant whose stages were trained in the workdir."""
    config = ctx.config
    out = [Variant("base zero-shot", "base")]
    if not off_world(config):  # worksheet prompts are made of the world's tasks
        out.append(Variant("base few-shot", "base", "fewshot"))
    if has_stage(ctx, "sft"):
        out.append(Variant("SFT", "sft"))
        if has_stage(ctx, "rm"):
            for n in sorted({config.eval.best_of_n, *config.eval.best_of_curve}):
                if n > 1:
                    out.append(Variant(f"best-of-{n}", "sft", best_of=n))
        for t in config.eval.sft_temperatures:
            out.append(Variant(f"SFT T={t:g}", "sft", temperature=float(t)))
    for name, role, on in POLICIES:
        # A policy trained on another reward than the RM's (gold, a user's function) is
        # reported apart, whatever its stage is called.
        on = config[role].get("reward", on) if role in config else on
        out.append(Variant(name if on in ("rm", "gold") else f"{name} ({on})", role, trained_on=on))
    out = [v for v in out if has_stage(ctx, v.role)]
    only = [x.strip() for x in config.eval.variants.split(",") if x.strip()]
    if only:  # "best-of-n" names the best-of variant whatever its n, "SFT T" every T
        out = [
            v
            for v in out
            if v.name in only
            or (v.best_of and "best-of-n" in only)
            or (v.temperature and "SFT T" in only)
        ]
    return out


# One compile for every stage's model (models with equal configs are equal statics).
_lm_eval_step = jax.jit(train_steps.lm_eval_step, static_argnames=("model",))


def heldout_lm_loss(config, workdir: str, model, params, tokenizer) -> dict:
    """Next-token loss on held-out pretraining documents: the alignment tax when it rises
    after SFT / RLHF (InstructGPT sec. 4.2). Interval: bootstrap over batches."""
    _, heldout_src = sources.pretrain_sources(config, workdir)
    p = config.pretrain
    batches = lm_batches(
        heldout_src, tokenizer, batch_size=p.batch_size, seq_len=p.seq_len, seed=0, shuffle=False
    )
    per_batch = []
    for b in sources.fixed_batches(batches, config.eval.lm_batches):
        out = jax.device_get(_lm_eval_step(params, b, model=model))
        per_batch.append(float(out["loss_sum"]) / max(float(out["count"]), 1.0))
    mean, lo, hi = eval_stats.bootstrap_ci(per_batch, config.eval.bootstrap)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(per_batch)}


class Models:
    """Each input stage's params loaded once, by role."""

    def __init__(self, ctx: StageContext, tokenizer):
        self.ctx, self.tokenizer, self.mesh = ctx, tokenizer, ctx.mesh()
        self._cache = {}
        self._scores = {}
        self._kl = {}
        self._replies = {}

    def get(self, role: str):
        if role not in self._cache:
            ctx = self.ctx
            self._cache[role] = sources.load_stage_params(
                ctx.config,
                ctx.workdir,
                ctx.inputs[role],
                self.tokenizer,
                head="scalar" if role in ("rm", HELDOUT_RM) else "lm",
                directory=ctx.checkpoints(role),
                mesh=self.mesh,
            )
        return self._cache[role]

    def generate(self, role: str, records, seed_offset: int = 0, **kw):
        """evaluate.generate_replies with a stage's model, once per setting: best-of-n's
        first draw is the same as SFT's own temperature-1 samples."""
        key = (role, seed_offset, tuple(sorted(kw.items())))
        if key not in self._replies:
            model, params = self.get(role)
            self._replies[key] = evaluate.generate_replies(
                model, params, self.tokenizer, records, seed_offset=seed_offset, **kw
            )
        return self._replies[key]

    def scores(self, role: str, records, replies, proto, temperature: float = 1.0):
        """score_replies of chat replies under a stage's model (at `temperature`), computed
        once per set of replies: (log-prob sums, mean entropies) for an LM, values for the
        RM. KL to SFT and the RM's reference feature both need SFT's; best-of-n's first
        draw is SFT's own samples."""
        key = (role, temperature, tuple((r.index, r.ids) for r in replies))
        if key not in self._scores:
            model, params = self.get(role)
            self._scores[key] = evaluate.score_replies(
                model, params, self.tokenizer, records, replies, proto, temperature
            )
        return self._scores[key]

    def kl_to_sft(self, role: str, records, replies, proto, temperature: float = 1.0):
        """[N] each reply's KL(role's model at `temperature` ‖ SFT), from one pass of both
        models (evaluate.score_with_reference) that also leaves both models' scores of the
        replies for `scores`: the entropy and the RM's reference feature need them."""
        ids = tuple((r.index, r.ids) for r in replies)
        key = (role, temperature, ids)
        if key not in self._kl:
            model, params = self.get(role)
            ref = (None, None) if role == "sft" else self.get("sft")
            own, sft, self._kl[key] = evaluate.score_with_reference(
                model, params, *ref, self.tokenizer, records, replies, proto, temperature
            )
            self._scores.setdefault(key, own)
            self._scores.setdefault(("sft", 1.0, ids), sft)
        return self._kl[key]


# The role of an RM trained on other comparisons (configs/pipeline.py `heldout_rm=1`): a
# judge no policy was trained against, "heldout_rm_reward" beside "rm_reward".
HELDOUT_RM = "heldout_rm"


def _replies(
    v: Variant, models: Models, records, proto, temperature: float, samples: int, kl: bool
):
    """The variant's replies, with their model scores (_model_scores; `kl`: their KL to
    SFT too), RM-scored when an RM exists (best-of-n needs it), and by the held-out RM when
    there is one."""
    mode = world_eval.MODES[v.mode]
    if v.temperature and temperature > 0:
        temperature = v.temperature
    kw = dict(mode=mode, temperature=temperature, samples=samples, protocol=proto)
    rms = [role for role in ("rm", HELDOUT_RM) if has_stage(models.ctx, role)]

    def rm_scored(replies):
        for role in rms:
            rm = models.get(role)
            ref = None
            if evaluate.uses_reference(rm[1]) and has_stage(models.ctx, "sft"):
                ref = models.scores("sft", records, replies, proto)[0]
            values = models.scores(role, records, replies, proto)
            values = evaluate.add_reference(values, rm[1], replies, ref)
            replies = evaluate.with_extra(replies, f"{role}_reward", values)
        return replies

    if not v.best_of:
        # Model scores first: the KL pass also scores the replies under SFT, which the
        # RM's reference feature reads.
        replies = models.generate(v.role, records, **kw)
        return rm_scored(_model_scores(v, models, records, proto, replies, kl))
    pool = [
        rm_scored(models.generate(v.role, records, seed_offset=m, **kw))
        for m in range(max(v.best_of, pool_draws(models.ctx.config)))
    ]
    best = evaluate.best_of_n(pool[: v.best_of])
    best = evaluate.with_extra(best, "kl", pool_kl(pool, v.best_of, best))
    return _model_scores(v, models, records, proto, best, kl)


def pool_draws(config) -> int:
    """Draws of SFT samples pooled per prompt for best-of-n's exact KL: eval.best_of_pool,
    or (0) those of the largest n evaluated, which are sampled anyway."""
    return config.eval.best_of_pool or max(config.eval.best_of_n, *config.eval.best_of_curve, 1)


def pool_kl(pool, n: int, replies) -> list[float]:
    """Each reply's KL(best-of-n ‖ SFT): exact for its prompt's pool of SFT samples (every
    draw and sample of that prompt; replies with equal ids are one reply),
    eval_stats.best_of_n_kl_pool."""
    by_prompt: dict[int, list] = {}
    for draw in pool:
        for r in draw:
            by_prompt.setdefault(r.index, []).append(r)
    kl = {
        i: eval_stats.best_of_n_kl_pool([r.extra["rm_reward"] for r in rs], [r.ids for r in rs], n)
        for i, rs in by_prompt.items()
    }
    return [kl[r.index] for r in replies]


def _model_scores(v: Variant, models: Models, records, proto, replies, kl: bool):
    """Entropy of the answering model, and per-sequence KL to SFT on samples (the
    full-vocabulary per-token KL along them, summed: Models.kl_to_sft)."""
    if v.mode != "chat":
        return replies
    # A tempered variant's own distribution is SFT's logits / T: its entropy, and its KL
    # to SFT along its own samples (as for every policy).
    temperature = v.temperature or 1.0
    # Best-of-n has its exact KL over the pool of SFT samples (_replies); SFT's KL to
    # itself is 0.
    kl = kl and not v.best_of and has_stage(models.ctx, "sft")
    if kl and (v.role, temperature) != ("sft", 1.0):
        kl_values = models.kl_to_sft(v.role, records, replies, proto, temperature)
    elif kl:
        kl_values = np.zeros(len(replies))
    _, entropy = models.scores(v.role, records, replies, proto, temperature)
    replies = evaluate.with_extra(replies, "entropy", entropy)
    return evaluate.with_extra(replies, "kl", kl_values) if kl else replies


def world_judging(config) -> tuple[dict, dict]:
    """(metrics, judges) under the world's own labeler: its `world.length_weight`, so a
    verbosity sweep judges each variant by the labeler its comparisons came from. Off the
    world: the RM, and the user's reward function as "gold" (its value on each reply,
    attached by `user_scored`)."""
    if off_world(config):
        judges = {"rm": evaluate.rm_judge}
        metrics = dict(eval_stats.REPLY_METRICS)
        if user_reward(config) is not None:
            judges["gold"] = _user_judge
            metrics["gold_reward"] = (lambda rec: True, _user_judge)
        return {**metrics, **eval_stats.win_rate_metrics(tuple(judges))}, judges
    weight = sources.world_config(config).length_weight
    return world_eval.metrics(weight), world_eval.judges(weight)


def _user_judge(record, reply):
    return reply.extra.get("user_reward")


def user_scored(fn, records, replies):
    """Replies with the user's reward function's value attached."""
    if fn is None or not replies:
        return replies
    values = fn([records[r.index] for r in replies], [r.text for r in replies],
                [r.ended for r in replies])  # fmt: skip
    return evaluate.with_extra(replies, "user_reward", values)


# Table columns off the world (the world's: gptjax/world/evaluation.py).
USER_TABLE_METRICS = (
    "gold_reward",
    "rm_reward",
    "win_rate_gold_vs_sft",
    "lc_win_rate_gold_vs_sft",
    "win_rate_rm_vs_sft",
    "kl_to_sft",
    "entropy",
    "distinct_2",
    "length_tokens",
    "eos_rate",
)


def evaluate_all(ctx: StageContext) -> dict:
    """{"records": n, "variants": {name: {"greedy": metrics, "sample": metrics, "model": ...}}}."""
    config, workdir = ctx.config, ctx.workdir
    tokenizer = sources.get_tokenizer(config, workdir)
    records = sources.eval_records(config, workdir)
    proto = sources.protocol(config)
    models = Models(ctx, tokenizer)
    todo = variants(ctx)
    metrics, judges = world_judging(config)
    fn = user_reward(config)
    protocols = (("greedy", 0.0, 1), ("sample", proto.temperature, proto.samples))
    replies = {}
    for v in todo:
        for name, temperature, samples in protocols:
            if (v.best_of or v.temperature) and name == "greedy":
                # Best-of-n picks among temperature-1 samples: it has no greedy reply; a
                # tempered SFT's greedy reply is SFT's.
                replies[v.name, name] = []
                continue
            r = _replies(v, models, records, proto, temperature, samples, name == "sample")
            replies[v.name, name] = user_scored(fn, records, r)
    per_model = {}
    for v in todo:
        if v.best_of or v.role in per_model:
            continue
        model, params = models.get(v.role)
        per_model[v.role] = {
            "heldout_lm_loss": heldout_lm_loss(config, workdir, model, params, tokenizer)
        }
        if off_world(config):
            continue
        # The base model's are its few-shot variant's greedy replies.
        fewshot = models.generate(
            v.role, records, mode=world_eval.FEWSHOT, temperature=0.0, samples=1, protocol=proto
        )
        per_model[v.role]["fewshot_accuracy"] = eval_stats.summarize(
            records, fewshot, metrics, proto.bootstrap
        )["accuracy"]
    results = {}
    for v in todo:
        results[v.name] = {"stage": ctx.inputs[v.role], "model": per_model.get(v.role, {})}
        if v.trained_on != "rm":
            results[v.name]["trained_on"] = v.trained_on
        for name, _, _ in protocols:
            r = replies[v.name, name]
            if ("SFT", name) in replies:
                r = evaluate.compare_to(records, r, replies["SFT", name], judges)
            results[v.name][name] = eval_stats.summarize(records, r, metrics, proto.bootstrap)
            if ("SFT", name) in replies and "gold" in judges:
                # The gold win rate at equal length (the raw one rewards or punishes length
                # through the labeler's length weight).
                results[v.name][name]["lc_win_rate_gold_vs_sft"] = eval_stats.length_controlled(
                    records, r, "gold"
                )
    out = {"records": len(records), "variants": results}
    if off_world(config):
        names = tuple(m for m in ("gold_reward", *USER_DIFFERENCE_METRICS) if m in metrics)
        out["differences"] = differences(records, replies, metrics, proto.bootstrap, names)
        out["prompts"] = config.eval.prompts
    else:
        names = DIFFERENCE_METRICS + (("heldout_rm_reward",) if has_stage(ctx, HELDOUT_RM) else ())
        out["differences"] = differences(records, replies, metrics, proto.bootstrap, names)
    return out


# The paired differences reported: every variant against SFT, and PPO-ptx against PPO.
DIFFERENCE_METRICS = (
    "gold_reward",
    "accuracy",
    "accuracy_known_not_in_demos",
    "abstention_unknown",
)


# Off the world, besides the gold reward (the user's function) when there is one.
USER_DIFFERENCE_METRICS = ("rm_reward", "length_tokens")


def differences(records, replies, metrics, n_boot: int, metric_names=DIFFERENCE_METRICS) -> dict:
    """{"a − b": {protocol: {metric: stat}}}: paired bootstrap over prompts
    (eval_stats.paired_difference) for each variant − SFT and PPO-ptx − PPO."""
    names = list(dict.fromkeys(name for name, _ in replies))
    pairs = [(n, "SFT") for n in names if n != "SFT"] + [("PPO-ptx", "PPO")]
    out = {}
    for a, b in pairs:
        for proto in ("greedy", "sample"):
            ra, rb = replies.get((a, proto)), replies.get((b, proto))
            if not ra or not rb:
                continue
            out.setdefault(f"{a} − {b}", {})[proto] = {
                m: eval_stats.paired_difference(records, ra, rb, metrics[m], n_boot)
                for m in metric_names
            }
    return out


def run(ctx: StageContext) -> dict:
    ctx = own_section(ctx)
    out = evaluate_all(ctx)
    os.makedirs(ctx.dir, exist_ok=True)
    path = os.path.join(ctx.dir, "results.json")
    write_json(path, out, default=float)
    if off_world(ctx.config):
        tables = (USER_TABLE_METRICS, ("heldout_lm_loss",))
    else:
        tables = (world_eval.TABLE_METRICS, world_eval.MODEL_METRICS)
    if has_stage(ctx, HELDOUT_RM):
        tables = (tables[0] + ("heldout_rm_reward",), tables[1])
    text = f"results: {path}\n" + eval_stats.format_results(out, *tables)
    return {"stage": ctx.name, "text": text, **out}
