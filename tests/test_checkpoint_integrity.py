"""Checkpoint integrity (issue 10): a truncated, bit-flipped or unfinished latest
checkpoint is detected, moved aside and the previous one used; other shapes or dtypes are
an error naming the parameter; an async save gets its manifest by itself."""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import checkpoint as ckpt_lib
from gptjax.errors import CheckpointError
from tests.fault_helpers import assert_same, complete_steps, flip_byte, record, truncate

TREE = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(5, np.float32)}


def _saved_steps(directory, steps=(1, 2, 3)):
    ckpt = ckpt_lib.Checkpointer(str(directory), ("params",), keep=5)
    for s in steps:
        ckpt.save(s, {"params": jax.tree.map(lambda x, s=s: x * s, TREE)}, {"step": s})
    ckpt.close()


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


def test_an_async_save_gets_its_manifest_without_another_call(tmp_path):
    """The manifest is written as soon as orbax finishes the save, in the background: not
    only at the next save, poll() or close() (a kill in between would lose the step)."""
    ckpt = ckpt_lib.Checkpointer(str(tmp_path), ("params",))
    try:
        ckpt.save(2, {"params": TREE}, {"step": 2})
        deadline = time.time() + 60
        while not complete_steps(tmp_path) and time.time() < deadline:
            time.sleep(0.02)
        assert complete_steps(tmp_path) == [2]
        assert ckpt_lib.verify_manifest(ckpt.step_dir(2)) is None
    finally:
        ckpt.close()
    assert complete_steps(tmp_path) == [2]
