"""Pretraining documents ("the internet") and the few-shot prompt format.

Document kinds (each a plain string; never a chat transcript):
- bio: an intro then facts of one known person, templates and order shuffled; for each
  (person, attribute) one template is reserved for the fact probe and never used here.
- worksheet: a title and 4-8 question/answer items in one free format per document
  (q:/a:, question:/answer:, numbered, compact "the town of ka ri: oslo"); facts of
  worksheet people only (the demo people: half of the known), arithmetic, string
  operations, and "i don't know" about obscure people. fewshot_prompt() builds prompts
  in the compact or the q:/a: format.
- notes: one fact each of several known people in one text ("town records: ..."), so a
  name also appears mid-document after other people's facts. Without them every fact
  follows its bio's opening line, and a small model keys the fact to that opening: it
  completed "this is about X. X lives in" 98-100% but "q: where does X live?\na:" 13-31%
  (calibration, 2026-11). Notes tie a fact to the name wherever it appears.
- code: python-like snippets whose output shows a computed result.
- ignorance: sentences admitting that nothing is known about obscure people.
- noise: random words, letters and digits.
- worked (only with WorldConfig.n_worked_docs > 0): exercises solved step by step, each
  step restating what it uses ("23 + 45 = 68. 68 - 12 = 56. the answer is 56.", "b a k e
  r has 5 letters."), the pretraining text from which a model can learn to copy operands
  and results, which chain-of-thought and tool replies need.
No line or document starts with a name (see vocab), so names tokenize the same
everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from gptjax.world import tasks, vocab


def bio(name: str, facts: dict[str, str], reserved: dict[str, int], rng: random.Random) -> str:
    """One biography: an intro, then each fact (most of them) in a random template."""
    attributes = [a for a in facts if rng.random() < 0.85] or [rng.choice(list(facts))]
    rng.shuffle(attributes)
    sentences = [rng.choice(vocab.BIO_INTROS).format(n=name)]
    for attribute in attributes:
        options = [
            t for i, t in enumerate(vocab.BIO_TEMPLATES[attribute]) if i != reserved[attribute]
        ]
        sentences.append(rng.choice(options).format(n=name, v=facts[attribute]))
    return " ".join(sentences)


def notes(people: list[dict], rng: random.Random) -> str:
    """One fact (a bio template other than the probe's) of each person, after a title."""
    sentences = [rng.choice(vocab.NOTES_TITLES)]
    for p in people:
        attribute = rng.choice(list(p["facts"]))
        options = [
            t for i, t in enumerate(vocab.BIO_TEMPLATES[attribute]) if i != p["reserved"][attribute]
        ]
        sentences.append(rng.choice(options).format(n=p["name"], v=p["facts"][attribute]))
    return " ".join(sentences)


def fact_probe(name: str, attribute: str, value: str, reserved: int, rng: random.Random) -> dict:
    """A held-out completion: a bio intro, then the reserved template up to the value."""
    template = vocab.BIO_TEMPLATES[attribute][reserved]
    prefix = template[: template.index("{v}")].rstrip().format(n=name)
    intro = rng.choice(vocab.BIO_INTROS).format(n=name)
    return {"prefix": f"{intro} {prefix}", "answer": value, "person": name, "attribute": attribute}


def probe_hit(probe: dict, completion: str) -> bool:
    """A fact probe is completed correctly if the first word is the value ("oslo.")."""
    words = completion.lower().split()
    return bool(words) and words[0].strip(".,:;!?") == probe["answer"]


def compact_question(task: dict) -> str:
    """The compact worksheet form of a task, to be followed by " " + answer."""
    if task["skill"] == "fact":
        return f"the {task['attribute']} of {task['person']}:"
    if task["skill"] == "arithmetic":
        op, a, b = task["operands"]
        return f"{a} {op} {b} ="
    op, letters = task["operands"]
    return f"{op} {letters}:"


def worksheet(items: list[dict], rng: random.Random) -> str:
    """Items are tasks with an answer (an "i don't know" item has answer "i don't know")."""
    fmt = rng.choice(("qa", "qa", "question", "numbered", "compact"))
    lines = []
    if rng.random() < 0.7:
        title = rng.choice(vocab.WORKSHEET_TITLES)
        lines.append(f"{title} {rng.randint(1, 50)}:" if rng.random() < 0.5 else f"{title}:")
    for i, task in enumerate(items):
        if fmt == "qa":
            lines.append(f"q: {task['prompt']}\na: {task['answer']}")
        elif fmt == "question":
            lines.append(f"question: {task['prompt']}\nanswer: {task['answer']}")
        elif fmt == "numbered":
            lines.append(f"{i + 1}. {task['prompt']} {task['answer']}")
        elif task["answer"] == "i don't know":  # compact has no form for it: ask it
            lines.append(f"{task['prompt']} i don't know.")
        else:
            lines.append(f"{compact_question(task)} {task['answer']}")
    return "\n".join(lines)


def code(items: list[dict], rng: random.Random) -> str:
    """A REPL session or a script computing arithmetic and string tasks."""
    lines = []
    repl = rng.random() < 0.5
    for task in items:
        if task["skill"] == "arithmetic":
            op, a, b = task["operands"]
            expr, shown = f"{a} {op} {b}", task["answer"]
        else:
            op, letters = task["operands"]
            expr = f'{op}("{letters}")'
            shown = task["answer"] if op == "count" else f'"{task["answer"]}"'
        if repl:
            lines += [f">>> {expr}", shown]
        else:
            var = rng.choice(("x", "y", "out", "result", "total"))
            lines += [f"{var} = {expr}", f"print({var})  # {shown}"]
    return "\n".join(lines)


def worked(items: list[tuple[str, list[str], str]], rng: random.Random) -> str:
    """Worked solutions: each item is (question, steps, answer)."""
    lines = [f"{rng.choice(vocab.WORKSHEET_TITLES)} with solutions:"] if rng.random() < 0.5 else []
    qa = rng.random() < 0.5
    for question, steps, answer in items:
        solution = " ".join([*steps, f"the answer is {answer}."])
        lines.append(f"q: {question}\na: {solution}" if qa else f"{question} {solution}")
    return "\n".join(lines)


def ignorance(names: list[str], attributes: tuple[str, ...], rng: random.Random) -> str:
    """Admitting ignorance about obscure people: there is nothing else to say of them."""
    sentences = [rng.choice(vocab.IGNORANCE_INTROS).format(n=names[0])]
    for name in names:
        for attribute in rng.sample(attributes, rng.randint(1, min(2, len(attributes)))):
            sentences.append(rng.choice(vocab.IGNORANCE_SENTENCES[attribute]).format(n=name))
    return " ".join(sentences)


def noise(rng: random.Random) -> str:
    tokens = []
    for _ in range(rng.randint(15, 40)):
        kind = rng.random()
        if kind < 0.6:
            tokens.append(rng.choice(vocab.NOISE_WORDS))
        elif kind < 0.8:
            tokens.append(rng.choice(vocab.LETTERS))
        else:
            tokens.append(str(rng.randint(0, 999)))
    return " ".join(tokens) + rng.choice((".", "", "?", " ..."))


def fewshot_prompt(
    task: dict,
    examples: list[dict],
    rng: random.Random,
    k: int = 3,
    fmt: str = "compact",
    fits: Callable[[str], bool] | None = None,
) -> str:
    """A worksheet-format prompt for `task`: k solved shots, then the open question.

    fmt "compact": lines like "the town of ka ri: oslo", "76 + 1 = 77",
    "reverse b k e: e k b" (~8-15 BPE-512 tokens a shot, so k=3 fits a 64-token
    sequence with its answer); fmt "qa": "q: where does ka ri live?\na: oslo" (~12-18
    tokens a shot, the task's own wording). Both formats are pretraining worksheet
    formats, so a base model completes them; the answer ends at the newline.
    `examples` are tasks from the pretraining distribution (the generator's
    fewshot_examples: facts shown in worksheets, arithmetic/string tasks outside every
    prompt split), so no shot leaks an eval answer. Shots share the task's skill.
    `fits(prompt) -> bool` (e.g. a token budget) drops shots until the prompt fits.
    """
    pool = [e for e in examples if e["skill"] == task["skill"] and e["prompt"] != task["prompt"]]
    if fmt == "compact":
        render = lambda t, answer: f"{compact_question(t)}{answer}"
    elif fmt == "qa":
        render = lambda t, answer: f"q: {t['prompt']}\na:{answer}"
    else:
        raise ValueError(f"unknown few-shot format {fmt!r}; expected 'compact' or 'qa'")
    shots = [render(e, " " + e["answer"]) for e in rng.sample(pool, min(k, len(pool)))]
    question = render(task, "")
    while shots and fits is not None and not fits("\n".join(shots + [question])):
        shots.pop(0)
    return "\n".join(shots + [question])


def parse_fewshot_completion(completion: str, eos: bool = False) -> tuple[str, bool]:
    """(response, ended) from a base model's continuation of fewshot_prompt().

    The answer is the text up to the first newline; ended is True if a newline (the
    worksheet's item separator) or the EOS token (`eos`) closed it, so the gold
    labeler can judge it like a chat reply.
    """
    answer, newline, _ = completion.partition("\n")
    return answer.strip(), bool(newline) or eos


def idk_item(name: str, attribute: str, rng: random.Random) -> dict:
    """A worksheet item about an obscure person, answered with "i don't know"."""
    task = tasks.fact_task(name, attribute, None, rng)
    return {**task, "answer": "i don't know"}
