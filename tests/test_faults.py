"""Faults and bad input (issue 10): preemption, kills, corrupt checkpoints, NaNs, bad
configs, bad data, another tokenizer.

One tiny pretrain -> SFT -> RM run is built once per session (`tiny_run`, a real
subprocess through the CLI) and copied for each test that needs checkpoints. Tests that
kill a process run it as a subprocess; the rest run the stages in-process on one device
(the layout the subprocesses use), so they compare bitwise with the session's run.
Each fault a test survives or input it rejects is recorded (`record`); with
GPTJAX_FAULT_TABLE=path set, the rows are written there as JSON lines.
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import pipeline
from experiments import common
from experiments import stages as stages_lib
from experiments.loop import LoopConfig, StageStopped, run_stage
from gptjax import checkpoint as ckpt_lib
from gptjax import ppo, sharding
from gptjax.errors import CheckpointError, ConfigError
from gptjax.metrics import read_jsonl
from gptjax.optim import OptimConfig
from gptjax.sharding import MeshConfig
from tests.helpers import (
    SFT_CLI,
    TINY_CLI,
    config_from_flags,
    subprocess_env,
    write_demos,
    write_text_corpus,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_STEPS, SFT_STEPS, RM_STEPS = 8, 4, 4
RM_CLI = [
    f"--config.rm.steps={RM_STEPS}",
    "--config.rm.batch_size=4",
    "--config.rm.seq_len=32",
    "--config.rm.eval_batches=1",
    "--config.rm.log_every=1",
    "--config.rm.checkpoint_every=2",
    "--config.rm.optim.warmup_steps=1",
    "--config.rm.demo_samples=16",
]
RUN_CLI = [
    *TINY_CLI,
    *SFT_CLI,
    *RM_CLI,
    f"--config.pretrain.steps={PRETRAIN_STEPS}",
    "--config.pretrain.checkpoint_every=2",
    f"--config.sft.steps={SFT_STEPS}",
    "--config.sft.checkpoint_every=2",
]
_ROWS = []


def record(fault: str, stage: str, outcome: str, steps_lost="-"):
    _ROWS.append(dict(fault=fault, stage=stage, outcome=outcome, steps_lost=steps_lost))


@pytest.fixture(scope="session", autouse=True)
def _fault_table():
    yield
    path = os.environ.get("GPTJAX_FAULT_TABLE")
    if path and _ROWS:
        with open(path, "a") as f:
            for row in _ROWS:
                f.write(json.dumps(row) + "\n")


def write_comparisons(path, n: int = 40, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = (int(x) for x in rng.integers(0, 10, size=2))
            record_ = {"prompt": f"what is {a} plus {b}?", "chosen": f"{a + b}", "rejected": "no"}
            f.write(json.dumps(record_) + "\n")
    return str(path)


def data_flags(files) -> list[str]:
    return [
        f"--config.data.pretrain=text:{files['corpus']}",
        f"--config.data.demos=demos:{files['demos']}",
        f"--config.data.comparisons=comparisons:{files['comparisons']}",
    ]


def main_cmd(workdir, stages, *flags):
    return [
        sys.executable,
        "-m",
        "experiments.main",
        f"--workdir={workdir}",
        f"--stages={stages}",
        *flags,
    ]


def run_cli(cmd, timeout=600):
    return subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """pretrain (8 steps, checkpoints every 2), SFT (4) and RM (4) on small user files,
    once per session; tests copy `workdir` rather than train again."""
    tmp = tmp_path_factory.mktemp("faults")
    files = {
        "corpus": write_text_corpus(tmp / "corpus.txt"),
        "demos": write_demos(tmp / "demos.jsonl"),
        "comparisons": write_comparisons(tmp / "comparisons.jsonl"),
    }
    flags = [*data_flags(files), *RUN_CLI]
    out = run_cli(main_cmd(tmp / "run", "pretrain,sft,rm", *flags))
    assert out.returncode == 0, out.stderr[-3000:]
    return {"workdir": tmp / "run", "files": files, "flags": flags, "tmp": tmp}


def fresh_copy(tiny_run, dest, stages=("pretrain", "sft", "rm")):
    """The session's workdir with the given stage dirs (plus tokenizer and data)."""
    src = tiny_run["workdir"]
    for name in ("tokenizer", "data", *stages):
        shutil.copytree(src / name, dest / name, symlinks=True)
    return dest


def losses(workdir, stage) -> dict[int, float]:
    rows = read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows win


def saved_items(directory, step, names=("params",)):
    ckpt = ckpt_lib.Checkpointer(str(directory), names, async_save=False)
    try:
        abstract = {
            n: jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                ckpt_lib.saved_structure(os.path.join(ckpt.step_dir(step), n)),
            )
            for n in names
        }
        return jax.device_get(ckpt.restore(abstract, step)[1])
    finally:
        ckpt.close()


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def snapshot(workdir) -> dict[str, tuple]:
    """(size, sha256, mtime) of every checkpoint, data and tokenizer file."""
    out = {}
    for top in ("pretrain/checkpoints", "sft/checkpoints", "rm", "data", "tokenizer"):
        for root, _, names in os.walk(os.path.join(workdir, top)):
            for name in names:
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[os.path.relpath(path, workdir)] = (
                    os.path.getsize(path),
                    digest,
                    os.stat(path).st_mtime_ns,
                )
    return out


@pytest.fixture
def one_device(monkeypatch):
    """In-process stages on one device, as the CLI subprocesses run."""
    monkeypatch.setattr(
        common, "make_mesh", lambda config: sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    )


# ------------------------------------------------------------------ checkpoint integrity


TREE = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(5, np.float32)}


def _saved_steps(directory, steps=(1, 2, 3)):
    ckpt = ckpt_lib.Checkpointer(str(directory), ("params",), keep=5)
    for s in steps:
        ckpt.save(s, {"params": jax.tree.map(lambda x, s=s: x * s, TREE)}, {"step": s})
    ckpt.close()


def _data_file(step_dir):
    files = [
        os.path.join(root, n)
        for root, _, names in os.walk(os.path.join(step_dir, "params"))
        for n in names
        if os.sep + "d" + os.sep in os.path.join(root, n)
    ]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = _data_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(step_dir):
    path = _data_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def drop_manifest(step_dir):
    os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST))


@pytest.mark.parametrize(
    "corrupt, kind",
    [(truncate, "truncated"), (flip_byte, "checksum"), (drop_manifest, "incomplete")],
)
def test_corrupt_latest_checkpoint_is_moved_aside_and_the_previous_used(tmp_path, corrupt, kind):
    _saved_steps(tmp_path)
    corrupt(tmp_path / "3")
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), ("params",))
    step, items, meta = ckpt.restore_latest_good({"params": ckpt_lib.abstract_tree(TREE)})
    ckpt.close()
    assert (step, meta) == (2, {"step": 2})
    assert_same(items["params"], jax.tree.map(lambda x: x * 2, TREE))
    [bad] = ckpt.rejected
    assert bad.step == 3 and bad.reason.startswith(kind), bad
    assert bad.moved_to == str(tmp_path / "corrupt" / f"3-{kind}")
    assert os.path.isdir(bad.moved_to)  # kept for inspection, never deleted
    assert sorted(os.listdir(tmp_path / "corrupt")) == [f"3-{kind}"]
    record(f"{kind} latest checkpoint", "(checkpointer)", "detected, moved aside, step 2 used", 1)


def test_another_stage_reading_a_corrupt_checkpoint_fails_and_moves_nothing(tmp_path):
    _saved_steps(tmp_path)
    flip_byte(tmp_path / "3")
    with pytest.raises(CheckpointError, match=r"3 is unusable: checksum: .* sha256"):
        ckpt_lib.load_params(str(tmp_path), ckpt_lib.abstract_tree(TREE))
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


@pytest.mark.parametrize(
    "target, message",
    [
        (
            {"w": jax.ShapeDtypeStruct((8, 16), jnp.float32), "b": TREE["b"]},
            r"params\.w: checkpoint has float32\[8, 8\], this config float32\[8, 16\]",
        ),
        (  # orbax would cast silently
            {"w": jax.ShapeDtypeStruct((8, 8), jnp.bfloat16), "b": TREE["b"]},
            r"params\.w: checkpoint has float32\[8, 8\], this config bfloat16\[8, 8\]",
        ),
        (
            {"w": TREE["w"], "b": TREE["b"], "extra": TREE["b"]},
            r"params\.extra is in this config but not in the checkpoint",
        ),
    ],
)
def test_restoring_other_shapes_or_dtypes_names_the_parameter(tmp_path, target, message):
    _saved_steps(tmp_path)
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), ("params",))
    with pytest.raises(CheckpointError, match=message):
        ckpt.restore_latest_good({"params": ckpt_lib.abstract_tree(target)})
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # nothing moved
    with pytest.raises(CheckpointError, match=message):
        ckpt_lib.load_params(str(tmp_path), ckpt_lib.abstract_tree(target))


# ------------------------------------------------------------------ kills and signals


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


def _complete_steps(directory):
    return sorted(
        int(d)
        for d in os.listdir(directory)
        if d.isdigit() and os.path.exists(os.path.join(directory, d, ckpt_lib.MANIFEST))
    )


def test_an_async_save_gets_its_manifest_without_another_call(tmp_path):
    """The manifest is written as soon as orbax finishes the save, in the background: not
    only at the next save, poll() or close() (a kill in between would lose the step)."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), ("params",))
    try:
        ckpt.save(2, {"params": TREE}, {"step": 2})
        deadline = time.time() + 60
        while not _complete_steps(tmp_path) and time.time() < deadline:
            time.sleep(0.02)
        assert _complete_steps(tmp_path) == [2]
        assert ckpt_lib.verify_manifest(ckpt.step_dir(2)) is None
    finally:
        ckpt.close()
    assert _complete_steps(tmp_path) == [2]


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
    while expected not in _complete_steps(ckpts) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(losses(workdir, "pretrain"))
    assert killed_at == kill_after
    last_good = max(_complete_steps(ckpts), default=0)
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
    assert _complete_steps(workdir / "pretrain" / "checkpoints") == [2]

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
    assert _complete_steps(ckpts) == [4, 6, 8]
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
def test_sigterm_mid_sft_and_rm_then_resume_equals_the_uninterrupted_run(
    tiny_run, tmp_path, one_device
):
    from experiments import rm, sft

    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=("pretrain",))
    config = config_from_flags(tiny_run["flags"])

    def run_sft(parts):
        return common.run_lm_stage("sft", config, str(workdir), parts)[0]

    _sigterm_then_resume(
        run_sft, lambda: sft.build(config, str(workdir)), "sft", None, SFT_STEPS, 2
    )
    want = tiny_run["workdir"] / "sft" / "checkpoints"
    assert_same(
        saved_items(workdir / "sft" / "checkpoints", SFT_STEPS), saved_items(want, SFT_STEPS)
    )
    assert losses(workdir, "sft") == losses(tiny_run["workdir"], "sft")

    def run_rm(parts):
        parts = {**parts, "stage_dir": os.path.join(workdir, "rm", "train")}
        parts["eval_fn"] = lambda params: {}
        return common.run_lm_stage("rm", config, str(workdir), parts)[0]

    _sigterm_then_resume(run_rm, lambda: rm.build(config, str(workdir)), "rm", None, RM_STEPS, 3)
    names = ("params", "opt_state")
    got = saved_items(workdir / "rm" / "train" / "checkpoints", RM_STEPS, names)
    want = saved_items(tiny_run["workdir"] / "rm" / "train" / "checkpoints", RM_STEPS, names)
    assert_same(got, want)
    assert losses(workdir, "rm/train") == losses(tiny_run["workdir"], "rm/train")


# ------------------------------------------------------------------ non-finite values


class NanAt:
    """Wraps an LM batch iterator: batch `n` gets a NaN loss mask (a NaN loss and grads)."""

    def __init__(self, inner, n):
        self.inner, self.n, self.drawn = inner, n, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.drawn += 1
        if self.drawn == self.n:
            batch = {**batch, "loss_mask": np.full_like(batch["loss_mask"], np.nan)}
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _all_finite(tree) -> bool:
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_batch_follows_the_policy_and_is_never_checkpointed(
    tiny_run, tmp_path, one_device, policy
):
    from experiments import pretrain

    workdir = fresh_copy(tiny_run, tmp_path / "run", stages=())
    config = config_from_flags([*tiny_run["flags"], f"--config.pretrain.nonfinite={policy}"])
    parts = pretrain.build(config, str(workdir))
    parts["batches"] = NanAt(parts["batches"], 3)
    ckpts = workdir / "pretrain" / "checkpoints"
    if policy == "stop":
        with pytest.raises(StageStopped, match=r"non-finite .* at step 3; stopped, .* is 2"):
            common.run_lm_stage("pretrain", config, str(workdir), parts)
        assert _complete_steps(ckpts) == [2]
        record("NaN batch at step 3 (nonfinite=stop)", "pretrain", "stopped, checkpoint 2 kept", 1)
    else:
        result, _ = common.run_lm_stage("pretrain", config, str(workdir), parts)
        assert result.nonfinite_steps == 1
        rows = read_jsonl(workdir / "pretrain" / "metrics.jsonl")
        assert [r["step"] for r in rows if "nonfinite_step" in r] == [3]
        norm = {r["step"]: r["param_norm"] for r in rows if "param_norm" in r}
        assert norm[3] == norm[2] != norm[4]  # the update of step 3 was skipped, exactly
        assert _complete_steps(ckpts) == [4, 6, 8]
        record(
            "NaN batch at step 3 (nonfinite=skip)", "pretrain", "update skipped, run finished", 0
        )
    for step in _complete_steps(ckpts):
        assert _all_finite(saved_items(ckpts, step, ("params", "opt_state")))


TOY_SHARDINGS = {
    "params": {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])},
    "step": jax.sharding.SingleDeviceSharding(jax.devices()[0]),
}


class NoBatches:
    """A batch iterator for step functions that ignore their batch."""

    def __iter__(self):
        return self

    def __next__(self):
        return None

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def test_a_non_finite_state_is_never_saved(tmp_path):
    def step_fn(state, batch, rng):
        w = jnp.where(state["step"] >= 3, jnp.nan, state["params"]["w"] + 1.0)
        return {"params": {"w": w}, "step": state["step"] + 1}, {"loss": jnp.float32(0.0)}

    init = lambda: {"params": {"w": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)}
    loop = LoopConfig(steps=6, checkpoint_every=2, progress=False)
    with pytest.raises(StageStopped, match=r"step 4 has non-finite values; not checkpointed .*: 2"):
        run_stage(
            "toy",
            str(tmp_path),
            loop,
            init_state=init,
            state_shardings=TOY_SHARDINGS,
            train_step=step_fn,
            batches=NoBatches(),
            rng=jax.random.key(0),
        )
    assert _complete_steps(tmp_path / "checkpoints") == [2]


def _ppo_setup(kl_max=0.0):
    from tests.test_ppo import make_step, one_device, random_rollout

    cfg = ppo.PPOConfig(epochs=1, minibatches=2, kl_max=kl_max)
    state, step = make_step(one_device(), cfg, optax.adam(1e-2))
    return state, step, random_rollout(np.random.default_rng(0), 8)


def _trainable(state):
    return jax.device_get({k: state[k] for k in ("params", "value", "opt_state", "kl")})


def test_ppo_non_finite_log_probs_discard_the_whole_update():
    state, step, batch = _ppo_setup()
    before = _trainable(state)
    batch["ref_logprobs"][2, 0] = np.nan  # a reply token: masked in
    assert batch["response_mask"][2, 0] == 1
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["nonfinite"]) == 1.0 and int(state["step"]) == 1
    assert_same(_trainable(state), before)  # params, value, optimizer and β unchanged
    record("NaN reference log-prob", "ppo", "update discarded (nonfinite policy)", 0)


def test_ppo_kl_blow_up_is_rolled_back_inside_the_step():
    state, step, batch = _ppo_setup(kl_max=5.0)
    before = _trainable(state)
    batch["ref_logprobs"] = batch["ref_logprobs"] - 10.0 * batch["response_mask"]
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["kl_blowup"]) == 1.0 and float(metrics["kl_after"]) > 5.0
    assert float(metrics["nonfinite"]) == 0.0
    assert_same(_trainable(state), before)
    state, step, batch = _ppo_setup(kl_max=1e6)  # the same update under a loose limit
    state, metrics = step(state, batch, jax.random.key(0))
    assert float(metrics["kl_blowup"]) == 0.0
    assert not np.array_equal(jax.device_get(state["params"]["embed"]), before["params"]["embed"])
    record("KL blow-up (kl_max)", "ppo", "update rolled back", 0)


def test_kl_guard_stop_ends_the_stage(tmp_path):
    def step_fn(state, batch, rng):
        blown = (state["step"] == 2).astype(jnp.float32)
        new = {"params": state["params"], "step": state["step"] + 1}
        return new, {"loss": jnp.float32(0.0), "kl_blowup": blown}

    loop = LoopConfig(steps=6, checkpoint_every=2, progress=False, stop_on=("kl_blowup",))
    with pytest.raises(StageStopped, match=r"kl_blowup at step 3 .* last good checkpoint is 2"):
        run_stage(
            "ppo",
            str(tmp_path),
            loop,
            init_state=lambda: {"params": {"w": jnp.zeros(3)}, "step": jnp.zeros((), jnp.int32)},
            state_shardings=TOY_SHARDINGS,
            train_step=step_fn,
            batches=NoBatches(),
            rng=jax.random.key(0),
        )
    record("KL blow-up (kl_guard=stop)", "ppo (loop)", "stopped, checkpoint 2 kept", 1)


# ------------------------------------------------------------------ bad input


def _set(path, value):
    def apply(config, files):
        *parents, last = path.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[last] = value(files) if callable(value) else value

    return apply


def _bad_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "bad_demos.jsonl")
    lines = open(files["demos"]).read().splitlines()
    lines[2] = '{"prompt": "what is 1 plus'  # cut off mid-record
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"demos:{path}"


def _half_bad_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "half_bad_demos.jsonl")
    lines = open(files["demos"]).read().splitlines()[:20]
    lines[::2] = ['{"prompt": "hi"}'] * len(lines[::2])  # no response
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"demos:{path}"


def _empty_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "empty.jsonl")
    open(path, "w").close()
    return f"demos:{path}"


def _other_tokenizer(files):
    from gptjax.data import tokenizer as tok_lib

    path = os.path.join(os.path.dirname(files["demos"]), "other", "spm.model")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        other = os.path.join(os.path.dirname(files["demos"]), "other.txt")
        write_text_corpus(other, seed=1)
        texts = open(other).read().split("\n\n")
        tok_lib.train_tokenizer(texts, path, 320)
    return path


BAD_INPUTS = {
    # name: (stages, config change, the one-line error)
    "unknown field": (
        "pretrain",
        _set("pretrain.optim.bogus", 1),
        r"config\.pretrain\.optim\.bogus: unknown field",
    ),
    "wrong type": (
        "pretrain",
        _set(
            "pretrain.optim",
            lambda f: ml_collections.ConfigDict({**OptimConfig().__dict__, "lr": "fast"}),
        ),
        r"config\.pretrain\.optim\.lr: expected float, got str",
    ),
    "seq_len > max_len": (
        "pretrain",
        _set("pretrain.seq_len", 64),
        r"config\.pretrain\.seq_len: 64 exceeds model\.max_len=32",
    ),
    "mesh vs devices": ("pretrain", _set("mesh.data", 3), r"config\.mesh.*8 devices"),
    "batch not divisible": (
        "pretrain",
        _set("pretrain.batch_size", 6),
        r"config\.pretrain\.batch_size: 6 is not divisible",
    ),
    "bad nonfinite policy": (
        "pretrain",
        _set("pretrain.nonfinite", "ignore"),
        r"config\.pretrain\.nonfinite: 'ignore' not in skip\|stop",
    ),
    "bad kl_guard": ("ppo", _set("ppo.kl_guard", "maybe"), r"config\.ppo\.kl_guard: 'maybe'"),
    "path with ..": (
        "sft",
        _set("data.demos", "demos:../demos.jsonl"),
        r"config\.data\.demos: .*'\.\.' is not allowed",
    ),
    "malformed record": (
        "sft",
        _set("data.demos", _bad_demos),
        r"config\.data\.demos: .*bad_demos\.jsonl:3: bad JSON",
    ),
    "too many bad records": (
        "sft",
        lambda c, f: (
            _set("data.demos", _half_bad_demos)(c, f),
            _set("data.max_bad_fraction", 0.2)(c, f),
        ),
        r"half_bad_demos\.jsonl:1: missing field 'response' .*10 of 20 records are malformed",
    ),
    "empty dataset": (
        "sft",
        _set("data.demos", _empty_demos),
        r"config\.data\.demos: .*no records",
    ),
    "resume, other tokenizer": (
        "pretrain",
        _set("tokenizer.path", _other_tokenizer),
        r"pretrain: refusing to resume from .*/8: it was trained with tokenizer",
    ),
    "base model, other tokenizer": (
        "sft",
        _set("tokenizer.path", _other_tokenizer),
        r"pretrain/checkpoints/8 was trained with tokenizer \w+, this run has \w+",
    ),
    "resume, other data order": (
        "pretrain",
        _set("seeds.data", 1),
        r"refusing to resume .*: config\.seeds\.data was 0, now 1",
    ),
    "resume, other dims": (
        "pretrain",
        _set("model.d_ff", 128),
        r"cannot resume from .*/8: params\.\S+: checkpoint has float32\[\d+(, \d+)*\], "
        r"this config float32\[",
    ),
    "resume, other dtype": (
        "pretrain",
        _set("model.param_dtype", "bfloat16"),
        r"params\.\S+: checkpoint has float32\[.*\], this config bfloat16\[",
    ),
}


@pytest.fixture(scope="module")
def bad_input_workdir(tiny_run, tmp_path_factory):
    return fresh_copy(tiny_run, tmp_path_factory.mktemp("bad") / "run")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_named_error_before_step_1(case, tiny_run, bad_input_workdir, capsys):
    stages, change, message = BAD_INPUTS[case]
    config = config_from_flags(tiny_run["flags"])
    change(config, tiny_run["files"])
    before = snapshot(bad_input_workdir)
    metrics = {s: losses(bad_input_workdir, s) for s in ("pretrain", "sft")}
    capsys.readouterr()
    code = stages_lib.run_guarded(config, str(bad_input_workdir), stages.split(","))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert snapshot(bad_input_workdir) == before  # no checkpoint, data or tokenizer touched
    assert {s: losses(bad_input_workdir, s) for s in ("pretrain", "sft")} == metrics
    record(case, stages, "named error before step 1, nothing modified")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config=/no/such/config.py:tiny"], r"^error: --config: .*No such file .*/no/such"),
        (["--config.pretrain.bogus=1"], r"^error: --config\.pretrain\.bogus: no such config field"),
    ],
)
def test_bad_command_line_is_one_line_and_non_zero(flags, message, tmp_path):
    out = run_cli(main_cmd(tmp_path / "run", "pretrain", *flags), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "run" / "pretrain").exists()
    record(f"CLI: {flags[0].split('=')[0]}", "main", "one-line error, exit 2")


def test_bad_records_below_the_allowed_fraction_are_dropped_and_reported(tmp_path, capsys):
    from experiments import sft

    demos = write_demos(tmp_path / "demos.jsonl", n=40)
    lines = open(demos).read().splitlines()
    lines[4] = "not json"
    (tmp_path / "demos.jsonl").write_text("\n".join(lines) + "\n")
    config = pipeline.get_config("tiny")
    config.data.demos = f"demos:{demos}"
    config.data.max_bad_fraction = 0.1
    train, heldout = sft.demo_sources(config, str(tmp_path))
    assert len(train) + len(heldout) == 39
    err = capsys.readouterr().err
    assert "data.demos: dropped 1 malformed records" in err and "demos.jsonl:5: bad JSON" in err
    record("1 of 40 demos malformed, max_bad_fraction=0.1", "sft", "dropped and reported")


def test_prompts_longer_than_the_context_are_reported_not_fatal(capsys):
    from experiments import ppo as ppo_stage

    source = [[1] * n for n in (3, 9, 12, 5)]
    n = ppo_stage.report_long_prompts(source, list, 8, "ppo.max_prompt_len")
    err = capsys.readouterr().err
    assert n == 2 and "2 of 4 prompts are longer than 8 tokens (longest 12)" in err
    assert ppo_stage.report_long_prompts(source, list, 12, "ppo.max_prompt_len") == 0
    with pytest.raises(ConfigError, match="ppo.prompts"):
        ppo_stage.report_long_prompts([], list, 8, "ppo.max_prompt_len")
