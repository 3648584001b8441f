"""Prints samples of every split of the world and the gold labeler's scores for replies.

python -m experiments.main --stages=show_data
"""

from __future__ import annotations

import random

from experiments import sources
from experiments.rundir import StageContext
from gptjax import world
from gptjax.world import tasks

# Reply styles shown for one prompt, from the world's own demonstrator (tasks.STYLES).
STYLES = ("concise", "sentence", "verbose", "idk", "wrong", "malformed", "empty")


def _clip(text: str, n: int = 160) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else text[: n - 3] + "..."


def scored_replies(task: dict, rng: random.Random) -> list[tuple[str, str, bool, float]]:
    """(style, reply, ended, gold score) for each reply style, plus an unterminated one."""
    rows = []
    for style in STYLES:
        if style in ("concise", "sentence", "verbose") and task["answer"] is None:
            continue
        reply = tasks.render_response(task, style, rng)
        rows.append((style, reply, True, world.gold_score(task, reply, True)))
    if task["answer"] is not None:
        reply = tasks.render_response(task, "concise", rng)
        rows.append(("no EOS", reply, False, world.gold_score(task, reply, False)))
    return rows


def run(ctx: StageContext) -> dict:
    data = sources.world_data(ctx.config, ctx.workdir)
    lines = [
        f"world {sources.world_config(ctx.config).content_hash()}: "
        + ", ".join(f"{name} {len(split)}" for name, split in data.items())
    ]
    for name, split in data.items():
        lines.append(f"\n[{name}]")
        for i in range(min(2, len(split))):
            rec = split[i]
            if "text" in rec:
                lines.append(f"  ({rec.get('kind', 'doc')}) {_clip(rec['text'])}")
            elif "prefix" in rec:
                lines.append(f"  {rec['prefix']!r} -> {rec['answer']!r}")
            elif "prompt" in rec:
                resp = f" -> {rec['response']!r}" if "response" in rec else ""
                lines.append(f"  [{rec['skill']}] {rec['prompt']!r}{resp}")
            else:
                lines.append(f"  {_clip(str(rec))}")
    rng = random.Random(0)
    evals = data["eval_prompts"]
    picks = [
        next(r for r in (evals[i] for i in range(len(evals))) if r["skill"] == s)
        for s in ("fact", "arithmetic", "string")
    ]
    picks.append(
        next(
            r
            for r in (evals[i] for i in range(len(evals)))
            if r["skill"] == "fact" and not r["known"]
        )
    )
    lines.append("\n[gold labeler]")
    for task in picks:
        lines.append(f"  {task['prompt']!r} (answer {task['answer']!r}, known={task['known']})")
        for style, reply, ended, score in scored_replies(task, rng):
            lines.append(f"    {score:+.2f}  {style:<10} {reply!r}{'' if ended else ' (no EOS)'}")
    return {"stage": ctx.name, "text": "\n".join(lines)}
