#!/usr/bin/env bash
# The GPU run (BUILD.md, "One NVIDIA GPU"): one script of at most 8 minutes on one H100 or
# H200 that comes with its own JAX for CUDA 13 and no network (the lent machines: JAX
# 0.11, Python 3.12, flax, optax, orbax-checkpoint and sentencepiece installed).
#
#   experiments/gpu_run.sh wheels                # here, with pip: .whl/ for what is missing
#   experiments/gpu_run.sh OUT_DIR [BENCH_ARGS]  # there, from the repo root
#
# `bench gpu` (experiments/bench_gpu.py: the attention check, training MFU, decode, a PPO
# split) needs nothing beyond such an image but ml_collections, which travels as a wheel in
# .whl/. Versions and devices go to OUT_DIR/env.txt, the benchmark's output to
# OUT_DIR/bench.log and OUT_DIR/gpu.json. BENCH_ARGS replace its defaults, e.g. a dry run
# on a CPU: OUT_DIR --train=tiny:8x32 --decode=tiny --ppo=tiny --attention=xla
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == wheels ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0
  ls .whl
  exit
fi
out="${1:?usage: experiments/gpu_run.sh OUT_DIR [bench gpu arguments]}"
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gptjax-site \
    .whl/*.whl
  export PYTHONPATH="/tmp/gptjax-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import os
import sys

from gptjax import host

# JAX's own platform choice, except on a host with no accelerator (a dry run): the CPU.
os.environ.update(host.cpu_only_environment(os.environ) or {})

import flax
import jax
import jaxlib
import optax

print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib", jaxlib.__version__)
print("flax", flax.__version__, "optax", optax.__version__)
print("devices", jax.devices())
EOF
set +e
timeout 480 python3 -m experiments.bench gpu --out="$out/gpu.json" "$@" 2>&1 | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
if ((rc == 124)); then
  echo "bench gpu: stopped at its 480 s limit; what it printed is above" | tee -a "$out/bench.log"
fi
exit "$rc"
