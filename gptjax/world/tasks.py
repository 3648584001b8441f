"""Tasks (a question with its truth) and responses to them, in every style.

A task record is a JSON-able dict, the common shape of demos, PPO prompts and eval
prompts:

    {"prompt": "where does ka ri live?", "skill": "fact", "person": "ka ri",
     "attribute": "town", "operands": None, "answer": "oslo", "known": True}

- skill "fact": `person`, `attribute`; `answer` is the value, or None when the person
  is unknown (their facts exist nowhere, so "i don't know" is the right reply).
- skill "arithmetic": `operands` = [op, a, b] with op in "+", "-"; `answer` = str(result).
- skill "string": `operands` = [op, letters] with op in reverse / sort / count and
  letters space-separated ("b k e a"); `answer` = "a e k b" or "4".
`task_key` is the identity that splits must not share: (skill, person, attribute,
operands), never the prompt string (two wordings of one question are one task, and so
are 23 + 45 and 45 + 23).

`render_response(task, style, rng)` writes a reply in a given style; the demonstrator
(generate.py) and the labeler's reference response sets use it, and the tests use it
to build adversarial sets. Styles: concise (the bare answer), sentence ("it is
oslo."), verbose (the sentence plus filler), idk, wrong (a wrong answer of the
right type, or a hallucinated one for an unknown person), malformed, empty.
"""

from __future__ import annotations

import random

from gptjax.world import vocab

SKILLS = ("fact", "arithmetic", "string")
ARITHMETIC_OPS = ("+", "-")
STRING_OPS = ("reverse", "sort", "count")
STYLES = ("concise", "sentence", "verbose", "idk", "wrong", "malformed", "empty")


def task_key(task: dict) -> tuple:
    """The identity of a task, what split disjointness is checked on.

    Commutative operands are sorted: 23 + 45 and 45 + 23 are one task.
    """
    operands = tuple(task["operands"]) if task["operands"] is not None else None
    if operands is not None and operands[0] == "+":
        operands = ("+", min(operands[1:]), max(operands[1:]))
    return (task["skill"], task["person"], task["attribute"], operands)


def fact_task(person: str, attribute: str, value: str | None, rng: random.Random) -> dict:
    template = rng.choice(vocab.FACT_QUESTIONS[attribute])
    return {
        "prompt": template.format(n=person),
        "skill": "fact",
        "person": person,
        "attribute": attribute,
        "operands": None,
        "answer": value,
        "known": value is not None,
    }


def arithmetic_operands(rng: random.Random, max_number: int) -> list:
    op = rng.choice(ARITHMETIC_OPS)
    a, b = rng.randint(0, max_number), rng.randint(0, max_number)
    if op == "-" and b > a:  # keep results non-negative: no sign handling needed anywhere
        a, b = b, a
    return [op, a, b]


def arithmetic_answer(operands: list) -> str:
    op, a, b = operands
    return str(a + b if op == "+" else a - b)


def arithmetic_task(operands: list, rng: random.Random) -> dict:
    op, a, b = operands
    prompt = rng.choice(vocab.ARITHMETIC_QUESTIONS).format(a=a, op=op, b=b)
    return {
        "prompt": prompt,
        "skill": "arithmetic",
        "person": None,
        "attribute": None,
        "operands": list(operands),
        "answer": arithmetic_answer(operands),
        "known": True,
    }


def string_operands(rng: random.Random, min_letters: int, max_letters: int) -> list:
    """Distinct letters, so that sort and reverse have one unambiguous answer."""
    n = rng.randint(min_letters, max_letters)
    return [rng.choice(STRING_OPS), " ".join(rng.sample(vocab.LETTERS, n))]


def string_answer(operands: list) -> str:
    op, letters = operands
    seq = letters.split()
    if op == "reverse":
        return " ".join(reversed(seq))
    if op == "sort":
        return " ".join(sorted(seq))
    return str(len(seq))


def string_task(operands: list, rng: random.Random) -> dict:
    op, letters = operands
    prompt = rng.choice(vocab.STRING_QUESTIONS[op]).format(s=letters)
    return {
        "prompt": prompt,
        "skill": "string",
        "person": None,
        "attribute": None,
        "operands": list(operands),
        "answer": string_answer(operands),
        "known": True,
    }


def wrong_answer(task: dict, rng: random.Random) -> str:
    """A wrong answer of the right type: another value, a nearby number, a misordering.

    For an unknown person any value is a hallucination, so any value will do.
    """
    skill, answer = task["skill"], task["answer"]
    if skill == "fact":
        return rng.choice([v for v in vocab.ATTRIBUTE_VALUES[task["attribute"]] if v != answer])
    if skill == "arithmetic" or task["operands"][0] == "count":
        value = int(answer)
        delta = rng.choice([d for d in range(-10, 11) if d != 0 and value + d >= 0])
        return str(value + delta)
    seq = answer.split()
    while True:  # a permutation of the right letters that is not the answer
        candidate = rng.sample(seq, len(seq))
        if candidate != seq:
            return " ".join(candidate)


def _sentence(task: dict, answer: str) -> str:
    """The answer in the demonstrator's sentence (vocab.FACT_SENTENCES & co.)."""
    if task["skill"] == "fact":
        return vocab.FACT_SENTENCES[task["attribute"]].format(v=answer)
    if task["skill"] == "arithmetic":
        return vocab.ARITHMETIC_SENTENCE.format(c=answer)
    return vocab.STRING_SENTENCE.format(r=answer)


def idk_response(task: dict, rng: random.Random) -> str:
    if task["skill"] == "fact" and rng.random() < 0.5:
        return vocab.IDK_FACT_RESPONSES[task["attribute"]].format(n=task["person"])
    return rng.choice(vocab.IDK_RESPONSES)


def render_response(task: dict, style: str, rng: random.Random) -> str:
    """A reply to `task` in `style` (see STYLES); `wrong` uses wrong_answer()."""
    if style == "empty":
        return ""
    if style == "idk":
        return idk_response(task, rng)
    if style == "malformed":
        return rng.choice(vocab.NON_ANSWERS)
    if style not in ("concise", "sentence", "verbose", "wrong"):
        raise ValueError(f"unknown response style {style!r}; expected one of {STYLES}")
    answer = task["answer"]
    if style == "wrong" or answer is None:  # for an unknown person any value is made up
        answer = wrong_answer(task, rng)
        if style == "wrong":
            style = rng.choice(("concise", "sentence"))
    if style == "concise":
        return answer
    if style == "verbose":  # long answers get the shortest filler (replies <= 16 tokens)
        filler = rng.choice(vocab.FILLERS if len(answer) <= 6 else vocab.FILLERS[:1])
        return _sentence(task, answer) + " " + filler
    return _sentence(task, answer)
