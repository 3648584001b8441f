"""The world's plug-in for the generic evaluator (gptjax/evaluate.py): its exact gold
labeler as metrics and as a judge, and its few-shot prompt mode.

Because the world's truth is known, every reply is scored exactly: gold reward, accuracy
per skill, on known people seen / not seen in the demos, abstention and hallucination on
unknown people.
"""

from __future__ import annotations

from gptjax import eval_stats, evaluate
from gptjax.data import chat
from gptjax.world.documents import parse_fewshot_completion
from gptjax.world.labeler import DEFAULT_LENGTH_WEIGHT, classify, gold_score
from gptjax.world.reasoning import is_correct

CORRECT = ("correct", "correct_verbose")


def _fewshot_prompt_ids(record: dict, tokenizer) -> list[int]:
    return tokenizer.encode(record["fewshot_prompt"])


def _decode_fewshot(ids: list[int], tokenizer) -> tuple[str, bool, int, tuple[int, ...]]:
    eos = tokenizer.eos_id in ids
    text = tokenizer.decode(ids[: ids.index(tokenizer.eos_id)] if eos else ids)
    answer, ended = parse_fewshot_completion(text, eos=eos)
    # The worksheet answer ends at its newline: count its tokens, not what followed; as a
    # chat reply (for the RM) it is the answer, ended by EOS if the newline ended it.
    reply = tokenizer.encode(chat.SEP + answer) + [tokenizer.eos_id] * int(ended)
    return answer, ended, len(reply), tuple(reply)


# The record's worksheet-style `fewshot_prompt`: the base model prompted to act as an
# assistant; its answer is the text up to the newline.
FEWSHOT = evaluate.PromptMode("fewshot", _fewshot_prompt_ids, _decode_fewshot)
MODES = {"chat": evaluate.CHAT, "fewshot": FEWSHOT}


def gold_judge(length_weight: float = DEFAULT_LENGTH_WEIGHT):
    """The noiseless gold score of a reply under the world's length weight (a judge for
    evaluate.compare_to, a metric for eval_stats.summarize). The weight must be the
    world's own (`world.length_weight`): a sweep over it judges each variant by its own
    labeler."""
    return lambda record, reply: gold_score(record, reply.text, reply.ended, length_weight)


def gold_rewards(prompts, completions, ended, length_weight=None) -> list[float]:
    """The gold labeler as an RL reward (gptjax/rewards.py HostReward's call): the
    noiseless score of each reply, with the world's length weight."""
    kw = {} if length_weight is None else {"length_weight": length_weight}
    return [gold_score(p, c, e, **kw) for p, c, e in zip(prompts, completions, ended)]


def reasoning_rewards(prompts, completions, ended) -> list[float]:
    """The gold reward of a reasoning task (gptjax/world/reasoning.py) as an RL reward: 1
    for the right final answer in the reply's own words (or an abstention where nothing
    is known), else 0."""
    return [float(is_correct(p, c, e)) for p, c, e in zip(prompts, completions, ended)]


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


def metrics(length_weight: float = DEFAULT_LENGTH_WEIGHT) -> dict:
    """metric -> (which prompts, value of one reply), as eval_stats.REPLY_METRICS: the
    gold metrics, then the generic ones, then the win rates (gold- and RM-judged)."""
    gold = {
        "gold_reward": (lambda rec: True, gold_judge(length_weight)),
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
    }
    return {**gold, **eval_stats.REPLY_METRICS, **eval_stats.win_rate_metrics(("gold", "rm"))}


def judges(length_weight: float = DEFAULT_LENGTH_WEIGHT) -> dict:
    """The judges of evaluate.compare_to's win rates: gold (this length weight) and RM."""
    return {"gold": gold_judge(length_weight), "rm": evaluate.rm_judge}


# The columns of the printed tables: per reply set, and per model.
TABLE_METRICS = (
    "gold_reward",
    "rm_reward",
    "win_rate_gold_vs_sft",
    "lc_win_rate_gold_vs_sft",
    "kl_to_sft",
    "accuracy",
    "accuracy_known_not_in_demos",
    "abstention_unknown",
    "entropy",
    "distinct_2",
    "length_tokens",
)
MODEL_METRICS = ("heldout_lm_loss", "fewshot_accuracy")
