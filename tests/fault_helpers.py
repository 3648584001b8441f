"""What the fault tests share (tests/test_checkpoint_integrity.py, test_kills.py,
test_nonfinite.py, test_bad_input.py): one tiny pretrain -> SFT -> RM run through the CLI
(the `tiny_run` fixture in conftest.py, built once per session and copied by each test
that needs checkpoints), and reading its losses, checkpoints and files.

Each fault a test survives or input it rejects is recorded (`record`); with
GPTJAX_FAULT_TABLE=path set, the rows are written there as JSON lines.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from gptjax import checkpoint as ckpt_lib
from gptjax.metrics import read_jsonl
from tests.helpers import (
    SFT_CLI,
    TINY_CLI,
    subprocess_env,
    write_demos,
    write_text_corpus,
)

ROWS = []


def record(fault: str, stage: str, outcome: str, steps_lost="-"):
    ROWS.append(dict(fault=fault, stage=stage, outcome=outcome, steps_lost=steps_lost))


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


def complete_steps(directory):
    """The checkpoint steps of a directory whose saves finished (they have a manifest)."""
    return sorted(
        int(d)
        for d in os.listdir(directory)
        if d.isdigit() and os.path.exists(os.path.join(directory, d, ckpt_lib.MANIFEST))
    )


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


def tiny_run_files(directory) -> dict:
    """The tiny run in `directory`: its workdir, data files and command-line flags."""
    tmp = Path(directory)
    files = {
        "corpus": str(tmp / "corpus.txt"),
        "demos": str(tmp / "demos.jsonl"),
        "comparisons": str(tmp / "comparisons.jsonl"),
    }
    return {"workdir": tmp / "run", "files": files, "flags": [*data_flags(files), *RUN_CLI]}


def build_tiny_run(directory) -> None:
    """pretrain (8 steps, checkpoints every 2), SFT (4) and RM (4) on small user files, run
    through the CLI into directory/run."""
    run = tiny_run_files(directory)
    write_text_corpus(run["files"]["corpus"])
    write_demos(run["files"]["demos"])
    write_comparisons(run["files"]["comparisons"])
    out = run_cli(main_cmd(run["workdir"], "pretrain,sft,rm", *run["flags"]))
    assert out.returncode == 0, out.stderr[-3000:]
