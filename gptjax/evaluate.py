"""The one evaluator: every model answers the same held-out prompts under one protocol,
and the world's gold labeler scores every reply exactly.

Protocol (fixed, so numbers are comparable across models and runs):
  - greedy: one reply per prompt;
  - sample: `samples` replies per prompt at temperature 1, with fixed per-reply seeds;
  - replies stop at EOS or after `max_new_tokens`; a reply without EOS is "unterminated".
Prompt modes: "chat" (the chat template; SFT/RLHF models and base zero-shot) and
"fewshot" (the record's worksheet-style `fewshot_prompt`: the base model prompted to act
as an assistant; its answer is the text up to the newline).

Every metric comes with a 95% percentile-bootstrap interval over prompts (samples of one
prompt are averaged first, so the interval reflects prompt-to-prompt variation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gptjax import sampling
from gptjax.data import chat
from gptjax.world import classify, gold_score, parse_fewshot_completion

CORRECT = ("correct", "correct_verbose")
MODES = ("chat", "fewshot")


@dataclasses.dataclass(frozen=True)
class Protocol:
    max_new_tokens: int = 16
    samples: int = 4  # temperature-1 replies per prompt
    temperature: float = 1.0
    seed: int = 1234
    batch_size: int = 64
    bootstrap: int = 1000


@dataclasses.dataclass(frozen=True)
class Reply:
    index: int  # into the records
    sample: int
    text: str
    ended: bool
    n_tokens: int


def prompt_ids(record: dict, tokenizer, mode: str) -> list[int]:
    if mode == "chat":
        return chat.render_prompt(chat.pair_messages(record["prompt"]), tokenizer)
    if mode == "fewshot":
        return tokenizer.encode(record["fewshot_prompt"])
    raise ValueError(f"unknown prompt mode {mode!r}; expected one of {MODES}")


def _decode(ids: list[int], tokenizer, mode: str) -> tuple[str, bool, int]:
    """(reply text, ended, reply length in tokens) of generated ids."""
    if mode == "chat":
        text, ended = chat.decode_reply(ids, tokenizer)
        return text, ended, len(ids)
    eos = tokenizer.eos_id in ids
    text = tokenizer.decode(ids[: ids.index(tokenizer.eos_id)] if eos else ids)
    answer, ended = parse_fewshot_completion(text, eos=eos)
    # The worksheet answer ends at its newline: count its tokens, not what followed.
    return answer, ended, len(tokenizer.encode(" " + answer)) + int(ended)


def generate_replies(
    model,
    params,
    tokenizer,
    records: Sequence[dict],
    *,
    mode: str,
    temperature: float,
    samples: int,
    protocol: Protocol,
) -> list[Reply]:
    """Replies for every (record, sample); one compiled program for all batches."""
    prompts = [prompt_ids(r, tokenizer, mode) for r in records]
    p = max(len(x) for x in prompts)
    n = min(protocol.max_new_tokens, model.cfg.max_len - p)
    if n < 1:
        raise ValueError(
            f"prompts of {p} tokens leave no room to answer within max_len={model.cfg.max_len}"
        )
    jobs = [(i, j) for i in range(len(records)) for j in range(samples)]
    bs = protocol.batch_size
    replies = []
    for start in range(0, len(jobs), bs):
        chunk = jobs[start : start + bs]
        rows = [prompts[i] for i, _ in chunk] + [[tokenizer.eos_id]] * (bs - len(chunk))
        tokens, mask = sampling.left_pad(rows)
        tokens = np.pad(tokens, ((0, 0), (p - tokens.shape[1], 0)))
        mask = np.pad(mask, ((0, 0), (p - mask.shape[1], 0)))
        seeds = np.array(
            [protocol.seed + 7919 * i + j for i, j in chunk] + [0] * (bs - len(chunk)), np.int32
        )
        out, _, out_mask = sampling.generate(
            model,
            params,
            tokens,
            mask,
            seeds,
            max_new_tokens=n,
            eos_id=tokenizer.eos_id,
            temperature=temperature,
        )
        out, out_mask = np.asarray(out), np.asarray(out_mask)
        for k, (i, j) in enumerate(chunk):
            ids = out[k][out_mask[k] > 0].tolist()
            replies.append(Reply(i, j, *_decode(ids, tokenizer, mode)))
    return replies


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap of the mean."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _per_prompt(records, replies, value_fn, select_fn) -> list[float]:
    """Mean of value_fn over each selected prompt's replies."""
    by_prompt: dict[int, list[float]] = {}
    for r in replies:
        rec = records[r.index]
        if select_fn(rec):
            by_prompt.setdefault(r.index, []).append(value_fn(rec, r))
    return [float(np.mean(v)) for _, v in sorted(by_prompt.items())]


def _answerable(rec):
    return rec["answer"] is not None


def _known_fact(in_demos: bool | None):
    return lambda rec: (
        rec["skill"] == "fact"
        and rec["known"]
        and (in_demos is None or bool(rec.get("in_demos")) == in_demos)
    )


def _category_is(*names):
    return lambda rec, r: float(classify(rec, r.text, r.ended) in names)


# metric -> (which prompts, value of one reply)
METRICS = {
    "gold_reward": (lambda rec: True, lambda rec, r: gold_score(rec, r.text, r.ended)),
    "accuracy": (_answerable, _category_is(*CORRECT)),
    "accuracy_fact": (
        lambda rec: _answerable(rec) and rec["skill"] == "fact",
        _category_is(*CORRECT),
    ),
    "accuracy_arithmetic": (lambda rec: rec["skill"] == "arithmetic", _category_is(*CORRECT)),
    "accuracy_string": (lambda rec: rec["skill"] == "string", _category_is(*CORRECT)),
    "accuracy_known_in_demos": (_known_fact(True), _category_is(*CORRECT)),
    "accuracy_known_not_in_demos": (_known_fact(False), _category_is(*CORRECT)),
    "idk_known": (_known_fact(None), _category_is("idk")),
    "abstention_unknown": (lambda rec: not rec["known"], _category_is("idk")),
    "hallucination_unknown": (lambda rec: not rec["known"], _category_is("hallucinated")),
    "length_tokens": (lambda rec: True, lambda rec, r: float(r.n_tokens)),
    "eos_rate": (lambda rec: True, lambda rec, r: float(r.ended)),
}


def summarize(
    records: Sequence[dict], replies: Sequence[Reply], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    out = {}
    for name, (select, value) in METRICS.items():
        per_prompt = _per_prompt(records, replies, value, select)
        mean, lo, hi = bootstrap_ci(per_prompt, n_boot, seed)
        out[name] = {"mean": mean, "lo": lo, "hi": hi, "n": len(per_prompt)}
    return out


def evaluate(
    model,
    params,
    tokenizer,
    records: Sequence[dict],
    protocol: Protocol = Protocol(),
    mode: str = "chat",
) -> dict:
    """{"greedy": metrics, "sample": metrics, "replies": {...}} for one model."""
    records = list(records)
    result = {}
    for name, temperature, samples in (
        ("greedy", 0.0, 1),
        ("sample", protocol.temperature, protocol.samples),
    ):
        replies = generate_replies(
            model,
            params,
            tokenizer,
            records,
            mode=mode,
            temperature=temperature,
            samples=samples,
            protocol=protocol,
        )
        result[name] = summarize(records, replies, protocol.bootstrap)
        result.setdefault("replies", {})[name] = replies
    return result


def format_table(results: dict[str, dict], protocol_name: str, metrics: Sequence[str]) -> str:
    """Markdown table: one row per model, `mean [lo, hi]` per metric."""
    header = "| model | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    for model_name, res in results.items():
        cells = []
        for m in metrics:
            s = res[protocol_name][m]
            cells.append(f"{s['mean']:.3f} [{s['lo']:.2f}, {s['hi']:.2f}]")
        lines.append(f"| {model_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
