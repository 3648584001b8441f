"""Multi-host for real: 2 processes on localhost (2 simulated CPU devices each, joined by
jax.distributed over gloo) pretrain `tiny` together through the command line a user runs,
and match one process with 4 devices fed the same global batch.

Both runs have the same mesh (fsdp=4, or tensor=4) over the same device order, so they
compile the same program; only the cross-device reductions differ in implementation
(gloo across processes vs in-process), which may change float summation order. Hence
rtol 1e-5 on the losses (float32 has ~1e-7 relative precision; a few reductions of a few
hundred terms stay far below 1e-5, while a wrong row, a skipped host slice or a
double-counted batch moves the loss by > 1e-3), and atol 1e-5 on params after a few Adam
steps (lr 3e-3; an update is at most lr per weight, so a batch error shows as ~1e-3).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from gptjax import checkpoint as ckpt_lib
from gptjax.metrics import read_jsonl
from tests.helpers import TINY_CLI, subprocess_env, write_text_corpus

pytestmark = pytest.mark.slow

STEPS = 4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_cmd(workdir, corpus, mesh):
    return [
        sys.executable,
        "-m",
        "experiments.main",
        f"--workdir={workdir}",
        "--stages=pretrain",
        f"--config.data.pretrain=text:{corpus}",
        f"--config.pretrain.steps={STEPS}",
        "--config.pretrain.checkpoint_every=2",  # a mid-run (async) save too
        *mesh,  # the same mesh in both runs, not "whatever is there"
        *TINY_CLI,
    ]


def host_envs(n: int = 2) -> list[dict[str, str]]:
    """The environments of n processes on localhost (2 simulated devices each) joined by
    one coordinator."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        {
            **subprocess_env(2),
            "GPTJAX_COORDINATOR_ADDRESS": coordinator,
            "GPTJAX_NUM_PROCESSES": str(n),
            "GPTJAX_PROCESS_ID": str(i),
            # JAX's CPU cache key differs between processes, so only process 0 would hit
            # the persistent cache; process 1 would compile alone, and gloo gives a late
            # peer only 30 s to join a new collective. Both compile, side by side.
            "JAX_ENABLE_COMPILATION_CACHE": "false",
        }
        for i in range(n)
    ]


def run_all(cmds_envs, timeout=240):
    """Starts every command at once; returns their (returncode, stdout, stderr), or fails
    with every process's output if they are not all done within `timeout` seconds (a
    process that dies leaves the others waiting in a collective)."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, env in cmds_envs
    ]
    results, deadline = [], time.monotonic() + timeout
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate() for p in procs]
        pytest.fail(
            f"not done in {timeout} s:\n"
            + "\n".join(f"--- process {i}:\n{err[-3000:]}" for i, (_, err) in enumerate(logs))
        )
    return results


def step_losses(workdir) -> dict[int, list[float]]:
    out = {}
    for row in read_jsonl(os.path.join(workdir, "pretrain", "metrics.jsonl")):
        if "loss" in row:
            out.setdefault(row["step"], []).append(row["loss"])
    return out


def checkpoint(workdir, step):
    """(params, meta) of a saved step, read whole onto this process's first device."""
    directory = os.path.join(workdir, "pretrain", "checkpoints")
    ckpt = ckpt_lib.Checkpointer(directory, ("params",), async_save=False)
    assert ckpt.all_steps() == [2, STEPS]
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(step) / "params")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        getattr(saved, "tree", saved),
    )
    _, items, meta = ckpt.restore({"params": abstract}, step)
    ckpt.close()
    return items["params"], meta


# fsdp: each process feeds its own half of the batch rows. tensor: the tensor-parallel
# group spans both processes (as 8-way tensor parallelism spans two 4-chip v5p hosts),
# so both hold every row and must load the same ones (sharding.host_blocks).
MESHES = {
    "fsdp": ["--config.mesh.fsdp=4"],
    "tensor": ["--config.mesh.fsdp=1", "--config.mesh.tensor=4"],
}


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, mesh):
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    one, two = tmp_path / "one", tmp_path / "two"
    hosts = host_envs()
    # Both hosts start on an empty workdir at once: data and tokenizer preparation must not
    # race (process 0 prepares, the other waits and loads).
    results = run_all(
        [(main_cmd(one, corpus, MESHES[mesh]), subprocess_env(4))]
        + [(main_cmd(two, corpus, MESHES[mesh]), e) for e in hosts]
    )
    for name, (returncode, out, err) in zip(["single", "host 0", "host 1"], results):
        assert returncode == 0, f"{name} failed:\n{out[-2000:]}\n{err[-5000:]}"

    ref, multi = step_losses(one), step_losses(two)
    assert sorted(ref) == sorted(multi) == list(range(1, STEPS + 1))
    for step in ref:
        # Every process computes the same (global) loss; only process 0 writes it.
        assert len(multi[step]) == 1, multi[step]
        np.testing.assert_allclose(multi[step][0], ref[step][0], rtol=1e-5, err_msg=f"step {step}")
    assert ref[1] != ref[STEPS]  # it trained, so the comparison means something

    # The cooperatively written checkpoint is complete and holds the same model and position.
    ref_params, ref_meta = checkpoint(one, STEPS)
    params, meta = checkpoint(two, STEPS)
    assert meta["tokenizer_hash"] == ref_meta["tokenizer_hash"]
    assert meta["data"] == ref_meta["data"]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, ref_params
    )


def test_sigterm_on_one_host_stops_every_host_at_the_same_step(tmp_path):
    """Preemption notices may reach one host only; a checkpoint save is collective, so
    every process must stop at the same step (JAX's preemption sync point), save there
    together, and resume from it."""
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    workdir = tmp_path / "run"
    steps = 400  # far more than run before the signal lands
    cmd = [
        *main_cmd(workdir, corpus, MESHES["fsdp"])[: -len(TINY_CLI)],
        f"--config.pretrain.steps={steps}",
        f"--config.pretrain.checkpoint_every={steps}",
        *TINY_CLI,
    ]
    env = host_envs()
    procs = [
        subprocess.Popen(
            cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for e in env
    ]
    metrics = workdir / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while not (metrics.exists() and len(step_losses(workdir)) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [
                p.communicate()[1][-3000:] for p in procs if p.poll() is not None
            ]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)  # host 1 only
        outs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            p.kill()
    stopped = []
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
        (line,) = [x for x in err.splitlines() if x.startswith("stopped:")]
        stopped.append(line)
    assert stopped[0] == stopped[1], stopped  # same step on both hosts
    step = int(stopped[0].split(" at step ")[1].split(";")[0])
    assert 3 <= step < steps
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "pretrain", "checkpoints"), ("params",), async_save=False
    )
    assert ckpt.latest_step() == step
    ckpt.close()
