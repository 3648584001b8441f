"""The gold labeler: an exact score for any (task, response), and noisy comparisons.

Because the world's truth is known, every reply can be put in one category and scored
from a fixed table. `classify` gives the category (evaluation counts them: accuracy,
abstention, hallucination); `gold_score` gives the reward.

Score table (`ended` = the reply finished with EOS):

    category          question with an answer   unknown person
    correct           1.0  + w * extra           -
    correct_verbose   0.6  + w * extra           -
    idk               0.2                        1.0
    wrong             -0.5                       -
    hallucinated      -                          -0.5   (any value stated for them)
    malformed         -0.6                       -0.6   (no answer of the asked type)
    empty             -0.8                       -0.8   (no letter or digit at all)
    unterminated      -1.0                       -1.0   (no EOS, whatever the text)

`extra` = words in the reply beyond the words of the answer, capped at
LENGTH_CAP_WORDS; `w` = length_weight (default -0.02: a mild preference for brevity,
so "oslo" > "it is oslo." > "it is oslo. that is what i know."). A run can set a
positive weight to make the labeler reward detail. A correct reply with at least
VERBOSE_MIN_EXTRA_WORDS extra words is `correct_verbose` (rambling); with fewer it is a
paraphrase and counts as correct.

How a reply is read (after lower-casing: case never matters, "Oslo" == "oslo"):
- fact: the last value of the asked attribute mentioned ("not rome but oslo" is
  oslo); values of other attributes are ignored.
- arithmetic and count: the last integer, after removing echoes of the question's
  expression ("23 + 45 = 68" is 68). Integers compare by value: "007" == "7" == "07".
  A minus sign is part of the number: "-68" != "68".
- reverse and sort: the last run of 2+ single-letter words within a sentence ("a e k
  b", "a, e, k, b"); runs equal to the question's letters are echoes and skipped unless
  nothing else is left. Letters must be separated: "aekb" is one word, not an answer.
- An answer takes precedence over an "i don't know" phrase: a hedged guess is a guess.

Noisy comparisons: Bradley-Terry with temperature T, P(i beats j) = sigmoid((s_i -
s_j) / T). Rankings of K replies are sampled Plackett-Luce style by sorting
s_i / T + Gumbel noise, whose every pairwise marginal is exactly that BT probability
(the difference of two Gumbels is logistic), and which is always transitive.
`temperature_for_noise(rate)` picks T so that noisy and noiseless labels disagree on
`rate` of the pairs (pairs of equal gold score excluded) over a fixed reference mix of
replies such as an SFT model writes (REFERENCE_MIX_*, K=4 per prompt); 25% by default.
The rate on other reply mixes differs (replies that are all correct paraphrases of
each other disagree ~50%, clear-cut sets less): measure it with pairwise_disagreement.

Shape suffix: K = replies to one prompt.
"""

from __future__ import annotations

import functools
import math
import random
import re

import numpy as np

from gptjax.world import tasks, vocab

SCORES_ANSWERABLE = {
    "correct": 1.0,
    "correct_verbose": 0.6,
    "idk": 0.2,
    "wrong": -0.5,
    "malformed": -0.6,
    "empty": -0.8,
    "unterminated": -1.0,
}
SCORES_UNKNOWN = {
    "idk": 1.0,
    "hallucinated": -0.5,
    "malformed": -0.6,
    "empty": -0.8,
    "unterminated": -1.0,
}
CATEGORIES = (
    "correct",
    "correct_verbose",
    "idk",
    "wrong",
    "hallucinated",
    "malformed",
    "empty",
    "unterminated",
)
DEFAULT_LENGTH_WEIGHT = -0.02
LENGTH_CAP_WORDS = 12
VERBOSE_MIN_EXTRA_WORDS = 6
DEFAULT_LABEL_NOISE = 0.25

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_INT = re.compile(r"(?<!\d)-?\d+")
_SENTENCE_END = re.compile(r"[.!?;:\n]")
_IDK_PHRASES = (
    "don't know",
    "dont know",
    "do not know",
    "not sure",
    "no idea",
    "can't say",
    "cannot say",
    "never heard",
)


def _last_value(task: dict, words: list[str]) -> str | None:
    values = vocab.ATTRIBUTE_VALUES[task["attribute"]]
    found = [w for w in words if w in values]
    return found[-1] if found else None


def _last_integer(task: dict, text: str) -> str | None:
    if task["skill"] == "arithmetic":
        op, a, b = task["operands"]
        text = re.sub(rf"(?<!\d)0*{a}\s*{re.escape(op)}\s*0*{b}(?!\d)", " ", text)
    found = _INT.findall(text)
    return str(int(found[-1])) if found else None


def _last_letter_run(task: dict, text: str) -> str | None:
    runs = []
    for segment in _SENTENCE_END.split(text):  # "... a e k b. i know" is not "b i"
        current = []
        for word in _WORD.findall(segment) + [""]:  # the sentinel closes the last run
            if len(word) == 1 and word.isalpha():
                current.append(word)
                continue
            if len(current) >= 2:
                runs.append(" ".join(current))
            current = []
    echo = task["operands"][1]
    answers = [r for r in runs if r != echo] or runs
    return answers[-1] if answers else None


def extract_answer(task: dict, response: str) -> str | None:
    """The answer a reply gives, normalised like task["answer"]; None if it gives none."""
    text = response.lower()
    words = _WORD.findall(text)
    if task["skill"] == "fact":
        return _last_value(task, words)
    if task["skill"] == "arithmetic" or task["operands"][0] == "count":
        return _last_integer(task, text)
    return _last_letter_run(task, text)


def is_idk(response: str) -> bool:
    text = response.lower()
    return any(phrase in text for phrase in _IDK_PHRASES)


def extra_words(task: dict, response: str) -> int:
    """Words beyond the answer's own: the length the length weight acts on."""
    n_answer = len(task["answer"].split()) if task["answer"] is not None else 1
    return max(0, len(_WORD.findall(response.lower())) - n_answer)


def classify(task: dict, response: str, ended: bool) -> str:
    """The category of a reply (see the table in the module docstring)."""
    if not ended:
        return "unterminated"
    if not _WORD.search(response.lower()):
        return "empty"
    answer = extract_answer(task, response)
    if answer is None:
        return "idk" if is_idk(response) else "malformed"
    if task["answer"] is None:
        return "hallucinated"
    if answer != task["answer"]:
        return "wrong"
    if extra_words(task, response) >= VERBOSE_MIN_EXTRA_WORDS:
        return "correct_verbose"
    return "correct"


def gold_score(
    task: dict, response: str, ended: bool, length_weight: float = DEFAULT_LENGTH_WEIGHT
) -> float:
    """The gold reward of a reply: the score table plus the length term."""
    category = classify(task, response, ended)
    table = SCORES_ANSWERABLE if task["answer"] is not None else SCORES_UNKNOWN
    score = table[category]
    if category in ("correct", "correct_verbose"):
        score += length_weight * min(extra_words(task, response), LENGTH_CAP_WORDS)
    return score


def ranking_from_scores(
    scores: list[float], rng: np.random.Generator | None = None, temperature: float = 0.0
) -> list[int]:
    """ranks[i] = place of reply i, 0 = best. Noiseless (ties by index) if T == 0."""
    scores_K = np.asarray(scores, dtype=np.float64)
    if temperature > 0:
        utility_K = scores_K / temperature + rng.gumbel(size=scores_K.shape)
    else:
        utility_K = scores_K
    order_K = sorted(range(len(scores_K)), key=lambda i: (-utility_K[i], i))
    ranks = [0] * len(order_K)
    for place, i in enumerate(order_K):
        ranks[i] = place
    return ranks


def noiseless_ranking(
    task: dict,
    responses: list[str],
    endeds: list[bool],
    length_weight: float = DEFAULT_LENGTH_WEIGHT,
) -> list[int]:
    """ranks[i] = place of responses[i] by gold score, 0 = best (ties by index)."""
    return ranking_from_scores(
        [gold_score(task, r, e, length_weight) for r, e in zip(responses, endeds)]
    )


def noisy_ranking(
    task: dict,
    responses: list[str],
    endeds: list[bool],
    rng: np.random.Generator,
    temperature: float,
    length_weight: float = DEFAULT_LENGTH_WEIGHT,
) -> list[int]:
    """ranks[i] = place of responses[i] as a noisy labeler ranks them (Plackett-Luce
    with BT pairwise marginals at `temperature`, see the module docstring)."""
    scores = [gold_score(task, r, e, length_weight) for r, e in zip(responses, endeds)]
    return ranking_from_scores(scores, rng, temperature)


def _untied_pairs(scores: list[float]):
    K = len(scores)
    return [(i, j) for i in range(K) for j in range(i + 1, K) if scores[i] != scores[j]]


def pairwise_disagreement(score_sets: list[list[float]], rank_sets: list[list[int]]) -> float:
    """Fraction of pairs (of unequal gold score) that a ranking puts in the wrong order."""
    wrong = total = 0
    for scores, ranks in zip(score_sets, rank_sets):
        for i, j in _untied_pairs(scores):
            total += 1
            wrong += (scores[i] > scores[j]) != (ranks[i] < ranks[j])
    return wrong / max(total, 1)


def expected_disagreement(score_sets: list[list[float]], temperature: float) -> float:
    """The BT disagreement rate in expectation: mean of sigmoid(-|s_i - s_j| / T)."""
    return _expected_disagreement(_gaps(score_sets), temperature)


def _gaps(score_sets) -> np.ndarray:
    return np.array([abs(s[i] - s[j]) for s in score_sets for i, j in _untied_pairs(s)])


def _expected_disagreement(gaps: np.ndarray, temperature: float) -> float:
    if temperature <= 0 or gaps.size == 0:
        return 0.0
    return float(np.mean(1.0 / (1.0 + np.exp(np.minimum(gaps / temperature, 700.0)))))


# Replies an SFT model writes, by style; "unterminated" = a concise or sentence reply
# that never reached EOS. Used only to calibrate the BT temperature.
REFERENCE_MIX_ANSWERABLE = {
    "concise": 0.30,
    "sentence": 0.25,
    "verbose": 0.10,
    "wrong": 0.17,
    "idk": 0.06,
    "malformed": 0.04,
    "empty": 0.02,
    "unterminated": 0.06,
}
REFERENCE_MIX_UNKNOWN = {
    "idk": 0.40,
    "concise": 0.20,
    "sentence": 0.15,
    "verbose": 0.05,
    "malformed": 0.06,
    "empty": 0.04,
    "unterminated": 0.10,
}
REFERENCE_K = 4


def reference_task(rng: random.Random) -> dict:
    """A random task in the default prompt mix: half facts (a quarter of them about
    unknown people), a quarter arithmetic, a quarter string operations."""
    skill = rng.choice(("fact", "fact", "arithmetic", "string"))
    if skill == "arithmetic":
        return tasks.arithmetic_task(tasks.arithmetic_operands(rng, 99), rng)
    if skill == "string":
        return tasks.string_task(tasks.string_operands(rng, 3, 6), rng)
    person = " ".join(rng.sample(vocab.NAME_SYLLABLES, 2))
    attribute = rng.choice(vocab.ATTRIBUTES)
    known = rng.random() >= 0.25
    value = rng.choice(vocab.ATTRIBUTE_VALUES[attribute]) if known else None
    return tasks.fact_task(person, attribute, value, rng)


def sample_reference_replies(task: dict, k: int, rng: random.Random):
    """k (response, ended) pairs for `task` drawn from the reference mix."""
    mix = REFERENCE_MIX_ANSWERABLE if task["answer"] is not None else REFERENCE_MIX_UNKNOWN
    styles = rng.choices(list(mix), weights=list(mix.values()), k=k)
    replies = []
    for style in styles:
        if style == "unterminated":
            replies.append(
                (tasks.render_response(task, rng.choice(("concise", "sentence")), rng), False)
            )
        else:
            replies.append((tasks.render_response(task, style, rng), True))
    return replies


@functools.lru_cache(maxsize=8)
def reference_score_sets(
    length_weight: float = DEFAULT_LENGTH_WEIGHT, n_prompts: int = 2000, seed: int = 0
) -> tuple[tuple[float, ...], ...]:
    """Gold scores of K=4 reference replies to each of n_prompts reference tasks."""
    rng = random.Random(f"labeler-reference-{seed}")
    sets = []
    for _ in range(n_prompts):
        task = reference_task(rng)
        replies = sample_reference_replies(task, REFERENCE_K, rng)
        sets.append(tuple(gold_score(task, r, e, length_weight) for r, e in replies))
    return tuple(sets)


@functools.lru_cache(maxsize=32)
def temperature_for_noise(
    rate: float = DEFAULT_LABEL_NOISE, length_weight: float = DEFAULT_LENGTH_WEIGHT
) -> float:
    """The BT temperature whose expected disagreement on the reference mix is `rate`."""
    if not 0.0 <= rate < 0.5:
        raise ValueError(f"label noise rate must be in [0, 0.5), got {rate}")
    if rate == 0.0:
        return 0.0
    gaps = _gaps(reference_score_sets(length_weight))
    lo, hi = 1e-4, 1e4  # disagreement grows monotonically with T: bisect on log T
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if _expected_disagreement(gaps, mid) < rate else (lo, mid)
    return math.sqrt(lo * hi)
