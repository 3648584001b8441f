"""Importing a Hugging Face checkpoint: seconds and host memory (`bench.py hf_import`).

    python -m experiments.bench hf_import --shape=llama_1b [--dir=runs/bench/llama_1b_hf]

Writes a random checkpoint of the named shape with `transformers` (the test extra) into
--dir unless one is there, then imports it in a fresh process and reports the wall time and
the peak of the process's anonymous memory (RssAnon, sampled every 20 ms) and of its
file-backed resident pages (RssFile: the memory-mapped safetensors, which the kernel can
drop at any time), beside the size of the params themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

# Hugging Face shapes (config.json fields): Llama 3.2 1B's (tied embeddings, GQA, llama3
# rope scaling), stored in bfloat16 as the Hub's file is.
SHAPES = {
    "llama_1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "llama_tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
}


def write_random(directory: str, shape: str, dtype: str = "bfloat16") -> None:
    """A random checkpoint of `shape`, written by transformers' save_pretrained."""
    import torch
    import transformers

    fields = dict(SHAPES[shape])
    kind = fields.pop("model_type")
    config = transformers.AutoConfig.for_model(kind, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(directory)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def measure_import(directory: str, n_devices: int) -> dict:
    """Runs in the child: imports onto a mesh of n_devices (fsdp) and samples memory."""
    import jax

    from gptjax import sharding
    from gptjax.hf.model import import_model

    peak = {"RssAnon": 0, "RssFile": 0}
    before = _status()
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=n_devices), jax.devices()[:n_devices])
    start = time.perf_counter()
    cfg, params, note = import_model(directory, mesh)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
    return {
        "note": note,
        "seconds": seconds,
        "param_bytes": nbytes,
        "params": get_count(cfg),
        "devices": n_devices,
        "rss_anon_before": before["RssAnon"],
        "peak_rss_anon": peak["RssAnon"],
        "peak_rss_file": peak["RssFile"],
    }


def get_count(cfg) -> int:
    from gptjax.model import get_model

    return get_model(cfg).param_count()


def run(args) -> dict:
    directory = args.dir or os.path.join("runs", "bench", f"{args.shape}_hf")
    if not os.path.exists(os.path.join(directory, "config.json")):
        start = time.perf_counter()
        write_random(directory, args.shape)
        print(
            f"wrote a random {args.shape} checkpoint to {directory} in "
            f"{time.perf_counter() - start:.0f} s"
        )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    )
    code = (
        "import json, sys; from experiments import bench_hf; "
        f"print(json.dumps(bench_hf.measure_import({directory!r}, {args.devices})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"import failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    files = sum(
        os.path.getsize(os.path.join(directory, f))
        for f in os.listdir(directory)
        if f.endswith(".safetensors")
    )
    row.update(shape=args.shape, checkpoint_bytes=files)
    gib = 2**30
    print(row["note"])
    print(
        f"{args.shape}: {row['params'] / 1e9:.2f}B params, checkpoint {files / gib:.2f} GiB, "
        f"imported onto {args.devices} devices in {row['seconds']:.1f} s; params "
        f"{row['param_bytes'] / gib:.2f} GiB; peak anonymous memory "
        f"{row['peak_rss_anon'] / gib:.2f} GiB (before import "
        f"{row['rss_anon_before'] / gib:.2f} GiB), peak mapped file pages "
        f"{row['peak_rss_file'] / gib:.2f} GiB"
    )
    return row
