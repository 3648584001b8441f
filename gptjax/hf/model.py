"""Import a Hugging Face model directory as (ModelConfig, params), and export params back.

cfg, params, note = import_model("/path/to/Llama-3.2-1B", mesh)
export_model("/tmp/out", params, cfg, base=read_config("/path/to/Llama-3.2-1B"))
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from jax.sharding import Mesh

from gptjax import sharding
from gptjax.hf import config as hf_config
from gptjax.hf import safetensors, weights
from gptjax.layers import DTYPES as DTYPE
from gptjax.model import HEAD_KEYS, ModelConfig, Params, get_model

read_config = hf_config.read


def load_params(directory: str, cfg: ModelConfig, shardings=None) -> Params:
    """The checkpoint's params for `cfg` (a ModelConfig of its architecture), each placed
    with its sharding (a tree like the params; None: the default device)."""
    kind = hf_config.model_type(hf_config.read(directory), directory)
    return weights.load(directory, kind, cfg, shardings)


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
    params = load_params(directory, cfg, shardings)
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
    matches (hf_config.export_type). Returns the architecture.

    A reward model (cfg.head "scalar") is written as the architecture's
    `*ForSequenceClassification` with one label: `score.weight` is the head's weight, and
    the reward is read at the last non-pad token (config.json's pad_token_id, which callers
    pass). The head's bias, a constant shift of every reward that no ranking sees, has no
    place there: it is kept in config.json as `gptjax_score_bias`. An RM that adds the
    reference model's log-prob (score_logp != 0) cannot be expressed and is refused.
    """
    kind = hf_config.model_type(base, "base config.json") if base else hf_config.export_type(cfg)
    cfg = hf_config.export_config(cfg, kind)
    head = {}
    if cfg.head == "scalar":
        logp = float(np.asarray(params["score_logp"]))
        if logp != 0.0:
            raise ValueError(
                f"the reward model adds score_logp={logp:g} x the reference model's log-prob, "
                "which a sequence classifier cannot compute: export an RM trained with "
                "rm.ref_logprob=False"
            )
        head = {"score.weight": np.asarray(params["score_w"], np.float32)[None, :]}
        config_fields = dict(
            config_fields,
            num_labels=1,
            gptjax_score_bias=float(np.asarray(params["score_b"])),
        )
        params = {k: v for k, v in params.items() if k not in HEAD_KEYS}
        # The trunk as an LM config; with tied embeddings the table needs no unembedding.
        lm_cfg = dataclasses.replace(cfg, head="lm", tie_embeddings=True)
    else:
        lm_cfg = cfg
    os.makedirs(out_dir, exist_ok=True)
    tensors = weights.to_tensors(params, kind, lm_cfg)
    tensors.update({k: v.astype(DTYPE[cfg.param_dtype]) for k, v in head.items()})
    safetensors.write_sharded(out_dir, tensors, max_shard_bytes)
    hf = hf_config.from_model_config(cfg, kind, base, **config_fields)
    if cfg.head == "scalar":
        hf["architectures"] = [hf_config.CLASSIFIERS[kind]]
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return kind
