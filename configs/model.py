"""Model, mesh and slice presets, by name; configs/pipeline.py builds every stage's config
from them (`get_config("MODEL[,mesh=MESH]")`).

    python -c "from configs import pipeline; print(pipeline.get_config('gpt2_124m').model)"

Each model field is documented once, in gptjax/model.py ModelConfig; MESHES' fields in
gptjax/sharding.py MeshConfig.
"""

import ml_collections

from gptjax import config as config_lib
from gptjax.model import ModelConfig
from gptjax.sharding import MeshConfig

# The presets that run on a CPU (configs/pipeline.py's runlocal block); the rest are sized
# for TPU slices (TARGETS).
CPU_PRESETS = ("tiny", "small_cpu", "gpt2_4l")

# name -> model fields (everything not named takes ModelConfig's default).
MODELS = {
    # ~0.85M params: learns the built-in world in minutes on 2 CPU cores. Rotary
    # positions: with a learned table, QA about facts failed (docs/notes.md).
    "tiny": dict(
        vocab_size=512,
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        d_ff=512,
        max_len=64,
        positions="rope",
        # 4 layers: unrolled, training takes 8% less time and decoding reads one KV cache
        # per layer in place; the same numbers as the scan (BUILD.md, Per op).
        scan_layers=False,
    ),
    # ~12M params: a bigger CPU model for checking trends.
    "small_cpu": dict(
        vocab_size=4096, d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1536, max_len=256
    ),
    # The benchmark's mid-size GPT-2-style config: 4 layers, width 256, T=128.
    "gpt2_4l": dict(
        vocab_size=512,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=4,
        d_ff=1024,
        max_len=128,
        scan_layers=False,  # as tiny's
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
        # "dots" keeps T x T attention intermediates of every layer for the backward
        # pass: 39 GiB per v5e chip at one 2048-token row (experiments/aot.py).
        remat="full",
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
    # GPT-3 175B (Brown et al. 2020, table 2.1): 96 layers, width 12288, 96 heads.
    "gpt3_175b": dict(
        vocab_size=50304,
        d_model=12288,
        n_layers=96,
        n_heads=96,
        n_kv_heads=96,
        d_ff=49152,
        max_len=2048,
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
    # Multi-host pod slice, FSDP over every chip (models up to ~10B).
    "pod_fsdp": dict(data=1, fsdp=-1, tensor=1, multihost=True),
}

# Pretraining settings per TPU preset: (batch_size, seq_len, steps, lr).
TRAIN = {
    "gpt2_124m": (256, 1024, 100_000, 6e-4),
    "gpt2_350m": (256, 1024, 100_000, 3e-4),
    "gpt2_1.5b": (512, 1024, 100_000, 2e-4),
    "llama_1b": (512, 2048, 100_000, 3e-4),
    "llama_7b": (1024, 2048, 100_000, 3e-4),
    # 1536 x 2048 = 3.1M tokens per step, GPT-3's batch for 175B.
    "gpt3_175b": (1536, 2048, 100_000, 6e-5),
}


# TPU presets: the slice each is sized for (topology, Cloud TPU accelerator type, mesh
# preset or fields: the pipeline config's default mesh for it).
# A v5e chip has one TensorCore and v5e-N counts chips; v4 / v5p have two per chip and
# their -N counts TensorCores: v5p-64 = 32 chips (2x4x4), v5p-1024 = 512 (8x8x8).
# Check that every stage fits before booking the slice, from any CPU host with libtpu:
#   python -m experiments.aot --config=configs/pipeline.py:NAME
# then launch on the slice (on every host of a multi-host one, e.g. with `gcloud compute
# tpus tpu-vm ssh SLICE --worker=all --command=...`):
#   python -m experiments.main --config=configs/pipeline.py:NAME \
#       --workdir=gs://BUCKET/runs/NAME --config.data.pretrain=tfds:lm1b
TARGETS = {
    "gpt2_124m": ("v5e:2x4", "v5litepod-8", "tpu_vm"),
    "gpt2_350m": ("v5e:2x4", "v5litepod-8", "tpu_vm"),
    # Pretraining at one 2048-token row per chip and microbatch needs 18 GiB per chip
    # with FSDP 16, 23 with FSDP 4 x data 4, 3.5 with FSDP 4 x tensor 4 (tensor groups
    # inside hosts).
    "llama_1b": ("v5e:4x4", "v5litepod-16", "pod"),
    "llama_7b": ("v5p:2x4x4", "v5p-64", "pod_fsdp"),
    # FSDP over all 512 chips needs 1.3 TiB per chip (as above, whole microbatches'
    # activations on every chip); tensor parallel 8 x FSDP 64 fits. Tensor 4 does not lay
    # out on an 8x8x8 torus (each mesh axis must be a product of physical axes); 8 spans
    # two 4-chip hosts, which then load the same batch rows (sharding.host_blocks).
    "gpt3_175b": ("v5p:8x8x8", "v5p-1024", dict(data=1, fsdp=-1, tensor=8, multihost=True)),
}

# What makes each TPU preset fit its slice, every stage (checked by experiments/aot.py;
# table in BUILD.md): gradient-accumulation microbatches, shorter RM sequences, fewer PPO
# rollouts or ptx rows (PPO has no accumulation inside a minibatch). The entries were
# sized before activations were sharded by name (which let XLA keep whole microbatches'
# logits on every chip); an entry is removed only once its preset compiles without it at
# fewer GiB per chip than with it then (gpt2_124m, llama_7b: BUILD.md). The presets
# recompiled since kept the rest: gpt2_124m pretrain without accumulation needs 16.7 GiB
# (a v5e has 16), its RM 11.8 (10.4 with it before), llama_7b pretrain 87.0 (63.4).
FITS = {
    "gpt2_124m": {
        "pretrain.optim.grad_accum_steps": 8,
        "rm.optim.grad_accum_steps": 8,
    },
    "gpt2_350m": {
        "pretrain.optim.grad_accum_steps": 16,
        "sft.optim.grad_accum_steps": 8,
        "rm.seq_len": 512,
        "rm.optim.grad_accum_steps": 8,
        # 512 rollouts: the update needs 25 GiB per chip (minibatches of 128 x 192 tokens).
        "ppo.prompts_per_iteration": 256,
        "ppo_ptx.prompts_per_iteration": 256,
        # 4 minibatches of 64 rollouts + 8 ptx rows x 1024: 18.25 GiB per chip. 8 minibatches
        # of 32 rollouts + 8 ptx rows (ptx_batch_size must divide by minibatches x 8 chips).
        "ppo_ptx.minibatches": 8,
        "ppo_ptx.ptx_batch_size": 64,
    },
    "llama_1b": {  # 2 rows of 2048 tokens per tensor group and microbatch
        "pretrain.optim.grad_accum_steps": 64,
        "sft.optim.grad_accum_steps": 16,
        # A comparison is a prompt and a reply, far below 2048 tokens.
        "rm.seq_len": 1024,
        "rm.optim.grad_accum_steps": 16,
        "ppo_ptx.ptx_batch_size": 64,
    },
    "llama_7b": {
        "pretrain.optim.grad_accum_steps": 8,
    },
    "gpt3_175b": {
        "pretrain.optim.grad_accum_steps": 24,
        "sft.optim.grad_accum_steps": 2,
        "rm.seq_len": 512,
    },
}


def target_mesh(name: str) -> ml_collections.ConfigDict:
    mesh = TARGETS[name][2]
    if isinstance(mesh, str):
        return mesh_config(mesh)
    return config_lib.section(MeshConfig(), **mesh)


def apply_fit(config: ml_collections.ConfigDict, name: str) -> None:
    """Sets FITS[name]'s fields (dotted paths) on a pipeline config."""
    for path, value in FITS.get(name, {}).items():
        *parents, leaf = path.split(".")
        section = config
        for p in parents:
            section = section[p]
        section[leaf] = value


def model_config(name: str) -> ml_collections.ConfigDict:
    if name not in MODELS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODELS)}")
    return config_lib.section(ModelConfig(), **MODELS[name])


def mesh_config(name: str) -> ml_collections.ConfigDict:
    if name not in MESHES:
        raise ValueError(f"unknown mesh preset {name!r}; known: {sorted(MESHES)}")
    return config_lib.section(MeshConfig(), **MESHES[name])


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
