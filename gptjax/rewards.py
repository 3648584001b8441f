"""Where an online RL method's reward comes from: the trained reward model (scored on the
device, gptjax/rollout.py score_rollout), or a function of the reply text computed on the
host: the world's gold labeler used directly (a verifiable reward), or a user's Python
function named "module:function".

A host reward is called on a batch, as TRL's reward functions are:

    fn(prompts=[prompt record, ...], completions=[reply text, ...], ended=[bool, ...])
        -> [float, ...]

one record and reply per rollout row (a GRPO group repeats its prompt's record). A
non-finite value is passed on: the update step then discards the whole iteration, as it
does for non-finite RM scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RM, GOLD = "rm", "gold"


class RewardError(ValueError):
    """A reward function failed or returned something other than one number per reply;
    the message names the function and the prompt."""


def _prompt_text(record) -> str:
    if isinstance(record, dict):
        messages = record.get("messages")
        if messages:
            return str(messages[-1].get("content", ""))[:80]
        return str(record.get("prompt", ""))[:80]
    return str(record)[:80]


class HostReward:
    """A reward function of reply text, checked: one finite-or-not float per reply."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def _call(self, records, texts, ended):
        return self.fn(prompts=list(records), completions=list(texts), ended=list(ended))

    def __call__(self, records: Sequence, texts: Sequence[str], ended: Sequence[bool]):
        try:
            out = self._call(records, texts, ended)
        except Exception as e:  # noqa: BLE001 - say which prompt makes it fail
            raise self._failure(records, texts, ended, e) from e
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError) as e:
            raise RewardError(
                f"reward function {self.name} returned {type(out).__name__} {out!r:.80}, "
                f"not one number per reply ({e})"
            ) from None
        if len(values) != len(texts):
            raise RewardError(
                f"reward function {self.name} returned {len(values)} values for "
                f"{len(texts)} replies (prompt 0: {_prompt_text(records[0])!r})"
            )
        return np.asarray(values, np.float32)

    def _failure(self, records, texts, ended, error) -> RewardError:
        for i in range(len(texts)):
            try:
                self._call(records[i : i + 1], texts[i : i + 1], ended[i : i + 1])
            except Exception as e:  # noqa: BLE001
                return RewardError(
                    f"reward function {self.name} failed on prompt {i} "
                    f"({_prompt_text(records[i])!r}, reply {texts[i]!r:.60}): "
                    f"{type(e).__name__}: {e}"
                )
        return RewardError(f"reward function {self.name} failed on the batch: {error}")
