"""SFT end to end on the user's own files, the chat command on its result."""

import os
import pty
import subprocess
import sys

import numpy as np
import pytest

from configs import pipeline
from experiments import pipeline as pipeline_lib
from experiments.stages import sft
from gptjax.data import packing
from tests.helpers import SFT_CLI, TINY_CLI, subprocess_env, write_demos, write_text_corpus

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    corpus = write_text_corpus(tmp / "corpus.txt")
    demos = write_demos(tmp / "demos.jsonl")
    workdir = tmp / "run"
    cmd = [
        sys.executable,
        "-m",
        "experiments.main",
        f"--workdir={workdir}",
        "--stages=pretrain,sft",
        f"--config.data.pretrain=text:{corpus}",
        f"--config.data.demos=demos:{demos}",
        "--config.pretrain.steps=10",
        "--config.sft.steps=20",
        *TINY_CLI,
        *SFT_CLI,
    ]
    out = subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir, corpus, demos, out.stdout


def test_sft_stage_trains_from_the_base_model(sft_run):
    workdir, _, _, stdout = sft_run
    assert "== pretrain: 10 steps" in stdout and "== sft: 20 steps" in stdout
    assert os.path.isdir(workdir / "sft" / "checkpoints" / "20")


def test_sft_stage_masks_exactly_the_responses_and_eos(sft_run):
    workdir, corpus, demos, _ = sft_run
    config = pipeline.get_config("tiny")
    config.data.pretrain, config.data.demos = f"text:{corpus}", f"demos:{demos}"
    for flag in TINY_CLI + SFT_CLI:
        key, value = flag[len("--config.") :].split("=")
        section, *rest = key.split(".")
        target = config[section]
        for part in rest[:-1]:
            target = target[part]
        target[rest[-1]] = type(target[rest[-1]])(value)
    ctx = pipeline_lib.context(config, str(workdir), "sft")
    parts = sft.build(ctx)
    tok = parts["tokenizer"]
    import json

    responses = [json.loads(line)["response"] for line in open(demos)]
    n_ptx = sft.ptx_rows(ctx, config.sft.batch_size, ctx.mesh())
    assert n_ptx == 2  # sft.ptx_fraction 0.25 of 8 rows: pretraining text
    seen = 0
    for _ in range(5):
        batch = next(parts["batches"])
        demo_rows = {k: v[: len(v) - n_ptx] for k, v in batch.items()}
        ptx_rows = {k: v[len(v) - n_ptx :] for k, v in batch.items()}
        # Pretraining rows: loss on every real token.
        np.testing.assert_array_equal(
            ptx_rows["loss_mask"], (ptx_rows["segment_ids"] > 0).astype(np.float32)
        )
        for tokens, mask in packing.segments(demo_rows):
            masked = tok.decode(np.asarray(tokens)[np.asarray(mask) > 0])
            assert masked.endswith("</s>") and masked[1:-4] in responses, masked
            assert masked == " " + masked[1:-4] + "</s>"  # the reply, its EOS, nothing else
            seen += 1
    assert seen >= 25  # 5 batches x 6 packed demo rows


def test_chat_one_shot_and_interactive(sft_run):
    workdir = sft_run[0]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.chat",
            f"--workdir={workdir}",
            "--prompt=what is 2 plus 3?",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert len(one.stdout.strip().splitlines()) == 1

    both = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.chat",
            f"--workdir={workdir}",
            "--compare",
            "--prompt=what is 2 plus 3?",
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert both.returncode == 0, both.stderr[-2000:]
    assert [line.split("]")[0] for line in both.stdout.splitlines()] == ["[base", "[sft"]

    # A real terminal: stdin and stdout are a pseudo-terminal, as in a user's session.
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "experiments.chat", f"--workdir={workdir}"],
        stdin=follower,
        stdout=follower,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        cwd=ROOT,
    )
    os.close(follower)
    os.write(leader, b"what is 1 plus 1?\n/reset\nwhat is 4 plus 4?\n\n")
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=300)
    os.close(leader)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
    assert "chatting with sft" in text and text.count("you> ") >= 3


def test_chat_without_a_workdir_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.chat", f"--workdir={tmp_path}", "--prompt=hi"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "no pretrain checkpoint" in out.stderr
