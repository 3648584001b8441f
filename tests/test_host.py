"""The restart onto huge pages: when it happens, with what command and environment."""

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
