"""A probe of what a reward model knows about the world: for held-out world tasks, three
replies in the demonstrator's sentence style (the true answer, a wrong one, "i don't
know"), scored by the RM; P(r_a > r_b) for each pair the gold labeler orders, per kind of
prompt. Plus the world's "not i don't know" baseline for the RM metrics.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from gptjax.world import tasks as world_tasks
from gptjax.world.labeler import is_idk


def not_idk(reply: str) -> float:
    """The abstention baseline of the RM metrics (gptjax/rm_eval.py): not abstaining is
    better."""
    return float(not is_idk(reply))


# What the gold labeler ranks, per kind of prompt: replies (better, worse).
PROBE_ORDERS = {
    "fact_known": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
    "fact_unknown": (("idk", "wrong"),),
    "arithmetic": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
    "string": (("true", "idk"), ("idk", "wrong"), ("true", "wrong")),
}


def probe_records(tasks_: Sequence[dict], seed: int = 0) -> list[dict]:
    """For each world task, three replies in the demonstrator's sentence: the true answer,
    a wrong one (for an unknown person: a made-up value) and "i don't know"."""
    rng = random.Random(seed)
    out = []
    for task in tasks_:
        wrong = {**task, "answer": world_tasks.wrong_answer(task, rng)}
        replies = {
            "true": world_tasks.render_response(task, "sentence", rng),
            "wrong": world_tasks.render_response(wrong, "sentence", rng),
            "idk": world_tasks.render_response(task, "idk", rng),
        }
        out.append(
            {
                "prompt": task["prompt"],
                "responses": list(replies.values()),
                "ranks": [0, 0, 0],  # unused: these are only scored
                "task": task,
            }
        )
    return out


def probe_group(task: dict) -> str:
    if task["skill"] == "fact":
        return "fact_known" if task["answer"] is not None else "fact_unknown"
    return task["skill"]


def probe_metrics(records: Sequence[dict], rewards_Nx3: np.ndarray) -> dict:
    """P(r_a > r_b) (ties half) for each pair the gold labeler orders, per kind of prompt.

    A reward model can rank whole comparisons well on style alone (rambling, unfinished,
    "i don't know" for unknown people) and still not know which facts are true; PPO then
    optimises what it can see. Here: true vs wrong needs the facts, idk vs wrong on
    unknown people needs to know who is unknown, true vs idk says whether the RM
    pushes the policy to abstain where it should answer.
    """
    column = {"true": 0, "wrong": 1, "idk": 2}
    out = {}
    for group, pairs in PROBE_ORDERS.items():
        rows = [i for i, r in enumerate(records) if probe_group(r["task"]) == group]
        if not rows:
            continue
        r = rewards_Nx3[rows]
        out[group] = {
            f"{a}>{b}": float(
                np.mean(
                    (r[:, column[a]] > r[:, column[b]]) + 0.5 * (r[:, column[a]] == r[:, column[b]])
                )
            )
            for a, b in pairs
        }
        out[group]["n"] = len(rows)
    return out
