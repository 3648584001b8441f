"""The host process's memory allocator, set for XLA:CPU's per-step buffers, its JAX
platform where it has no accelerator, and its persistent compilation cache.

glibc's malloc serves each allocation of 128 KiB or more with its own mmap and returns it
to the kernel when freed, and trims the heap's free top. XLA:CPU allocates a step's
temporaries afresh on every call (a 278 MB buffer per gpt2_4l train step), so each step
page-faults all of it again: ~68k page faults and ~160 ms of kernel time per step
(BUILD.md, Performance on CPU).

Two remedies, both leaving the arithmetic and its values unchanged:
- `restart_with_huge_pages` (the default for `python -m experiments.<tool>`): glibc's
  `glibc.malloc.hugetlb=1` tunable makes malloc `madvise` its mappings for transparent
  huge pages, so a step faults 2 MiB pages, 512 times fewer. glibc reads tunables only
  when a process starts, hence the restart, done before anything imports JAX.
- `keep_freed_memory` (opt-in, `bench --keep_freed_memory`): malloc keeps what is freed
  for the next step. One heap for all threads also serialises XLA's concurrent
  allocations: programs compile ~1 s slower and a PPO iteration got slower (BUILD.md).

`cpu_only_environment`: with libtpu installed (the `tpu` extra, which the README's test
command installs), JAX probes for a TPU at start-up and prints libtpu's errors where there
is none; on a host with no TPU or GPU, `python -m experiments.<tool>` runs with
JAX_PLATFORMS=cpu, which it would use anyway.

`use_compilation_cache`: the pipeline's runs (experiments.main, sweep, chat) keep JAX's
persistent compilation cache in ~/.cache/gptjax/jax, so that a program compiled once loads
in every later run of the same program with the same flags, JAX version and device kind
(JAX's cache key): a rerun or a resumed run skips most of its compiling (BUILD.md,
Benchmarks). A loaded executable is the compiled one, so no number changes.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from collections.abc import Mapping

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_SETTINGS = (
    (_M_MMAP_MAX, 0),  # large blocks from the heap, not a fresh mmap each
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # never hand the heap's free top back to the kernel
    (_M_TOP_PAD, 256 << 20),  # grow the heap 256 MiB at a time
    (_M_ARENA_MAX, 1),  # one heap for all threads, so a freed buffer is found again
)


def keep_freed_memory() -> bool:
    """Sets glibc malloc to keep freed memory (call first thing in a process, before JAX
    starts its threads). Returns False, changing nothing, where libc is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


_TUNABLES = "GLIBC_TUNABLES"
_HUGE_PAGES = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _madvise_only() -> bool:
    """Whether this is glibc >= 2.35 (the tunable's first release) under a kernel that gives
    transparent huge pages only to memory that asks (`[madvise]`; with `[always]` malloc's
    mappings get them anyway, with `[never]` not at all)."""
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        with open(_THP_MODE) as f:
            mode = f.read()
    except (ValueError, OSError, AttributeError):
        return False
    major, minor = (int(x) for x in version.split(".")[:2])
    return libc == "glibc" and (major, minor) >= (2, 35) and "[madvise]" in mode


def huge_pages_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """`environ` with malloc's huge-page tunable added to GLIBC_TUNABLES, or None where
    GLIBC_TUNABLES already sets it (to anything: `glibc.malloc.hugetlb=0` opts out) or it
    does not apply here."""
    tunables = environ.get(_TUNABLES, "")
    if "glibc.malloc.hugetlb=" in tunables or not _madvise_only():
        return None
    return {**environ, _TUNABLES: ":".join(t for t in (tunables, _HUGE_PAGES) if t)}


def restart_with_huge_pages(package: str) -> None:
    """Restarts this process with malloc on transparent huge pages, where it was started as
    `python -m <package>.<tool>` and the setting applies and is not yet set; otherwise
    returns, changing nothing (an import by the tests, another OS, a second call)."""
    argv = getattr(sys, "orig_argv", [])
    # `python [options] -m MODULE ARGS`: sys.argv is [MODULE's path, *ARGS].
    at = len(argv) - len(sys.argv)
    if at < 1 or argv[at - 1] != "-m" or not argv[at].startswith(package + "."):
        return
    environ = huge_pages_environment(os.environ)
    if environ is None:
        return
    os.execve(sys.executable, [sys.executable, *argv[1:]], environ)


_PLATFORMS = "JAX_PLATFORMS"
# TPU chips, as JAX finds them (jax/_src/hardware_utils.py, which cannot be imported here:
# importing JAX reads JAX_PLATFORMS). Any Google PCI device counts, so a GCE VM's virtual
# NIC keeps JAX's own choice too: this errs towards leaving the platform alone.
_GOOGLE_PCI_VENDOR = "0x1ae0"
# Device nodes of TPUs (v4/v5e /dev/accel<n>, v5p and later /dev/vfio/<n>) and of GPUs, as
# JAX looks for them: NVIDIA (nvidiactl alone in containers, dxg under WSL2), AMD (kfd).
_ACCELERATOR_NODES = ("accel*", "vfio/[0-9]*", "nvidia[0-9]*", "nvidiactl", "dxg", "kfd")


def accelerator_present(sys_root: str = "/sys", dev_root: str = "/dev") -> bool:
    """Whether this host has a TPU or GPU JAX might use: a Google PCI device or an
    accelerator's device node."""
    for path in glob.glob(os.path.join(sys_root, "bus/pci/devices/*/vendor")):
        try:
            with open(path) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return any(glob.glob(os.path.join(dev_root, node)) for node in _ACCELERATOR_NODES)


def cpu_only_environment(environ: Mapping[str, str], **roots) -> dict[str, str] | None:
    """`environ` with JAX_PLATFORMS=cpu, or None where the user set JAX_PLATFORMS (to
    anything), the host has an accelerator (`roots`: accelerator_present's) or is not
    Linux (whose device files this reads)."""
    if _PLATFORMS in environ or not sys.platform.startswith("linux"):
        return None
    if accelerator_present(**roots):
        return None
    return {**environ, _PLATFORMS: "cpu"}


def compilation_cache_dir(environ: Mapping[str, str]) -> str:
    """The persistent compilation cache's directory the pipeline's tools default to:
    $XDG_CACHE_HOME/gptjax/jax, ~/.cache/gptjax/jax without it."""
    base = environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "gptjax", "jax")


def use_compilation_cache(multihost: bool) -> str | None:
    """Points JAX's persistent compilation cache at `compilation_cache_dir`; returns the
    directory set, or None where it sets none. Call it before the process's first compile:
    JAX decides at that compile whether it has a cache.

    JAX's own settings win, read by JAX itself: a directory already set (in code or by
    JAX_COMPILATION_CACHE_DIR) stays, and JAX_ENABLE_COMPILATION_CACHE=false turns the
    cache off. A multi-host run gets no default: only process 0 writes entries, so on a
    rerun the other processes would compile what it loads, and on CPU gloo gives a peer
    that late 30 s to join."""
    import jax

    config = jax.config
    if multihost or config.jax_compilation_cache_dir or not config.jax_enable_compilation_cache:
        return None
    path = compilation_cache_dir(os.environ)
    config.update("jax_compilation_cache_dir", path)
    # Keep every program, not only those over JAX's default of 1 s of compiling: the tiny
    # pipeline's sub-second programs (about half of them) would compile again in every
    # run, where loading one takes a few hundredths of a second (BUILD.md, Benchmarks). A
    # threshold set by JAX's variable or in code stays.
    threshold = "jax_persistent_cache_min_compile_time_secs"
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ and (
        getattr(config, threshold) == 1.0
    ):
        config.update(threshold, 0.0)
    return path
