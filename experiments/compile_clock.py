"""Seconds JAX spends turning functions into executables, per stage: tracing to a jaxpr,
lowering to StableHLO, and the XLA compile (or the load from the persistent compilation
cache, on a warm cache), from jax.monitoring's duration events; and how many programs.
A stage's compile seconds are part of its wall time (experiments/pipeline.py run_stage
records both; the run report shows them side by side)."""

from __future__ import annotations

import threading

from jax import monitoring

# jax._src.dispatch's event names (stable since JAX 0.4).
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",
}
_totals = {"trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0, "programs": 0}
_lock = threading.Lock()
_installed = False


def _listen(event: str, seconds: float, **_) -> None:
    name = EVENTS.get(event)
    if name is None:
        return
    with _lock:
        _totals[name] += seconds
        _totals["programs"] += name == "compile_s"


def snapshot() -> dict:
    """The running totals (installs the listener on first use)."""
    global _installed
    with _lock:
        if not _installed:
            monitoring.register_event_duration_secs_listener(_listen)
            _installed = True
        return dict(_totals)


def since(start: dict) -> dict:
    """What was spent since `start` (a snapshot): seconds per phase, their sum and the
    number of executables compiled or loaded."""
    now = snapshot()
    out = {k: now[k] - start[k] for k in now}
    out["total_s"] = out["trace_s"] + out["lower_s"] + out["compile_s"]
    return out
