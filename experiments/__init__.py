"""Stage runners and command-line tools, each run as `python -m experiments.<tool>`."""

import os

from gptjax import host

# Such a process restarts once, before anything imports JAX, with glibc malloc on
# transparent huge pages: 17-23% more training tokens/s on CPU (gptjax/host.py, BUILD.md).
host.restart_with_huge_pages(__name__)
# On a host with no TPU or GPU, JAX on the CPU without libtpu's probe errors (gptjax/host.py).
os.environ.update(host.cpu_only_environment(os.environ) or {})
