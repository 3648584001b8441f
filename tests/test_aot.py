"""Ahead-of-time compiles for a TPU slice from this CPU host (experiments/aot.py).

Needs libtpu (`pip install -e ".[tpu]"`); without it these tests skip, except the one
that checks the command's message. conftest's JAX_PLATFORMS=cpu keeps libtpu from
probing for local TPUs: compiling for a topology needs none.
"""

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pipeline
from experiments import aot
from gptjax import sharding
from gptjax.errors import ConfigError

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='libtpu not installed (pip install -e ".[tpu]")',
)
TOPOLOGY = "v5e:2x2"  # 4 chips: FSDP 4 over the tiny model's width


@pytest.fixture(autouse=True)
def no_persistent_cache():
    # An executable compiled for a topology cannot be loaded back from conftest's cache
    # (there is no TPU client to load it into): writing it only costs time and warnings.
    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", before)


def small_config():
    """tiny, shrunk further so that every stage compiles in seconds."""
    c = pipeline.get_config("tiny")
    c.model.n_layers, c.model.d_model, c.model.d_ff, c.model.max_len = 1, 64, 128, 32
    for stage in ("pretrain", "sft", "rm"):
        c[stage].batch_size, c[stage].seq_len = 8, 16
    c.compare.k = 2
    for stage in ("ppo", "ppo_ptx"):
        s = c[stage]
        s.prompts_per_iteration, s.max_prompt_len, s.max_new_tokens = 8, 8, 4
        s.epochs, s.minibatches, s.ptx_batch_size, s.ptx_seq_len = 1, 2, 8, 16
    return c


@needs_libtpu
def test_no_stage_materialises_arrays():
    mesh = aot.topology_mesh(small_config(), aot.topology_devices(TOPOLOGY))
    # Arrays other tests on this worker left behind may be freed by the garbage collector
    # while the loop runs, so count only arrays that were not alive before (holding
    # `before` keeps their ids from being reused).
    before = jax.live_arrays()
    before_ids = {id(x) for x in before}
    for stage in aot.STAGES:
        programs = aot.stage_programs(small_config(), stage, mesh)
        assert programs, stage
        for prog in programs:
            leaves = jax.tree.leaves((prog.args, prog.resident))
            assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves), (
                stage,
                prog.name,
                {type(x).__name__ for x in leaves},
            )
            # Sharded over the slice's 4 chips, never placed on this host's CPU.
            assert all(x.sharding.num_devices == 4 for x in leaves), (stage, prog.name)
    assert [x.shape for x in jax.live_arrays() if id(x) not in before_ids] == []


@needs_libtpu
def test_every_stage_compiles_and_reports_memory():
    rows = aot.run_aot(small_config(), TOPOLOGY, aot.STAGES, log=lambda _: None)
    names = [(r["stage"], r["program"]) for r in rows]
    assert names == [
        ("pretrain", "train_step"),
        ("sft", "train_step"),
        ("rm", "train_step"),
        ("ppo", "rollout"),
        ("ppo", "score"),
        ("ppo", "update"),
        ("ppo_ptx", "update"),
    ]
    for r in rows:
        assert r["fits"] and 0 < r["total_gib"] < 1, r
        assert r["argument_gib"] > 0 and r["hbm_gib"] == 16, r
        # The traced step's matmuls against 6·N·tokens (+ attention): no remat here, so
        # the program does what the formula counts, plus small extras (the RM's scalar
        # head, PPO's value model evaluated at every position).
        assert 0.9 < r["program_tflop"] / r["analytic_tflop"] < 1.6, r
    donated = {r["stage"]: r["alias_gib"] for r in rows if r["program"] != "rollout"}
    assert donated["pretrain"] > 0 and donated["ppo"] > 0  # the state is updated in place


@needs_libtpu
def test_a_batch_too_big_for_hbm_does_not_fit():
    c = small_config()
    # [B, T, V] float32 logits split over the slice's 4 chips by their batch rows (the
    # activation constraints): 16384 x 16 x 65536 x 4 bytes / 4 = 16 GiB per chip, before
    # any copy.
    c.pretrain.batch_size, c.tokenizer.vocab_size = 16384, 65536
    (row,) = aot.run_aot(c, TOPOLOGY, ["pretrain"], log=lambda _: None)
    assert not row["fits"] and row["total_gib"] > 16, row
    assert "HBM" in row["error"] or "memory" in row["error"], row


@needs_libtpu
def test_host_blocks_of_a_slice():
    devices = aot.topology_devices("v5e:4x4")  # 16 chips on 4 hosts of 4
    assert len({d.process_index for d in devices}) == 4
    c = small_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 16, 1
    mesh = aot.topology_mesh(c, devices)
    assert sharding.host_blocks(mesh) == {p: sharding.HostBlock(p, 4) for p in range(4)}
    assert aot.hosts_per_block(mesh) == 1
    c.mesh.fsdp, c.mesh.tensor = 2, 8  # tensor groups of 8 span 2 hosts: pairs share rows
    mesh = aot.topology_mesh(c, devices)
    assert sharding.host_blocks(mesh) == {p: sharding.HostBlock(p // 2, 2) for p in range(4)}
    assert aot.hosts_per_block(mesh) == 2
    # Hosts interleaved along the batch axis: no host holds one contiguous block of rows.
    hosts = [[d for d in devices if d.process_index == p] for p in range(4)]
    interleaved = [hosts[p][k] for k in range(4) for p in range(4)]
    mesh = jax.sharding.Mesh(np.asarray(interleaved).reshape(1, 16, 1), sharding.MESH_AXES)
    with pytest.raises(ConfigError, match="mesh.*contiguous"):
        sharding.host_blocks(mesh)


def test_without_libtpu_the_command_says_how_to_install_it():
    # find_spec("libtpu") patched to None in a fresh process: libtpu "is not installed".
    script = (
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'libtpu' else real(n, *a)\n"
        "sys.argv = ['aot', '--config=configs/pipeline.py:tiny', '--topology=v5e:2x2']\n"
        "runpy.run_module('experiments.aot', run_name='__main__')\n"
    )
    root = os.path.join(os.path.dirname(__file__), "..")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {aot.INSTALL}"], proc.stderr[-2000:]
    assert 'pip install -e ".[tpu]"' in aot.INSTALL
