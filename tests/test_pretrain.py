"""The pretraining stage end to end, through the command line a user runs."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax import sharding, train_steps
from gptjax.metrics import read_jsonl
from gptjax.model import Model
from gptjax.optim import OptimConfig, make_optimizer
from tests.helpers import TINY_CLI, subprocess_env, tiny_model_config, write_text_corpus

pytestmark = pytest.mark.slow


def main_cmd(workdir, corpus, steps, *extra):
    return [
        sys.executable,
        "-m",
        "experiments.main",
        f"--workdir={workdir}",
        "--stages=pretrain",
        f"--config.data.pretrain=text:{corpus}",
        f"--config.pretrain.steps={steps}",
        *TINY_CLI,
        *extra,
    ]


def per_step_losses(workdir) -> dict[int, float]:
    rows = read_jsonl(os.path.join(workdir, "pretrain", "metrics.jsonl"))
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # later rows win


def final_params(workdir, step):
    ckpt = ckpt_lib.Checkpointer(
        os.path.join(workdir, "pretrain", "checkpoints"), ("params",), async_save=False
    )
    structure = ckpt._manager.item_metadata(step)["params"]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), structure)
    _, items, meta = ckpt.restore({"params": abstract}, step)
    ckpt.close()
    return items["params"], meta


def test_trains_on_a_local_text_file_through_the_cli(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    workdir = tmp_path / "run"
    # As a user's shell has it: no JAX cache set, so the run keeps its programs in the
    # user's cache directory (gptjax/host.py use_compilation_cache).
    env = {**subprocess_env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    del env["JAX_COMPILATION_CACHE_DIR"]
    out = subprocess.run(
        main_cmd(workdir, corpus, 30),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out loss" in out.stdout and "->" in out.stdout  # loss and samples printed
    losses = per_step_losses(workdir)
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 1.0  # it learns the text, not merely runs
    assert os.path.exists(workdir / "tokenizer" / "spm.model")
    params, meta = final_params(workdir, 30)
    assert meta["stage"] == "pretrain" and len(meta["tokenizer_hash"]) == 64
    assert json.loads(meta["config"])["data"]["pretrain"] == f"text:{corpus}"
    assert os.listdir(tmp_path / "cache" / "gptjax" / "jax")  # the train step, at least
    # Rerunning the finished command resumes instead of starting over.
    again = subprocess.run(
        main_cmd(workdir, corpus, 30),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0 and "resumed from step 30" in again.stdout, again.stderr[-2000:]


def test_sigterm_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus.txt")
    steps = 60
    straight = tmp_path / "straight"
    out = subprocess.run(
        main_cmd(straight, corpus, steps),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    resumed = tmp_path / "resumed"
    cmd = main_cmd(resumed, corpus, steps, "--config.pretrain.checkpoint_every=1000")
    proc = subprocess.Popen(
        cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    metrics = resumed / "pretrain" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM" in err
    stopped_at = max(per_step_losses(resumed))
    assert stopped_at < steps

    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in out.stdout
    a, b = per_step_losses(straight), per_step_losses(resumed)
    assert sorted(b) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert a[step] == b[step], (step, a[step], b[step])  # bitwise, not approximately
    pa, _ = final_params(straight, steps)
    pb, _ = final_params(resumed, steps)
    jax.tree.map(np.testing.assert_array_equal, pa, pb)


def test_checkpoint_saved_on_1_device_restores_onto_8(tmp_path):
    model = Model(tiny_model_config())
    tx, _ = make_optimizer(OptimConfig(), 10)
    one = sharding.make_mesh(sharding.MeshConfig(), devices=jax.devices()[:1])
    init, _ = train_steps.jit_init(model, tx, one)
    state = init(jax.random.key(0))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), ("params", "opt_state"))
    ckpt.save(5, {"params": state["params"], "opt_state": state["opt_state"]}, {"data": {}})
    ckpt.close()

    eight = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    shardings = train_steps.state_shardings(model, tx, eight)
    abstract = ckpt_lib.abstract_tree(
        {"params": state["params"], "opt_state": state["opt_state"]},
        {"params": shardings["params"], "opt_state": shardings["opt_state"]},
    )
    restored = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), ("params", "opt_state"))
    step, items, _ = restored.restore(abstract)
    restored.close()
    assert step == 5
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(state["params"]),
        jax.device_get(items["params"]),
    )
    embed = items["params"]["embed"]
    assert len(embed.sharding.device_set) == 8
    assert embed.sharding.shard_shape(embed.shape) == (32, 16)
