"""Batches whose rows come from several iterators at once (SFT with pretraining rows).

Fine-tuning a small model on a few thousand demonstrations makes it forget what
pretraining taught (its held-out pretraining loss rises); mixing pretraining rows into
every SFT batch keeps them, the SFT counterpart of InstructGPT's PPO-ptx (Ouyang et al.
2022, eq. 2). Rows are concatenated along the batch axis, so each source keeps its own
loss mask (replies only for demonstrations, every token for pretraining text).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class ConcatBatches:
    """Yields the row-wise concatenation of one batch from each named iterator.

    Its position is every source's position (get_state/set_state), so a resumed run
    continues each source exactly where it stopped.
    """

    def __init__(self, sources: Mapping[str, object]):
        if not sources:
            raise ValueError("ConcatBatches needs at least one source")
        self.sources = dict(sources)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.sources.values()]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def get_state(self) -> dict:
        return {name: it.get_state() for name, it in self.sources.items()}

    def set_state(self, state: Mapping) -> None:
        missing = set(self.sources) - set(state)
        if missing:
            raise ValueError(f"saved data position lacks sources {sorted(missing)}")
        for name, it in self.sources.items():
            it.set_state(state[name])
