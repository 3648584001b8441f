"""Thinking and tools in the world: multi-step tasks, replies in three modes, and judging.

Task kinds (`KINDS`), all task records as in tasks.py:
- arithmetic: the world's one-step "a op b" (tasks.arithmetic_task);
- chain: two steps, skill "multistep", operands ["chain", a, op1, b, op2, c], "what is
  23 + 45 - 12?" (every partial result non-negative);
- letters: a fact then a count, skill "multistep", operands ["letters"], "how many
  letters has the job of ka ri?"; the answer is the length of the value, None for a
  person nobody wrote about ("i don't know" is then right);
- fact: the world's fact question (tasks.fact_task).

Modes (`MODES`): the user asks for one with a cue at the end of the question (`CUES`), so
one SFT model learns all three and the evaluator can ask each task in each mode:
- direct: the answer sentence, "it is 56.";
- cot: the steps, the last one stating the result, "23 + 45 = 68. 68 - 12 = 56." (Wei
  et al. 2022); a fact is stated, then answered: "the job of ka ri is baker. it is baker.";
- tools: a call, its result, then the answer (gptjax/tools.py syntax):
  calc for arithmetic and chains, lookup for facts and letters (Toolformer-style).
A reply is judged on its own words (tool turns stripped): the last value or integer it
states must be the answer, or it must abstain when the answer is None.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from gptjax import tools
from gptjax.world import labeler, tasks, vocab

KINDS = ("arithmetic", "chain", "letters", "fact")
MODES = ("direct", "cot", "tools")
CUES = {"direct": "", "cot": " think step by step.", "tools": " use a tool."}
# Attributes a letters task asks about (every town has 4 letters: nothing to count).
LETTER_ATTRIBUTES = ("job", "pet", "color", "instrument")
# The words a lookup query adds to the name, per attribute: each is in at least two of
# the attribute's BIO_TEMPLATES, so one survives the template reserved for the fact probe.
QUERY_WORDS = {
    "town": "lives town",
    "job": "works job trade",
    "pet": "pet keeps",
    "color": "color",
    "instrument": "plays instrument",
}
# The sentence a chain of thought states a fact in (a BIO_TEMPLATES entry).
_COT_FACT = {"town": 2, "job": 3, "pet": 2, "color": 1, "instrument": 2}
_ATTRIBUTE_PHRASE = {
    "job": "the job of {n}",
    "pet": "the pet of {n}",
    "color": "the favorite color of {n}",
    "instrument": "the instrument of {n}",
}
_INT = re.compile(r"\d+")


def chain_operands(rng: random.Random, max_number: int) -> list:
    while True:
        a, b, c = (rng.randint(0, max_number) for _ in range(3))
        op1, op2 = rng.choice(tasks.ARITHMETIC_OPS), rng.choice(tasks.ARITHMETIC_OPS)
        first = a + b if op1 == "+" else a - b
        final = first + c if op2 == "+" else first - c
        if first >= 0 and final >= 0:
            return ["chain", a, op1, b, op2, c]


def chain_task(operands: list, rng: random.Random) -> dict:
    _, a, op1, b, op2, c = operands
    expr = f"{a} {op1} {b} {op2} {c}"
    prompt = rng.choice(vocab.ARITHMETIC_QUESTIONS).replace("{a} {op} {b}", expr)
    return {
        "prompt": prompt,
        "skill": "multistep",
        "person": None,
        "attribute": None,
        "operands": list(operands),
        "answer": str(_chain_steps(operands)[-1][1]),
        "known": True,
    }


def _chain_steps(operands: list) -> list[tuple[str, int]]:
    _, a, op1, b, op2, c = operands
    first = a + b if op1 == "+" else a - b
    return [
        (f"{a} {op1} {b}", first),
        (f"{first} {op2} {c}", first + c if op2 == "+" else first - c),
    ]


def letters_task(person: str, attribute: str, value: str | None) -> dict:
    return {
        "prompt": f"how many letters has {_ATTRIBUTE_PHRASE[attribute].format(n=person)}?",
        "skill": "multistep",
        "person": person,
        "attribute": attribute,
        "operands": ["letters"],
        "answer": None if value is None else str(len(value)),
        "value": value,
        "known": value is not None,
    }


def kind(task: dict) -> str:
    return task["operands"][0] if task["skill"] == "multistep" else task["skill"]


def fact_query(person: str, attribute: str) -> str:
    return f"{person} {QUERY_WORDS[attribute]}"


def _fact_sentence(person: str, attribute: str, value: str) -> str:
    return vocab.BIO_TEMPLATES[attribute][_COT_FACT[attribute]].format(n=person, v=value)


def _answer_sentence(task: dict, value: str) -> str:
    if task["skill"] == "fact":
        return vocab.FACT_SENTENCES[task["attribute"]].format(v=value)
    return vocab.ARITHMETIC_SENTENCE.format(c=value)


def _idk(task: dict) -> str:
    return vocab.IDK_FACT_RESPONSES[task["attribute"]].format(n=task["person"])


def cot_steps(task: dict) -> list[str]:
    """The steps of a chain of thought, the last one stating the answer (facts: the fact)."""
    k = kind(task)
    if k in ("fact", "letters"):
        value = task.get("value", task["answer"]) if k == "letters" else task["answer"]
        steps = [_fact_sentence(task["person"], task["attribute"], value)] if task["person"] else []
        if k == "letters":
            steps.append(f"{' '.join(value)} has {len(value)} letters.")
        return steps
    if k == "chain":
        return [f"{expr} = {result}." for expr, result in _chain_steps(task["operands"])]
    op, a, b = task["operands"]
    return [f"{a} {op} {b} = {task['answer']}."]


def render(task: dict, mode: str, lookup: Callable[[str], str] | None = None) -> str:
    """The demonstrator's reply to `task` in `mode`; tools mode on facts needs `lookup`
    (the corpus index: the reply shows what it returned)."""
    k = kind(task)
    value = task.get("value", task["answer"]) if k == "letters" else task["answer"]
    if mode == "direct":
        return _idk(task) if value is None else _answer_sentence(task, task["answer"])
    if mode == "cot":
        if k in ("fact", "letters") and value is None:
            return _idk(task)
        # Computed steps end with the result, stated: no answer sentence after them (a
        # 64-token model has no room for one; with it a sixth of the chain demos were cut).
        steps = cot_steps(task)
        return " ".join([*steps, _answer_sentence(task, value)] if k == "fact" else steps)
    if mode != "tools":
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if k in ("arithmetic", "chain"):
        ops = task["operands"]
        expr = " ".join(map(str, ops[1:])) if k == "chain" else f"{ops[1]} {ops[0]} {ops[2]}"
        turn = tools.tool_turn("calc", expr, task["answer"])
        return f"{turn} {_answer_sentence(task, task['answer'])}"
    if lookup is None:
        raise ValueError("tools mode on a fact needs the lookup tool")
    query = fact_query(task["person"], task["attribute"])
    turn = tools.tool_turn("lookup", query, lookup(query))
    if value is None:
        return f"{turn} {vocab.IDK_RESPONSES[0]}"
    if k == "letters":  # the count states the answer (and a 64-token model has no room)
        return f"{turn} {' '.join(value)} has {len(value)} letters."
    return f"{turn} {_answer_sentence(task, task['answer'])}"


def worked_item(task: dict) -> tuple[str, list[str], str]:
    """(question, steps, answer) of an arithmetic, chain or letters task for a worked document
    (documents.worked): the chain of thought's steps, for a word's letters directly."""
    return task["prompt"], cot_steps(task), task["answer"]


def word_letters_task(word: str) -> dict:
    """A letters task about a plain word (worked documents: no person, no fact)."""
    return {**letters_task(None, "job", word), "prompt": f"how many letters has {word}?"}


def question(task: dict, mode: str) -> str:
    """The user's turn asking `task` in `mode`."""
    return task["prompt"] + CUES[mode]


def stated_answer(task: dict, reply: str) -> str | None:
    """The answer a reply states in its own words (tool turns removed); None if none."""
    text = tools.strip_tool_turns(reply).lower()
    if task["skill"] == "fact":
        return labeler.extract_answer(task, text)
    if task["skill"] == "arithmetic":
        return labeler.extract_answer(task, text)
    found = _INT.findall(text)
    return str(int(found[-1])) if found else None


def is_correct(task: dict, reply: str, ended: bool) -> bool:
    """Ended, and the right answer (or, when nothing is known, an abstention with no
    answer)."""
    if not ended:
        return False
    answer = stated_answer(task, reply)
    if task["answer"] is None:
        return answer is None and labeler.is_idk(tools.strip_tool_turns(reply))
    return answer == task["answer"]


def make_tasks(
    n: int,
    facts: list[tuple],
    unknown: list[tuple],
    max_number: int,
    unknown_frac: float,
    rng: random.Random,
    excluded: set,
) -> list[dict]:
    """n tasks, kinds in equal shares; fact and letters tasks from (person, attribute,
    value) triples (unknown ones for an `unknown_frac` share); arithmetic and chain tasks
    not in `excluded` (their keys are added to it)."""
    out = []
    letter_facts = [t for t in facts if t[1] in LETTER_ATTRIBUTES]
    letter_unknown = [t for t in unknown if t[1] in LETTER_ATTRIBUTES]
    for i in range(n):
        k = KINDS[i % len(KINDS)]
        if k in ("fact", "letters"):
            pool_known, pool_unknown = (
                (facts, unknown) if k == "fact" else (letter_facts, letter_unknown)
            )
            pool = pool_unknown if pool_unknown and rng.random() < unknown_frac else pool_known
            if not pool:
                continue
            person, attribute, value = rng.choice(pool)
            task = (
                tasks.fact_task(person, attribute, value, rng)
                if k == "fact"
                else letters_task(person, attribute, value)
            )
            out.append(task)
            continue
        for _ in range(10_000):
            if k == "chain":
                task = chain_task(chain_operands(rng, max_number), rng)
            else:
                task = tasks.arithmetic_task(tasks.arithmetic_operands(rng, max_number), rng)
            if tasks.task_key(task) not in excluded:
                break
        else:
            raise ValueError("WorldConfig leaves too few arithmetic tasks for the reasoning splits")
        excluded.add(tasks.task_key(task))
        out.append(task)
    rng.shuffle(out)
    return out


def choose_mode(rng: random.Random, cot_frac: float, tool_frac: float) -> str:
    r = rng.random()
    return "tools" if r < tool_frac else "cot" if r < tool_frac + cot_frac else "direct"


def demonstrate(task: dict, mode: str, lookup: Callable[[str], str] | None) -> dict:
    """A demo record: the question with the mode's cue, the reply in that mode."""
    return {
        **task,
        "prompt": question(task, mode),
        "response": render(task, mode, lookup),
        "style": mode,
        "mode": mode,
    }
