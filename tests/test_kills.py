"""Kills and signals (issue 10): SIGKILL after a step or during an async save loses only
the steps since the last finished checkpoint, and the resumed run is bitwise the
uninterrupted one; corrupt checkpoints in a real run are moved aside; SIGTERM saves and a
rerun resumes exactly. Processes that are killed run as subprocesses through the CLI; the
rest run the stages in-process on one device (the layout the subprocesses use)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from experiments import pipeline
from experiments.loop import StageStopped, run_trainer
from experiments.stages import rm, sft
from tests.fault_helpers import (
    PRETRAIN_STEPS,
    RM_STEPS,
    ROOT,
    SFT_STEPS,
    assert_same,
    complete_steps,
    flip_byte,
    fresh_copy,
    losses,
    main_cmd,
    record,
    run_cli,
    saved_items,
    truncate,
)
from tests.helpers import config_from_flags, subprocess_env


def _wait_for_loss(proc, metrics, step, timeout=300):
    """Until the training metrics of `step` are in the file (a row may be half written)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("step") == step and "loss" in row:
                    return True
        time.sleep(0.02)
    return False


# The CLI, with a slow step after the metrics of step KILL_AFTER are written: the test kills
# it during that step, as a kill would land during a real (long) training step.
_SLOW_STEP_AFTER = """
import os, sys, time
from gptjax import metrics

real_write = metrics.MetricsWriter.write

def write(self, step, values, prefix=""):
    real_write(self, step, values, prefix)
    if step == int(os.environ["KILL_AFTER"]) and not prefix:
        time.sleep(600)  # killed meanwhile

metrics.MetricsWriter.write = write
sys.argv = ["experiments.main", *sys.argv[1:]]
from experiments import main
main.run()
"""


@pytest.mark.slow
# 4: at a checkpoint step, before its save; 6: the save of 4 finished two steps earlier
# (the manifest used to wait for the next save, and 2 was used); 7: after the save of 6.
@pytest.mark.parametrize("kill_after", [4, 6, 7])
def test_sigkill_after_a_step_loses_only_steps_since_the_last_checkpoint(
    tiny_run, tmp_path, kill_after
):
    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=())
    flags = [f"--workdir={workdir}", "--stages=pretrain", *tiny_run["flags"]]
    every = 2  # --config.pretrain.checkpoint_every
    # Metrics of a step are written before its own save starts: the newest checkpoint
    # started by then is the last multiple of `every` before it.
    expected = (kill_after - 1) // every * every
    env = {**subprocess_env(), "KILL_AFTER": str(kill_after)}
    cmd = [sys.executable, "-c", _SLOW_STEP_AFTER, *flags]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)
    metrics = workdir / "pretrain" / "metrics.jsonl"
    ckpts = workdir / "pretrain" / "checkpoints"
    assert _wait_for_loss(proc, metrics, kill_after), proc.communicate()[1][-2000:]
    # A short wait, for the async save of `expected` to finish while "training" goes on;
    # nothing else runs in the process meanwhile (no next save, no poll between steps).
    deadline = time.time() + 60
    time.sleep(0.5)
    while expected not in complete_steps(ckpts) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(workdir, "pretrain"))
    assert killed_at == kill_after
    last_good = max(complete_steps(ckpts), default=0)
    assert last_good == expected, (
        f"killed after step {killed_at}: the save of {expected} finished, but it has no manifest"
    )
    assert killed_at - last_good <= every

    out = run_cli(main_cmd(workdir, "pretrain", *tiny_run["flags"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {last_good}" in out.stdout, out.stdout
    want, got = losses(tiny_run["workdir"], "pretrain"), losses(workdir, "pretrain")
    assert sorted(got) == list(range(1, PRETRAIN_STEPS + 1))
    assert got == want, f"killed after step {killed_at}"  # bitwise, every step
    ckpts = "pretrain/checkpoints"
    assert_same(
        saved_items(workdir / ckpts, PRETRAIN_STEPS),
        saved_items(tiny_run["workdir"] / ckpts, PRETRAIN_STEPS),
    )
    record(
        f"SIGKILL after step {killed_at}",
        "pretrain",
        f"resumed from {last_good} (last finished save), losses bitwise",
        killed_at - last_good,
    )


_KILL_IN_SAVE = """
import os, signal, sys
from gptjax import checkpoint as ckpt_lib

real_save = ckpt_lib.Checkpointer.save

def save(self, step, items, meta):
    real_save(self, step, items, meta)  # returns with the async write still running
    if step == int(os.environ["KILL_AT_SAVE"]):
        os.kill(os.getpid(), signal.SIGKILL)

ckpt_lib.Checkpointer.save = save
sys.argv = ["experiments.main", *sys.argv[1:]]
from experiments import main
main.run()
"""


@pytest.mark.slow
def test_sigkill_during_an_async_save_resumes_from_the_previous_checkpoint(tiny_run, tmp_path):
    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=())
    flags = [f"--workdir={workdir}", "--stages=pretrain", *tiny_run["flags"]]
    env = {**subprocess_env(), "KILL_AT_SAVE": "4"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_IN_SAVE, *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    killed_at = max(losses(workdir, "pretrain"))
    assert complete_steps(workdir / "pretrain" / "checkpoints") == [2]

    out = run_cli(main_cmd(workdir, "pretrain", *tiny_run["flags"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from step 2" in out.stdout
    corrupt = workdir / "pretrain" / "checkpoints" / "corrupt"
    moved = os.listdir(corrupt) if corrupt.exists() else []
    # The kill lands before or after orbax's rename: an unfinished step is either a
    # temporary directory orbax ignores, or a step without a manifest, moved aside.
    assert moved in ([], ["4-incomplete"]), moved
    assert losses(workdir, "pretrain") == losses(tiny_run["workdir"], "pretrain")
    ckpts = "pretrain/checkpoints"
    assert_same(
        saved_items(workdir / ckpts, PRETRAIN_STEPS),
        saved_items(tiny_run["workdir"] / ckpts, PRETRAIN_STEPS),
    )
    record(
        "SIGKILL during the async save of step 4",
        "pretrain",
        "resumed from 2, losses bitwise",
        killed_at - 2,
    )


@pytest.mark.slow
def test_truncated_and_bit_flipped_checkpoints_in_a_real_run(tiny_run, tmp_path):
    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=("pretrain",))
    ckpts = workdir / "pretrain" / "checkpoints"
    assert complete_steps(ckpts) == [4, 6, 8]
    truncate(ckpts / "8")
    flip_byte(ckpts / "6")
    out = run_cli(main_cmd(workdir, "pretrain", *tiny_run["flags"]))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint 8 is unusable (truncated:" in out.stderr
    assert "checkpoint 6 is unusable (checksum:" in out.stderr
    assert "resumed from step 4" in out.stdout
    assert sorted(os.listdir(ckpts / "corrupt")) == ["6-checksum", "8-truncated"]
    assert losses(workdir, "pretrain") == losses(tiny_run["workdir"], "pretrain")
    assert_same(
        saved_items(ckpts, PRETRAIN_STEPS),
        saved_items(tiny_run["workdir"] / "pretrain" / "checkpoints", PRETRAIN_STEPS),
    )
    record("truncated checkpoint 8", "pretrain", "detected, moved aside", 2)
    record("bit-flipped checkpoint 6", "pretrain", "detected, moved aside, 4 used", 2)


class SigtermAt:
    """Wraps a stage's batch iterator: SIGTERM to this process when batch `n` is drawn."""

    def __init__(self, inner, n):
        self.inner, self.n, self.drawn = inner, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _sigterm_then_resume(run_stage_fn, build, stage, stage_dir, steps, at):
    parts = build()
    parts["batches"] = SigtermAt(parts["batches"], at)
    with pytest.raises(StageStopped, match=f"received SIGTERM at step {at}") as stopped:
        run_stage_fn(parts)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    result = run_stage_fn(build())
    assert result.resumed_from == at and result.steps_run == steps - at
    record("SIGTERM", stage, f"saved step {at}, resumed, params bitwise", 0)
    return result


@pytest.mark.slow
def test_sigterm_mid_sft_and_rm_then_resume_equals_the_uninterrupted_run(tiny_run, tmp_path):
    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=("pretrain",))
    config = config_from_flags(tiny_run["flags"])
    # In-process stages on one device, as the CLI subprocesses run.
    sft_ctx = pipeline.context(config, str(workdir), "sft", jax.devices()[:1])
    rm_ctx = pipeline.context(config, str(workdir), "rm", jax.devices()[:1])

    def run_sft(parts):
        return run_trainer(sft_ctx, parts)[0]

    _sigterm_then_resume(run_sft, lambda: sft.build(sft_ctx), "sft", None, SFT_STEPS, 2)
    want = tiny_run["workdir"] / "sft" / "checkpoints"
    assert_same(
        saved_items(workdir / "sft" / "checkpoints", SFT_STEPS), saved_items(want, SFT_STEPS)
    )
    assert losses(workdir, "sft") == losses(tiny_run["workdir"], "sft")

    def run_rm(parts):
        train_dir = os.path.join(workdir, "rm", "train")
        return run_trainer(rm_ctx, parts, stage_dir=train_dir, eval_fn=lambda params: {})[0]

    _sigterm_then_resume(run_rm, lambda: rm.build(rm_ctx), "rm", None, RM_STEPS, 3)
    names = ("params", "opt_state")
    got = saved_items(workdir / "rm" / "train" / "checkpoints", RM_STEPS, names)
    want = saved_items(tiny_run["workdir"] / "rm" / "train" / "checkpoints", RM_STEPS, names)
    assert_same(got, want)
    assert losses(workdir, "rm/train") == losses(tiny_run["workdir"], "rm/train")
