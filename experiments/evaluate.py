"""Evaluates every trained stage of a workdir on the world's held-out eval prompts.

    python -m experiments.main --stages=eval

Variants (those whose stages exist in the workdir): base zero-shot (chat template), base
few-shot (a worksheet prompt that makes the base model act as an assistant), SFT,
best-of-n over SFT samples picked by the RM (n = eval.best_of_n), PPO, PPO-ptx. Each
answers the same prompts under the fixed protocol of gptjax/evaluate.py (greedy, and
temperature 1 x samples, fixed seeds) and gets, with bootstrap intervals over prompts:
gold reward and accuracies (the world's labeler), RM reward, win rates against SFT
(gold- and RM-judged), KL to SFT (temperature-1 samples; best-of-n: log n - (n-1)/n),
per-token entropy, diversity, length, and per model the held-out pretraining loss (the
alignment tax) and few-shot (in-context) accuracy with worksheet prompts.

Writes <workdir>/eval/results.json and prints the table.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from experiments import common
from gptjax import evaluate, train_steps
from gptjax.data.iterators import lm_batches

STAGE = "eval"
TABLE_METRICS = (
    "gold_reward",
    "rm_reward",
    "win_rate_gold_vs_sft",
    "kl_to_sft",
    "accuracy",
    "accuracy_known_not_in_demos",
    "abstention_unknown",
    "entropy",
    "distinct_2",
    "length_tokens",
)
MODEL_METRICS = ("heldout_lm_loss", "fewshot_accuracy")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    stage: str  # whose params answer
    mode: str = "chat"  # prompt mode (gptjax/evaluate.py MODES)
    best_of: int = 0  # > 0: best-of-n over this stage's samples, picked by the RM


def protocol(config) -> evaluate.Protocol:
    e = config.eval
    return evaluate.Protocol(
        max_new_tokens=e.max_new_tokens,
        samples=e.samples,
        temperature=e.temperature,
        seed=e.seed,
        batch_size=e.batch_size,
        bootstrap=e.bootstrap,
    )


def eval_records(config, workdir: str) -> list[dict]:
    if config.data.pretrain != common.WORLD:
        raise common.ConfigError(
            "data.pretrain",
            "the gold evaluator scores the built-in world; it needs data.pretrain=world",
        )
    src = common.world_data(config, workdir)["eval_prompts"]
    n = len(src) if not config.eval.max_prompts else min(config.eval.max_prompts, len(src))
    return [src[i] for i in range(n)]


def has_stage(workdir: str, stage: str) -> bool:
    return os.path.isdir(os.path.join(common.stage_dir(workdir, stage), "checkpoints"))


def variants(config, workdir: str) -> list[Variant]:
    """Every variant whose stages were trained in the workdir."""
    out = [Variant("base zero-shot", "pretrain"), Variant("base few-shot", "pretrain", "fewshot")]
    if has_stage(workdir, "sft"):
        out.append(Variant("SFT", "sft"))
        if has_stage(workdir, "rm") and config.eval.best_of_n > 1:
            n = config.eval.best_of_n
            out.append(Variant(f"best-of-{n}", "sft", best_of=n))
    out += [Variant(name, stage) for name, stage in (("PPO", "ppo"), ("PPO-ptx", "ppo_ptx"))]
    out = [v for v in out if has_stage(workdir, v.stage)]
    only = [x.strip() for x in config.eval.variants.split(",") if x.strip()]
    if only:  # "best-of-n" names the best-of variant whatever its n
        out = [v for v in out if v.name in only or (v.best_of and "best-of-n" in only)]
    return out


# One compile for every stage's model (models with equal configs are equal statics).
_lm_eval_step = jax.jit(train_steps.lm_eval_step, static_argnames=("model",))


def heldout_lm_loss(config, workdir: str, model, params, tokenizer) -> dict:
    """Next-token loss on held-out pretraining documents: the alignment tax when it rises
    after SFT / RLHF (InstructGPT sec. 4.2). Interval: bootstrap over batches."""
    _, heldout_src = common.pretrain_sources(config, workdir)
    p = config.pretrain
    batches = lm_batches(
        heldout_src, tokenizer, batch_size=p.batch_size, seq_len=p.seq_len, seed=0, shuffle=False
    )
    per_batch = []
    for b in common.fixed_batches(batches, config.eval.lm_batches):
        out = jax.device_get(_lm_eval_step(params, b, model=model))
        per_batch.append(float(out["loss_sum"]) / max(float(out["count"]), 1.0))
    mean, lo, hi = evaluate.bootstrap_ci(per_batch, config.eval.bootstrap)
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(per_batch)}


class Models:
    """Each stage's params loaded once."""

    def __init__(self, config, workdir: str, tokenizer):
        self.config, self.workdir, self.tokenizer = config, workdir, tokenizer
        self._cache = {}
        self._scores = {}
        self._replies = {}

    def get(self, stage: str):
        if stage not in self._cache:
            head = "scalar" if stage == "rm" else "lm"
            self._cache[stage] = common.load_stage_params(
                self.config, self.workdir, stage, self.tokenizer, head=head
            )
        return self._cache[stage]

    def generate(self, stage: str, records, seed_offset: int = 0, **kw):
        """evaluate.generate_replies with a stage's model, once per setting: best-of-n's
        first draw is the same as SFT's own temperature-1 samples."""
        key = (stage, seed_offset, tuple(sorted(kw.items())))
        if key not in self._replies:
            model, params = self.get(stage)
            self._replies[key] = evaluate.generate_replies(
                model, params, self.tokenizer, records, seed_offset=seed_offset, **kw
            )
        return self._replies[key]

    def scores(self, stage: str, records, replies, proto):
        """score_replies of chat replies under a stage's model, computed once per set of
        replies: (log-prob sums, mean entropies) for an LM, values for the RM. KL to SFT
        and the RM's reference feature both need SFT's; best-of-n's first draw is SFT's
        own samples."""
        key = (stage, tuple((r.index, r.ids) for r in replies))
        if key not in self._scores:
            model, params = self.get(stage)
            self._scores[key] = evaluate.score_replies(
                model, params, self.tokenizer, records, replies, proto
            )
        return self._scores[key]


def _replies(v: Variant, models: Models, records, proto, temperature: float, samples: int):
    """The variant's replies, RM-scored when an RM exists (best-of-n needs it)."""
    kw = dict(mode=v.mode, temperature=temperature, samples=samples, protocol=proto)
    rm = models.get("rm") if has_stage(models.workdir, "rm") else None

    def rm_scored(replies):
        if rm is None:
            return replies
        ref = None
        if evaluate.uses_reference(rm[1]) and has_stage(models.workdir, "sft"):
            ref = models.scores("sft", records, replies, proto)[0]
        values = models.scores("rm", records, replies, proto)
        values = evaluate.add_reference(values, rm[1], replies, ref)
        return evaluate.with_extra(replies, "rm_reward", values)

    if not v.best_of:
        return rm_scored(models.generate(v.stage, records, **kw))
    draws = [
        rm_scored(models.generate(v.stage, records, seed_offset=m, **kw)) for m in range(v.best_of)
    ]
    return evaluate.best_of_n(draws)


def _model_scores(v: Variant, models: Models, records, proto, replies, kl: bool):
    """Entropy of the answering model, and per-sequence KL to SFT on samples."""
    if v.mode != "chat":
        return replies
    logp, entropy = models.scores(v.stage, records, replies, proto)
    replies = evaluate.with_extra(replies, "entropy", entropy)
    if not kl or not has_stage(models.workdir, "sft"):
        return replies
    if v.best_of:
        return evaluate.with_extra(replies, "kl", [evaluate.best_of_n_kl(v.best_of)] * len(replies))
    ref, _ = models.scores("sft", records, replies, proto)
    return evaluate.with_extra(replies, "kl", logp - ref)


def evaluate_all(config, workdir: str) -> dict:
    """{"records": n, "variants": {name: {"greedy": metrics, "sample": metrics, "model": ...}}}."""
    tokenizer = common.get_tokenizer(config, workdir)
    records = eval_records(config, workdir)
    proto = protocol(config)
    models = Models(config, workdir, tokenizer)
    todo = variants(config, workdir)
    protocols = (("greedy", 0.0, 1), ("sample", proto.temperature, proto.samples))
    replies = {}
    for v in todo:
        for name, temperature, samples in protocols:
            if v.best_of and name == "greedy":
                # Best-of-n picks among temperature-1 samples: it has no greedy reply.
                replies[v.name, name] = []
                continue
            r = _replies(v, models, records, proto, temperature, samples)
            replies[v.name, name] = _model_scores(v, models, records, proto, r, name == "sample")
    per_model = {}
    for v in todo:
        if v.best_of or v.stage in per_model:
            continue
        model, params = models.get(v.stage)
        fewshot = evaluate.generate_replies(
            model,
            params,
            tokenizer,
            records,
            mode="fewshot",
            temperature=0.0,
            samples=1,
            protocol=proto,
        )
        per_model[v.stage] = {
            "heldout_lm_loss": heldout_lm_loss(config, workdir, model, params, tokenizer),
            "fewshot_accuracy": evaluate.summarize(records, fewshot, proto.bootstrap)["accuracy"],
        }
    results = {}
    for v in todo:
        results[v.name] = {"stage": v.stage, "model": per_model.get(v.stage, {})}
        for name, _, _ in protocols:
            r = replies[v.name, name]
            if ("SFT", name) in replies:
                r = evaluate.compare_to(records, r, replies["SFT", name])
            results[v.name][name] = evaluate.summarize(records, r, proto.bootstrap)
    return {"records": len(records), "variants": results}


def run(config, workdir: str) -> dict:
    out = evaluate_all(config, workdir)
    out_dir = common.stage_dir(workdir, STAGE)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    common.write_json(path, out, default=float)
    text = f"results: {path}\n" + format_results(out)
    return {"stage": STAGE, "text": text, **out}


def format_results(out: dict) -> str:
    lines = [f"eval on {out['records']} held-out prompts"]
    for proto_name in ("greedy", "sample"):
        lines += [
            "",
            f"{proto_name}:",
            evaluate.format_table(out["variants"], proto_name, TABLE_METRICS),
        ]
    lines += ["", "per model:", format_model_table(out["variants"])]
    return "\n".join(lines)


def format_model_table(results: dict) -> str:
    lines = ["| model | " + " | ".join(MODEL_METRICS) + " |", "|---" * 3 + "|"]
    for name, res in results.items():
        cells = []
        for m in MODEL_METRICS:
            s = res["model"].get(m)
            cells.append("—" if s is None else f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
