"""The restart onto huge pages: when it happens, with what command and environment; and
JAX_PLATFORMS=cpu on a host without an accelerator."""

import os
import sys

import pytest

from gptjax import host


@pytest.fixture
def applies(monkeypatch):
    monkeypatch.setattr(host, "_madvise_only", lambda: True)


def test_the_tunable_is_added_to_the_users_own(applies):
    env = host.huge_pages_environment({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.x=1"})
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.pthread.x=1:glibc.malloc.hugetlb=1"}
    assert host.huge_pages_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_a_users_own_setting_or_a_kernel_without_madvise_wins(applies, monkeypatch):
    assert host.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    monkeypatch.setattr(host, "_madvise_only", lambda: False)
    assert host.huge_pages_environment({}) is None


def _restarts(monkeypatch, argv, environ, sys_argv):
    """Runs the restart as a process started with `argv` whose sys.argv is `sys_argv` (a -m
    module's path or the script, then the arguments)."""
    calls = []
    monkeypatch.setattr(sys, "orig_argv", argv)
    monkeypatch.setattr(sys, "argv", sys_argv)
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    host.restart_with_huge_pages("experiments")
    return calls


def test_a_tool_of_the_package_restarts_once_with_its_own_arguments(applies, monkeypatch):
    argv = ["python3", "-X", "utf8", "-m", "experiments.main", "--stages=eval"]
    sys_argv = ["/src/experiments/main.py", "--stages=eval"]
    [(exe, args, env)] = _restarts(monkeypatch, argv, {"HOME": "/h"}, sys_argv)
    assert exe == sys.executable
    assert args == [sys.executable, "-X", "utf8", "-m", "experiments.main", "--stages=eval"]
    assert env == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # The restarted process finds the tunable set and goes on.
    assert _restarts(monkeypatch, argv, env, sys_argv) == []


@pytest.mark.parametrize(
    "argv, sys_argv",
    [
        (["python", "-m", "pytest", "-n", "2"], ["/site/pytest/__main__.py", "-n", "2"]),
        (["python", "-m", "experimentsX.main"], ["/src/experimentsX/main.py"]),
        (["python", "s.py", "-m", "experiments.main"], ["s.py", "-m", "experiments.main"]),
        (["python", "-c", "import experiments"], ["-c"]),
    ],
)
def test_anything_else_is_not_restarted(applies, monkeypatch, argv, sys_argv):
    assert _restarts(monkeypatch, argv, {}, sys_argv) == []


def _host(tmp_path, vendors=(), nodes=()):
    """A fake /sys with PCI devices of these vendors and a fake /dev with these nodes."""
    for i, vendor in enumerate(vendors):
        device = tmp_path / "sys" / "bus" / "pci" / "devices" / f"0000:00:0{i}.0"
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
    (tmp_path / "dev").mkdir()
    for node in nodes:
        (tmp_path / "dev" / node).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "dev" / node).touch()
    return dict(sys_root=str(tmp_path / "sys"), dev_root=str(tmp_path / "dev"))


@pytest.mark.parametrize(
    "vendors, nodes",
    [
        (["0x1ae0"], []),  # a TPU chip on the PCI bus
        ([], ["accel0"]),  # TPU v4 / v5e device nodes
        ([], ["vfio/0"]),  # TPU v5p and later
        ([], ["nvidia0", "nvidiactl"]),  # an NVIDIA GPU
        ([], ["nvidiactl"]),  # in a container
        ([], ["dxg"]),  # under WSL2
        ([], ["kfd"]),  # an AMD GPU (ROCm)
    ],
)
def test_a_host_with_an_accelerator_keeps_jax_s_own_platform_choice(
    tmp_path, monkeypatch, vendors, nodes
):
    monkeypatch.setattr(sys, "platform", "linux")
    roots = _host(tmp_path, ["0x8086", "0x1af4", *vendors], nodes)
    assert host.accelerator_present(**roots)
    assert host.cpu_only_environment({"HOME": "/h"}, **roots) is None


def test_a_host_without_one_runs_on_the_cpu_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    roots = _host(tmp_path, ["0x8086", "0x1af4"], ["vfio/vfio", "null", "nvme0"])
    assert not host.accelerator_present(**roots)
    env = host.cpu_only_environment({"HOME": "/h"}, **roots)
    assert env == {"HOME": "/h", "JAX_PLATFORMS": "cpu"}
    assert host.cpu_only_environment({"JAX_PLATFORMS": ""}, **roots) is None
    monkeypatch.setattr(sys, "platform", "darwin")  # jax-metal: not this module's to hide
    assert host.cpu_only_environment({}, **roots) is None


def test_the_suite_sets_jax_platforms_where_jax_reads_it():
    import jax

    # conftest.py sets JAX_PLATFORMS before anything imports JAX, which reads it then:
    # set after the import, libtpu (the tpu extra) probed for TPUs in every worker.
    assert jax.config.jax_platforms == os.environ["JAX_PLATFORMS"]


def test_the_pipeline_keeps_compiled_programs_in_the_users_cache_unless_jax_is_told_otherwise(
    monkeypatch, tmp_path
):
    import jax

    monkeypatch.setattr(os.path, "expanduser", lambda p: p.replace("~", "/home/u"))
    assert host.compilation_cache_dir({}) == "/home/u/.cache/gptjax/jax"
    assert host.compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/gptjax/jax"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # JAX's own settings win (JAX reads its variables into them); multi-host runs get no
    # default. No compile runs in between: the process's own cache is untouched.
    threshold = "jax_persistent_cache_min_compile_time_secs"
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache", threshold)
    before = {name: getattr(jax.config, name) for name in names}
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update(threshold, 1.0)  # JAX's default (conftest.py sets 0 for the suite)
        assert host.use_compilation_cache(multihost=False) is None
        jax.config.update("jax_enable_compilation_cache", True)
        assert host.use_compilation_cache(multihost=True) is None
        assert jax.config.jax_compilation_cache_dir is None
        assert getattr(jax.config, threshold) == 1.0
        # A threshold from JAX's variable stays; without it, every program is kept.
        monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
        assert host.use_compilation_cache(multihost=False) == str(tmp_path / "gptjax" / "jax")
        assert getattr(jax.config, threshold) == 1.0
        monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update(threshold, 2.0)  # and so does one set in code
        assert host.use_compilation_cache(multihost=False) == str(tmp_path / "gptjax" / "jax")
        assert getattr(jax.config, threshold) == 2.0
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update(threshold, 1.0)
        assert host.use_compilation_cache(multihost=False) == str(tmp_path / "gptjax" / "jax")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "gptjax" / "jax")
        assert getattr(jax.config, threshold) == 0.0
    finally:
        for name, value in before.items():
            jax.config.update(name, value)


def test_a_process_whose_jax_has_a_cache_keeps_it():
    import jax

    # conftest.py gave this process the suite's cache: the pipeline run in-process keeps it.
    before = jax.config.jax_compilation_cache_dir
    assert before and host.use_compilation_cache(multihost=False) is None
    assert jax.config.jax_compilation_cache_dir == before
