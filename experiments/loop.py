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
import json
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

from experiments.rundir import resolved_config_json
from gptjax import checkpoint as ckpt_lib
from gptjax.config import need
from gptjax.errors import CheckpointError
from gptjax.metrics import MetricsWriter, to_python

NONFINITE_POLICIES = ("skip", "stop")
# Config fields (dotted prefixes of the saved config) a resume must not change: they
# decide the tokens and the order the data iterator's saved position refers to. "STAGE"
# is the stage's own section. Steps, learning rate and checkpoint/eval cadence may change.
RESUME_KEYS = (
    "world.",
    "seeds.",
    "tokenizer.vocab_size",
    "tokenizer.model_type",
    "tokenizer.pad_vocab_to",
    "data.pretrain",
    "data.demos",
    "data.comparisons",
    "STAGE.batch_size",
    "STAGE.seq_len",
    "STAGE.packed",
    "STAGE.k_max",
    "STAGE.prompts",
    "STAGE.max_prompt_len",
    "STAGE.ptx_batch_size",
    "STAGE.ptx_fraction",
    "STAGE.ptx_seq_len",
)


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


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_conflict(saved: dict, current: dict) -> str | None:
    """Why a checkpoint with meta `saved` must not be resumed under meta `current` (another
    tokenizer, or a RESUME_KEYS config field changed), or None."""
    a, b = saved.get("tokenizer_hash"), current.get("tokenizer_hash")
    if a and b and a != b:
        return f"it was trained with tokenizer {a[:12]}, this run has {b[:12]}"
    if "config" not in saved or "config" not in current:
        return None
    stage = current.get("stage", "")
    keys = tuple(k.replace("STAGE.", f"{stage}.") for k in RESUME_KEYS)
    old, new = _flat(json.loads(saved["config"])), _flat(json.loads(current["config"]))
    for key in sorted(set(old) | set(new)):
        if key.startswith(keys) and old.get(key) != new.get(key):
            return f"config.{key} was {old.get(key)!r}, now {new.get(key)!r}"
    return None


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
    item_names = tuple(_items(abstract))
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), item_names, keep=loop.keep_checkpoints
    )
    abstract_items = ckpt_lib.abstract_tree(_items(abstract), _items(state_shardings))

    def check_meta(saved_meta, where):
        conflict = resume_conflict(saved_meta, meta or {})
        if conflict:
            raise CheckpointError(
                f"{name}: refusing to resume from {where}: {conflict}; use a new --workdir "
                f"or restore the old setting"
            )

    try:
        restored = ckpt.restore_latest_good(abstract_items, check_meta)
    except BaseException:
        ckpt.close()
        raise
    for bad in ckpt.rejected:
        print(
            f"{name}: checkpoint {bad.step} is unusable ({bad.reason}); moved to {bad.moved_to}",
            file=sys.stderr,
        )
    if restored is None:
        resumed_from = None
        state = init_state()
    else:
        resumed_from, items, saved_meta = restored
        if ckpt.rejected:
            print(f"{name}: resuming from checkpoint {resumed_from}", file=sys.stderr)
        state = {
            **items,
            "step": jax.device_put(
                jax.numpy.asarray(resumed_from, jax.numpy.int32), state_shardings["step"]
            ),
        }
        batches.set_state(saved_meta["data"])
        if extra_state is not None:
            extra_state.set_state(saved_meta["extra"])
        logging.info("%s: resumed from step %d", name, resumed_from)
    start = int(state["step"])

    def save(step: int):
        if not bool(_all_finite(_items(state))):
            raise StageStopped(
                f"{name}: the state at step {step} has non-finite values; not checkpointed "
                f"(last good checkpoint: {ckpt.latest_step()})"
            )
        data = {
            "data": batches.get_state(),
            "rng": ckpt_lib.key_to_json(rng),
            "extra": extra_state.get_state() if extra_state is not None else None,
            **(meta or {}),
        }
        ckpt.save(step, _items(state), data)

    writer = MetricsWriter(stage_dir, enabled=jax.process_index() == 0)
    bar = tqdm(
        total=loop.steps,
        initial=start,
        desc=name,
        disable=not loop.progress,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.5,
    )
    last, eval_metrics, nonfinite, evaluated_at = {}, {}, 0, None
    t_start = t_last = time.perf_counter()
    pending = None

    def consume(step: int, device_metrics):
        nonlocal last, nonfinite, t_last
        last = to_python(device_metrics)
        if last.get("nonfinite", 0.0) > 0:
            nonfinite += 1
            writer.write(step, {"nonfinite_step": 1.0})
            if loop.nonfinite == "stop":
                writer.write(step, last)
                raise StageStopped(
                    f"{name}: non-finite loss or gradient at step {step}; stopped, the last "
                    f"good checkpoint is {ckpt.latest_step()} (policy nonfinite=stop)"
                )
        for key in loop.stop_on:
            if last.get(key, 0.0) > 0:
                writer.write(step, last)
                raise StageStopped(
                    f"{name}: {key} at step {step} (update discarded); stopped, the last "
                    f"good checkpoint is {ckpt.latest_step()}"
                )
        now = time.perf_counter()
        if loop.tokens_per_step:
            last["tokens_per_s"] = loop.tokens_per_step / max(now - t_last, 1e-9)
        t_last = now
        if step % loop.log_every == 0 or step == loop.steps:
            writer.write(step, last)
        postfix = {"loss": f"{last.get('loss', float('nan')):.3f}"}
        if "tokens_per_s" in last:
            postfix["tok/s"] = f"{last['tokens_per_s']:.0f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)

    try:
        with _Signals() as signals:
            for step in range(start + 1, loop.steps + 1):
                state, metrics = train_step(state, next(batches), rng)
                ckpt.poll()  # raises a failed async save early (manifests need no poll)
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
                received = signals.at(step)
                if received is not None:
                    consume(*pending)
                    pending = None
                    save(step)
                    ckpt.wait()
                    signame = signal.Signals(received).name
                    raise StageStopped(
                        f"{name}: received {signame} at step {step}; saved "
                        f"checkpoint {step}, rerun the same command to resume",
                        exit_code=128 + received,
                    )
                if step % loop.checkpoint_every == 0 and step != loop.steps:
                    consume(*pending)
                    pending = None
                    save(step)
                if eval_fn is not None and loop.eval_every and step % loop.eval_every == 0:
                    eval_metrics = eval_fn(state["params"])
                    writer.write(step, eval_metrics, prefix="eval/")
                    evaluated_at = step
            if pending is not None:
                consume(*pending)
            if start < loop.steps or resumed_from is None:
                save(loop.steps)
            if eval_fn is not None and evaluated_at != loop.steps:  # not twice for the last step
                eval_metrics = eval_fn(state["params"])
                writer.write(loop.steps, eval_metrics, prefix="eval/")
    finally:
        bar.close()
        ckpt.close()
        writer.close()
    return StageResult(
        state,
        last,
        eval_metrics,
        resumed_from,
        time.perf_counter() - t_start,
        loop.steps - start,
        nonfinite,
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
