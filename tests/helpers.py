"""Tiny shapes shared by the tests (T <= 32, <= 2 layers, small vocab)."""

import functools

import jax
import numpy as np

from gptjax.model import ModelConfig

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)


def tiny_model_config(**overrides) -> ModelConfig:
    return ModelConfig(**{**TINY, **overrides})


@functools.cache
def jitted_apply(model):
    """model.apply as one jitted program per shape, as the steps and the sampler run it:
    called eagerly it compiles one program per op, which slows the suite."""
    return jax.jit(model.apply)


def lm_batch(tokens_BxT, segment_ids_BxT=None, positions_BxT=None, loss_mask_BxT=None):
    """A batch dict in the format every train step takes (see gptjax/data)."""
    tokens = np.asarray(tokens_BxT, np.int32)
    seg = np.ones_like(tokens) if segment_ids_BxT is None else np.asarray(segment_ids_BxT, np.int32)
    if positions_BxT is None:
        positions_BxT = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    mask = (seg != 0).astype(np.float32) if loss_mask_BxT is None else loss_mask_BxT
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.asarray(positions_BxT, np.int32),
        "loss_mask": np.asarray(mask, np.float32),
    }


def random_batch(rng: np.random.Generator, b: int, t: int, vocab: int):
    return lm_batch(rng.integers(3, vocab, size=(b, t)))


# Command-line overrides that shrink the tiny pipeline to test size.
TINY_CLI = [
    "--config.model.d_model=32",
    "--config.model.n_layers=2",
    "--config.model.n_heads=4",
    "--config.model.n_kv_heads=4",
    "--config.model.d_ff=64",
    "--config.model.max_len=32",
    "--config.pretrain.seq_len=32",
    "--config.pretrain.batch_size=8",
    "--config.pretrain.eval_batches=2",
    "--config.pretrain.log_every=1",
    "--config.pretrain.optim.warmup_steps=2",
    "--config.tokenizer.vocab_size=320",
]


def write_text_corpus(path, n_paragraphs: int = 300, seed: int = 0) -> str:
    """A small generated text: blank-line-separated paragraphs from a word bigram model."""
    rng = np.random.default_rng(seed)
    words = [
        "the",
        "cat",
        "dog",
        "sat",
        "ran",
        "on",
        "mat",
        "rug",
        "and",
        "then",
        "slept",
        "ate",
        "a",
        "big",
        "red",
        "fox",
        "saw",
        "it",
        "under",
        "tree",
    ]
    succ = {w: rng.choice(len(words), size=3, replace=False) for w in words}
    paragraphs = []
    for _ in range(n_paragraphs):
        w, out = words[rng.integers(len(words))], []
        for _ in range(rng.integers(8, 30)):
            out.append(w)
            w = words[rng.choice(succ[w])]
        paragraphs.append(" ".join(out) + ".")
    with open(path, "w") as f:
        f.write("\n\n".join(paragraphs) + "\n")
    return str(path)


def xla_flags(n_devices: int) -> str:
    """XLA_FLAGS of every test process: n simulated CPU devices, LLVM at -O0 and XLA:CPU's
    older elemental fusion emitters instead of its MLIR fusion emitters. The suite compiles
    hundreds of tiny programs and runs each for milliseconds: -O0 compiles a tiny train step
    a quarter faster than -O1, the elemental emitters twice as fast again, and the suite
    runs about a third faster (BUILD.md, Tests). They change results in the last bits only
    (BUILD.md, reproducibility), and a test compares runs made under the same flags."""
    return (
        f"--xla_force_host_platform_device_count={n_devices} --xla_backend_optimization_level=0"
        " --xla_cpu_use_fusion_emitters=false"
    )


def subprocess_env(n_devices: int = 1, pipeline_flags: bool = False) -> dict:
    """Environment for a child `python -m experiments...`: n CPU devices, the shared cache,
    the suite's flags (xla_flags) or, with pipeline_flags, XLA's default optimisation level
    as the pipeline runs it."""
    import os

    import jax

    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={n_devices}"
        if pipeline_flags
        else xla_flags(n_devices)
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


SFT_CLI = [
    "--config.sft.seq_len=32",
    "--config.sft.batch_size=8",
    "--config.sft.eval_batches=1",
    "--config.sft.log_every=1",
    "--config.sft.optim.warmup_steps=2",
]


def write_demos(path, n: int = 120, seed: int = 0) -> str:
    """prompt/response JSONL: small additions."""
    import json

    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.integers(0, 10, size=2)
            f.write(json.dumps({"prompt": f"what is {a} plus {b}?", "response": f"{a + b}"}) + "\n")
    return str(path)


def config_from_flags(flags, preset: str = "tiny"):
    """The config the command line builds from these --config.* flags."""
    from configs import pipeline

    config = pipeline.get_config(preset)
    for flag in flags:
        key, value = flag[len("--config.") :].split("=", 1)
        *path, last = key.split(".")
        target = config
        for part in path:
            target = target[part]
        target[last] = type(target[last])(value)
    return config
