"""Model, mesh and LM-training presets.

    python -m experiments.bench train                      # benchmarks tiny / small_cpu / gpt2_4l
    python -c "from configs import model; print(model.get_config('gpt2_124m,mesh=tpu_vm'))"

`get_config("MODEL[,mesh=MESH]")` returns a ConfigDict with sections `model`, `mesh`,
`optim`, `train`; `configs/pipeline.py` builds every stage's config from these presets.

Model fields (gptjax/model.py:ModelConfig):
  vocab_size     padded vocabulary (the tokenizer's size rounded up; a multiple of 128 on TPU)
  d_model, n_layers, n_heads, d_ff   width, depth, query heads, MLP hidden size
  n_kv_heads     key/value heads: = n_heads is MHA, fewer is grouped-query attention
  max_len        longest sequence (sizes the learned position table)
  positions      learned (GPT-2) | rope (LLaMA)
  norm           layernorm (GPT-2) | rmsnorm (LLaMA)
  mlp            gelu (GPT-2, tanh approximation) | swiglu (LLaMA)
  tie_embeddings unembedding = embedding^T (GPT-2) or a separate matrix (LLaMA)
  head           lm (logits over the vocabulary) | scalar (one value per position: RM, value)
  dropout        on embeddings and residual branches; 0 in every preset (no overfitting at
                 these data sizes worth the cost)
  param_dtype, dtype   storage and compute dtype: float32 on CPU (XLA:CPU bf16 matmuls are
                 slower than fp32), bfloat16 compute on TPU
  scan_layers    one lax.scan over layers (fast compiles for deep models) or unrolled
  remat          none | dots | full: activation recomputation in the backward pass
"""

import ml_collections

# name -> model fields (everything not named takes ModelConfig's default).
MODELS = {
    # ~0.85M params: learns the built-in world in minutes on 2 CPU cores. Rotary
    # positions: with a learned position table the facts were stored with the absolute
    # position of a bio's opening name and QA about them failed (13-31% vs 59% with
    # RoPE on the same data; see gptjax/world/documents.py).
    "tiny": dict(
        vocab_size=512,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        d_ff=512,
        max_len=64,
        positions="rope",
    ),
    # ~12M params: a bigger CPU model for checking trends.
    "small_cpu": dict(
        vocab_size=4096, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1536, max_len=256
    ),
    # The benchmark's mid-size GPT-2-style config: 4 layers, width 256, T=128.
    "gpt2_4l": dict(
        vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=1024, max_len=128
    ),
    "gpt2_124m": dict(
        vocab_size=50304,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=12,
        d_ff=3072,
        max_len=1024,
        dtype="bfloat16",
        remat="dots",
    ),
    "gpt2_350m": dict(
        vocab_size=50304,
        d_model=1024,
        n_layers=24,
        n_heads=16,
        n_kv_heads=16,
        d_ff=4096,
        max_len=1024,
        dtype="bfloat16",
        remat="dots",
    ),
    "gpt2_1.5b": dict(
        vocab_size=50304,
        d_model=1600,
        n_layers=48,
        n_heads=25,
        n_kv_heads=25,
        d_ff=6400,
        max_len=1024,
        dtype="bfloat16",
        remat="full",
    ),
    "llama_1b": dict(
        vocab_size=32768,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        max_len=2048,
        positions="rope",
        rope_theta=500_000.0,
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        dtype="bfloat16",
        remat="dots",
    ),
    "llama_7b": dict(
        vocab_size=32768,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        d_ff=11008,
        max_len=2048,
        positions="rope",
        norm="rmsnorm",
        mlp="swiglu",
        tie_embeddings=False,
        dtype="bfloat16",
        remat="full",
    ),
}

# name -> mesh fields. One axis may be -1 (= whatever the device count leaves).
MESHES = {
    "cpu": dict(data=1, fsdp=-1, tensor=1),
    # 8 simulated CPU devices: every axis > 1, to exercise FSDP and tensor sharding at once.
    "cpu8": dict(data=2, fsdp=2, tensor=2),
    # One TPU VM (v4-8 / v5e-8): FSDP over all chips, no tensor parallelism needed < ~7B.
    "tpu_vm": dict(data=1, fsdp=-1, tensor=1),
    # Multi-host pod slice: FSDP within, tensor parallel 4 for the biggest models.
    "pod": dict(data=1, fsdp=-1, tensor=4, multihost=True),
}

# Default train settings per model preset: (batch_size, seq_len, steps, lr).
TRAIN = {
    "tiny": (32, 64, 300, 3e-3),
    "small_cpu": (16, 256, 300, 1e-3),
    "gpt2_4l": (16, 128, 300, 1e-3),
    "gpt2_124m": (256, 1024, 100_000, 6e-4),
    "gpt2_350m": (256, 1024, 100_000, 3e-4),
    "gpt2_1.5b": (512, 1024, 100_000, 2e-4),
    "llama_1b": (512, 2048, 100_000, 3e-4),
    "llama_7b": (1024, 2048, 100_000, 3e-4),
}


def model_config(name: str) -> ml_collections.ConfigDict:
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODELS)}")
    from gptjax.model import ModelConfig  # the defaults live with the model

    fields = {**ModelConfig().__dict__, **MODELS[name]}
    return ml_collections.ConfigDict(fields)


def mesh_config(name: str) -> ml_collections.ConfigDict:
    if name not in MESHES:
        raise ValueError(f"unknown mesh preset {name!r}; known: {sorted(MESHES)}")
    from gptjax.sharding import MeshConfig

    return ml_collections.ConfigDict({**MeshConfig().__dict__, **MESHES[name]})


def optim_config(lr: float) -> ml_collections.ConfigDict:
    from gptjax.optim import OptimConfig

    return ml_collections.ConfigDict({**OptimConfig().__dict__, "lr": lr})


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
    """'gpt2_124m,mesh=tpu_vm' -> ('gpt2_124m', {'mesh': 'tpu_vm'})."""
    name, *rest = (arg or "tiny").split(",")
    opts = {}
    for item in rest:
        if "=" not in item:
            raise ValueError(f"config arg item {item!r} is not key=value (in {arg!r})")
        k, v = item.split("=", 1)
        opts[k] = v
    return name, opts


def get_config(arg: str = "tiny") -> ml_collections.ConfigDict:
    name, opts = parse_arg(arg)
    unknown = set(opts) - {"mesh"}
    if unknown:
        raise ValueError(f"unknown config arg options {sorted(unknown)} in {arg!r}; known: mesh")
    cpu = name in ("tiny", "small_cpu", "gpt2_4l")
    batch_size, seq_len, steps, lr = TRAIN[name] if name in TRAIN else TRAIN["tiny"]
    config = ml_collections.ConfigDict()
    config.model = model_config(name)
    config.mesh = mesh_config(opts.get("mesh", "cpu" if cpu else "tpu_vm"))
    config.optim = optim_config(lr)
    config.train = ml_collections.ConfigDict(
        dict(batch_size=batch_size, seq_len=seq_len, steps=steps, seed=0, z_loss=0.0)
    )
    return config
