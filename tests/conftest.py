"""Test session set-up: 8 simulated CPU devices, fast-compiling XLA flags and a persistent
compilation cache (tests/helpers.py xla_flags).

Both must be configured before JAX initialises its backend, hence at import time here.
"""

import os

# Keep libtpu (installed with the `tpu` extra) from probing for TPUs in every worker.
# Before anything imports JAX: JAX reads JAX_PLATFORMS when it is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.helpers import xla_flags  # noqa: E402  (imports JAX, which reads XLA_FLAGS later)

# Sharding tests need 8 devices; single-device tests simply use device 0.
os.environ.setdefault("XLA_FLAGS", xla_flags(8))

import jax  # noqa: E402
import pytest  # noqa: E402

from gptjax import host  # noqa: E402

# pytest-xdist's workers and the programs tests start inherit malloc on transparent huge
# pages, as `python -m experiments.<tool>` sets for itself (gptjax/host.py).
os.environ.update(host.huge_pages_environment(os.environ) or {})

_CACHE = os.environ.get(
    "GPTJAX_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
# And the processes tests start, which inherit it: none writes the user's own cache
# (gptjax/host.py use_compilation_cache).
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(_CACHE)
# Cache everything: each tiny step compiles in 1-5 s, and reusing it is the whole point.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# The files that take a worker longest in a cold suite, longest first (BUILD.md, Tests).
# `--dist loadfile` hands a worker the next file in collection order as it finishes one;
# longest first, the last files are the short ones and the two workers end together
# (alphabetically, a 45 s file came last and the other worker idled for 14 s).
_LONGEST_FIRST = (
    "test_ppo.py", "test_hf_pipeline.py", "test_kills.py", "test_multihost.py",
    "test_algorithms.py", "test_rm_stage.py", "test_aot.py", "test_layers.py",
    "test_model.py", "test_pretrain.py", "test_bad_input.py", "test_sft.py",
    "test_hf_export.py", "test_nonfinite.py", "test_lora_rl.py", "test_evaluate.py",
    "test_lora.py", "test_sampling.py", "test_hf_model.py", "test_reward_model.py",
    "test_sharding.py", "test_hf_tokenizer.py",
)  # fmt: skip


def pytest_configure(config):
    # pytest-xdist would reorder the files by their number of tests; keep the order that
    # pytest_collection_modifyitems sets.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """Files in _LONGEST_FIRST order, then the rest as collected; tests within a file
    keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_sessionfinish(session, exitstatus):
    # "No tests collected" (exit 5) means the suite did not run: a failure, never a pass.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def n_devices():
    return jax.device_count()


@pytest.fixture(scope="session", autouse=True)
def _fault_table():
    """With GPTJAX_FAULT_TABLE=path, the faults the tests survived (fault_helpers.record)
    are appended there as JSON lines."""
    yield
    from tests.fault_helpers import ROWS

    path = os.environ.get("GPTJAX_FAULT_TABLE")
    if path and ROWS:
        import json

        with open(path, "a") as f:
            for row in ROWS:
                f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny pretrain -> SFT -> RM run on user files (tests/fault_helpers.py), built once
    per session and shared by every xdist worker (a lock in the session's common temporary
    directory): tests copy it rather than train again."""
    import fcntl

    from tests import fault_helpers

    # Under xdist each worker's base is <this run's base>/popen-gwN: its parent is shared
    # by this run's workers and no other run's. Without xdist the base is this run's.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    directory = shared / "tiny_run"
    with open(shared / "tiny_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / "DONE").exists():
            directory.mkdir(exist_ok=True)
            fault_helpers.build_tiny_run(directory)
            (directory / "DONE").touch()
    return fault_helpers.tiny_run_files(directory)
