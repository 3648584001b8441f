"""Import a Hugging Face model directory as (ModelConfig, params), and export params back.

cfg, params, note = import_model("/path/to/Llama-3.2-1B", mesh)
export_model("/tmp/out", params, cfg, base=read_config("/path/to/Llama-3.2-1B"))
"""

from __future__ import annotations

import json
import os
import time

from jax.sharding import Mesh

from gptjax import sharding
from gptjax.hf import config as hf_config
from gptjax.hf import safetensors, weights
from gptjax.model import ModelConfig, Params, get_model

read_config = hf_config.read


def import_model(directory: str, mesh: Mesh | None = None, **overrides):
    """(ModelConfig, params, note) for the checkpoint in `directory`. With a mesh, each
    param is placed with its sharding (gptjax/sharding.py RULES) shard by shard. `overrides`
    are ModelConfig fields (e.g. param_dtype="float32", max_len=512). The note says what
    the conversion did to dtypes."""
    hf = hf_config.read(directory)
    path = os.path.join(directory, "config.json")
    cfg = hf_config.to_model_config(hf, path, **overrides)
    kind = hf_config.model_type(hf, path)
    shardings = None
    if mesh is not None:
        model = get_model(cfg)
        shardings = sharding.param_shardings(mesh, model.logical_axes, model.abstract_params)
    start = time.perf_counter()
    params = weights.load(directory, kind, cfg, shardings)
    stored = hf_config.checkpoint_dtype(hf)
    kept = "kept" if stored == cfg.param_dtype else f"cast to {cfg.param_dtype}"
    note = (
        f"{kind} from {directory}: {get_model(cfg).param_count() / 1e6:.1f}M params, "
        f"stored {stored}, {kept}; compute dtype {cfg.dtype}; "
        f"read in {time.perf_counter() - start:.1f} s"
    )
    return cfg, params, note


def export_model(
    out_dir: str,
    params: Params,
    cfg: ModelConfig,
    base: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
    **config_fields,
) -> str:
    """Writes config.json and safetensors for `params` into out_dir (created), as the
    architecture of `base` (an imported model's config.json) or the one gptjax's config
    matches (hf_config.export_type). Returns the architecture."""
    kind = hf_config.model_type(base, "base config.json") if base else hf_config.export_type(cfg)
    cfg = hf_config.export_config(cfg, kind)
    os.makedirs(out_dir, exist_ok=True)
    tensors = weights.to_tensors(params, kind, cfg)
    safetensors.write_sharded(out_dir, tensors, max_shard_bytes)
    hf = hf_config.from_model_config(cfg, kind, base, **config_fields)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return kind
