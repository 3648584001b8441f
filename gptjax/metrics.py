"""Metrics to disk: one JSON line per logged step, and TensorBoard event files.

The library never prints; the stage loop in experiments/ decides what reaches the terminal.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from gptjax.tb_events import EventWriter


def to_python(metrics: dict[str, Any]) -> dict[str, float]:
    """Device scalars -> floats (one host transfer for the whole dict)."""
    import jax

    host = jax.device_get(metrics)
    return {k: float(np.asarray(v)) for k, v in host.items()}


class MetricsWriter:
    """Appends to `<dir>/metrics.jsonl` and writes TensorBoard events under `<dir>/tb`.

    enabled=False writes nothing: in a multi-host run every process computes the same
    global metrics, and only process 0 writes them to the shared workdir.
    """

    def __init__(self, directory: str, tensorboard: bool = True, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "metrics.jsonl")
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            self._tb = EventWriter(os.path.join(directory, "tb"))

    def write(self, step: int, metrics: dict[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}{k}": v for k, v in metrics.items()}}
        # JSON has no NaN/Inf: write them as strings so a non-finite loss stays visible.
        clean = {
            k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
            for k, v in row.items()
        }
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            self._tb.scalars(int(step), {f"{prefix}{k}": v for k, v in metrics.items()})

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
