"""The one stage loop every trained stage (pretrain, SFT, RM, PPO) runs on.

restore-or-init -> for each step: batch, jitted step, metrics, periodic eval, periodic
checkpoint -> final eval and checkpoint. Also: SIGTERM/SIGINT save the current step and
stop with a one-line reason (orbax's own preemption check is always false without
jax.distributed, so single-host runs need this handler), and the non-finite policy.

Resuming uses the newest checkpoint that passes its manifest and shape checks; broken
newer ones are moved aside and reported (gptjax/checkpoint.py). A resume that would
change the tokenizer or what the data stream is (RESUME_KEYS) is refused. A state with
a non-finite value is never saved, so it cannot push good checkpoints out of the
keep-last-K window.

Metrics of step n are read while step n+1 runs (nanodo): the host never waits on the
device just to log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments.resume import resume_conflict
from experiments.rundir import resolved_config_json
from gptjax import checkpoint as ckpt_lib
from gptjax.config import need
from gptjax.errors import CheckpointError
from gptjax.metrics import MetricsWriter, to_python

NONFINITE_POLICIES = ("skip", "stop")


class StageStopped(RuntimeError):
    """The stage stopped early (signal, non-finite loss); `str(e)` is the one-line reason."""

    def __init__(self, reason: str, exit_code: int = 1):
        super().__init__(reason)
        self.exit_code = exit_code


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's settings. The fields in LOOP_FIELDS are the same in every trained stage's
    config section (configs/pipeline.py takes their defaults from here)."""

    steps: int  # what the stage counts (PPO: iterations)
    checkpoint_every: int = 100  # steps between checkpoints; the last step is always saved
    keep_checkpoints: int = 3  # the newest ones kept
    eval_every: int = 0  # steps between evaluations; 0: only at the end
    log_every: int = 10  # steps between metrics.jsonl rows
    # A non-finite loss or gradient: "skip" leaves params and optimizer state unchanged
    # (counted in metrics) and goes on, "stop" ends the stage with the last good state.
    nonfinite: str = "skip"
    tokens_per_step: int = 0  # for tokens/s on the progress bar
    progress: bool = True
    # Metrics that, when > 0 in a step, stop the stage (the step's update was already
    # discarded inside the jit), e.g. PPO's "kl_blowup" under kl_guard=stop.
    stop_on: tuple[str, ...] = ()

    def __post_init__(self):
        need(
            self.nonfinite in NONFINITE_POLICIES,
            "nonfinite",
            f"{self.nonfinite!r} not in {'|'.join(NONFINITE_POLICIES)}",
        )
        need(
            self.checkpoint_every >= 1,
            "checkpoint_every",
            f"must be >= 1, got {self.checkpoint_every}",
        )


LOOP_FIELDS = ("checkpoint_every", "keep_checkpoints", "eval_every", "log_every", "nonfinite")


@dataclasses.dataclass
class StageResult:
    state: Any
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    resumed_from: int | None
    wall_s: float
    steps_run: int
    nonfinite_steps: int = 0


class _Signals:
    """Turns SIGTERM/SIGINT into a flag checked between steps (one process).

    With several processes, a checkpoint save is collective, so every process must stop
    at the same step: JAX's preemption service (on by default with jax.distributed)
    catches SIGTERM on any host, tells the others, and `reached_preemption_sync_point`
    names the step where all of them save. A Python handler would replace its own, so
    none is installed then (SIGINT keeps its default).
    """

    def __init__(self):
        self.received: int | None = None
        self._old = {}
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        if self._multihost:
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def at(self, step: int) -> int | None:
        """The signal to stop on after `step`, if any."""
        if self._multihost:
            from jax.experimental import multihost_utils

            return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
        return self.received

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _items(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "step"}


@jax.jit
def _all_finite(tree) -> jax.Array:
    """One flag for the whole state (integer leaves are trivially finite)."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class _Progress:
    """What happens to a step's metrics once they are on the host: the non-finite and
    stop_on policies, metrics.jsonl and TensorBoard rows, tokens/s and the progress bar.
    The loop hands over step n's metrics while step n+1 runs (nanodo)."""

    def __init__(self, name: str, stage_dir: str, loop: LoopConfig, start: int, ckpt):
        self.name, self.loop, self.ckpt = name, loop, ckpt
        self.writer = MetricsWriter(stage_dir, enabled=jax.process_index() == 0)
        self.bar = tqdm(
            total=loop.steps,
            initial=start,
            desc=name,
            disable=not loop.progress,
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=0.5,
        )
        self.last, self.nonfinite = {}, 0
        self.t_start = self.t_last = time.perf_counter()

    def _stop(self, step: int, what: str, detail: str = "", policy: str = ""):
        self.writer.write(step, self.last)
        raise StageStopped(
            f"{self.name}: {what} at step {step}{detail}; stopped, the last good checkpoint "
            f"is {self.ckpt.latest_step()}{policy}"
        )

    def consume(self, step: int, device_metrics) -> None:
        loop, last = self.loop, to_python(device_metrics)
        self.last = last
        if last.get("nonfinite", 0.0) > 0:
            self.nonfinite += 1
            self.writer.write(step, {"nonfinite_step": 1.0})
            if loop.nonfinite == "stop":
                self._stop(step, "non-finite loss or gradient", policy=" (policy nonfinite=stop)")
        for key in loop.stop_on:
            if last.get(key, 0.0) > 0:
                self._stop(step, key, " (update discarded)")
        now = time.perf_counter()
        if loop.tokens_per_step:
            last["tokens_per_s"] = loop.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last = now
        if step % loop.log_every == 0 or step == loop.steps:
            self.writer.write(step, last)
        postfix = {"loss": f"{last.get('loss', float('nan')):.3f}"}
        if "tokens_per_s" in last:
            postfix["tok/s"] = f"{last['tokens_per_s']:.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.writer.close()


def _restore_or_init(name, ckpt, abstract_items, meta, init_state, state_shardings, batches,
                     extra_state):  # fmt: skip
    """(state, resumed_from): the newest good checkpoint's state, with the batch iterator
    and extra state at their saved positions, or a fresh state (resumed_from None)."""

    def check_meta(saved_meta, where):
        conflict = resume_conflict(saved_meta, meta or {})
        if conflict:
            raise CheckpointError(
                f"{name}: refusing to resume from {where}: {conflict}; use a new --workdir "
                f"or restore the old setting"
            )

    restored = ckpt.restore_latest_good(abstract_items, check_meta)
    for bad in ckpt.rejected:
        print(
            f"{name}: checkpoint {bad.step} is unusable ({bad.reason}); moved to {bad.moved_to}",
            file=sys.stderr,
        )
    if restored is None:
        return init_state(), None
    resumed_from, items, saved_meta = restored
    if ckpt.rejected:
        print(f"{name}: resuming from checkpoint {resumed_from}", file=sys.stderr)
    step = jax.device_put(jnp.asarray(resumed_from, jnp.int32), state_shardings["step"])
    batches.set_state(saved_meta["data"])
    if extra_state is not None:
        extra_state.set_state(saved_meta["extra"])
    logging.info("%s: resumed from step %d", name, resumed_from)
    return {**items, "step": step}, resumed_from


def _save(name: str, ckpt, step: int, state: dict, meta: dict) -> None:
    """Checkpoints the state, unless a value of it is not finite: then it stops the stage
    rather than push good checkpoints out of the keep-last-K window."""
    if not bool(_all_finite(_items(state))):
        raise StageStopped(
            f"{name}: the state at step {step} has non-finite values; not checkpointed "
            f"(last good checkpoint: {ckpt.latest_step()})"
        )
    ckpt.save(step, _items(state), meta)


def _stopped_by(name: str, received: int, step: int) -> StageStopped:
    return StageStopped(
        f"{name}: received {signal.Signals(received).name} at step {step}; "
        f"saved checkpoint {step}, rerun the same command to resume",
        exit_code=128 + received,
    )


def run_stage(
    name: str,
    stage_dir: str,
    loop: LoopConfig,
    *,
    init_state: Callable[[], dict],
    state_shardings: dict,
    train_step: Callable,
    batches: Iterator,
    rng: jax.Array,
    eval_fn: Callable[[Any], dict[str, float]] | None = None,
    meta: dict[str, Any] | None = None,
    extra_state: Any = None,
) -> StageResult:
    """Runs (or resumes) one stage to `loop.steps` steps.

    init_state: builds the fresh (sharded) train state; only called if no checkpoint exists.
    state: a dict with "step" plus named pytrees, each saved as an orbax item.
    batches: yields host batches; get_state()/set_state() give its JSON position.
    meta: JSON saved with every checkpoint (resolved config, tokenizer hash, ...).
    extra_state: optional object with get_state()/set_state() (e.g. the KL controller).
    """
    os.makedirs(stage_dir, exist_ok=True)
    abstract = jax.eval_shape(init_state)
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), tuple(_items(abstract)), keep=loop.keep_checkpoints
    )
    abstract_items = ckpt_lib.abstract_tree(_items(abstract), _items(state_shardings))
    try:
        state, resumed_from = _restore_or_init(
            name, ckpt, abstract_items, meta, init_state, state_shardings, batches, extra_state
        )
        # The params the state was built from need not stay alive beside it.
        getattr(init_state, "release", lambda: None)()
    except BaseException:
        ckpt.close()
        raise
    start = int(state["step"])

    def save(step: int):
        positions = {"data": batches.get_state(), "rng": ckpt_lib.key_to_json(rng)}
        positions["extra"] = extra_state.get_state() if extra_state is not None else None
        _save(name, ckpt, step, state, {**positions, **(meta or {})})

    progress = _Progress(name, stage_dir, loop, start, ckpt)
    eval_metrics, evaluated_at, pending = {}, None, None
    try:
        with _Signals() as signals:
            for step in range(start + 1, loop.steps + 1):
                state, metrics = train_step(state, next(batches), rng)
                ckpt.poll()  # raises a failed async save early (manifests need no poll)
                if pending is not None:
                    progress.consume(*pending)
                pending = (step, metrics)
                received = signals.at(step)
                if received is not None:
                    progress.consume(*pending)
                    save(step)
                    ckpt.wait()
                    raise _stopped_by(name, received, step)
                if step % loop.checkpoint_every == 0 and step != loop.steps:
                    progress.consume(*pending)
                    pending = None
                    save(step)
                if eval_fn is not None and loop.eval_every and step % loop.eval_every == 0:
                    eval_metrics = eval_fn(state["params"])
                    progress.writer.write(step, eval_metrics, prefix="eval/")
                    evaluated_at = step
            if pending is not None:
                progress.consume(*pending)
            if start < loop.steps or resumed_from is None:
                save(loop.steps)
            if eval_fn is not None and evaluated_at != loop.steps:  # not twice for the last step
                eval_metrics = eval_fn(state["params"])
                progress.writer.write(loop.steps, eval_metrics, prefix="eval/")
    finally:
        progress.close()
        ckpt.close()
    return StageResult(
        state,
        progress.last,
        eval_metrics,
        resumed_from,
        time.perf_counter() - progress.t_start,
        loop.steps - start,
        progress.nonfinite,
    )


def stage_meta(config, tokenizer, stage: str) -> dict:
    """What every checkpoint of a stage records: the resolved config (for resume checks and
    provenance), the tokenizer's hash and the stage's name."""
    return {
        "config": resolved_config_json(config),
        "tokenizer_hash": tokenizer.hash,
        "stage": stage,
    }


def run_trainer(ctx, parts: dict, stage_dir: str | None = None, eval_fn=None):
    """Runs an LMTrainer stage (pretrain, SFT, RM) on the loop; returns (result, summary).

    parts: "trainer", "tokenizer", "loop", "batches" and (unless eval_fn is given, default
    the held-out LM loss) "eval_batches". stage_dir: default the stage's directory."""
    trainer, tokenizer = parts["trainer"], parts["tokenizer"]
    result = run_stage(
        ctx.name,
        stage_dir or ctx.dir,
        parts["loop"],
        init_state=trainer.init_state,
        state_shardings=trainer.shardings,
        train_step=trainer.step_fn(),
        batches=parts["batches"],
        rng=jax.random.key(ctx.config.seeds.init),
        eval_fn=eval_fn or trainer.eval_fn(parts["eval_batches"]),
        meta=stage_meta(ctx.config, tokenizer, ctx.name),
    )
    summary = {
        "stage": ctx.name,
        "heldout_loss": result.eval_metrics.get("loss"),
        "heldout_accuracy": result.eval_metrics.get("accuracy"),
        "train_loss": result.last_metrics.get("loss"),
        "wall_s": result.wall_s,
        "steps_run": result.steps_run,
        "resumed_from": result.resumed_from,
    }
    return result, summary
