"""Typed, validated views of ml_collections configs, built before anything compiles.

Configs stay ml_collections ConfigDicts (so `--config.model.d_model=256` works); each
library module reads a frozen dataclass made by `from_dict`, which rejects unknown keys
and wrong types with the full field name.
"""

from __future__ import annotations

import dataclasses
import typing

from gptjax.errors import ConfigError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def from_dict(cls, d, prefix: str):
    """Builds dataclass `cls` from a mapping; unknown keys and wrong types name the field."""
    d = dict(d.items()) if hasattr(d, "items") else dict(d)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}", f"unknown field; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        want = _SCALARS.get(getattr(hints[name], "__name__", ""))
        if want is None:
            continue
        ok = isinstance(value, want) and not (want is not bool and isinstance(value, bool))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            d[name], ok = float(value), True
        if not ok:
            raise ConfigError(
                f"{prefix}.{name}",
                f"expected {want.__name__}, got {type(value).__name__} {value!r}",
            )
    obj = cls(**d)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 32  # global batch (all hosts, all devices), in sequences
    seq_len: int = 64
    steps: int = 300
    seed: int = 0
    z_loss: float = 0.0

    def validate(self, prefix: str = "train") -> None:
        for name in ("batch_size", "seq_len", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class LMSetup:
    model: typing.Any
    mesh: typing.Any
    optim: typing.Any
    train: TrainConfig


def parse_lm(config, n_devices: int | None = None) -> LMSetup:
    """Validates the model/mesh/optim/train sections and how they fit together."""
    from gptjax.model import ModelConfig
    from gptjax.optim import OptimConfig
    from gptjax.sharding import MeshConfig

    model = from_dict(ModelConfig, config.model, "model")
    mesh = from_dict(MeshConfig, config.mesh, "mesh")
    optim = from_dict(OptimConfig, config.optim, "optim")
    train = from_dict(TrainConfig, config.train, "train")
    if train.seq_len > model.max_len:
        raise ConfigError("train.seq_len", f"{train.seq_len} exceeds model.max_len={model.max_len}")
    if n_devices is not None:
        data, fsdp, tensor = mesh.shape(n_devices)
        dp = data * fsdp
        per = dp * optim.grad_accum_steps
        if train.batch_size % per:
            raise ConfigError(
                "train.batch_size",
                f"{train.batch_size} is not divisible by data*fsdp*grad_accum_steps "
                f"= {data}*{fsdp}*{optim.grad_accum_steps} = {per}",
            )
        for field in ("n_heads", "n_kv_heads", "d_ff", "vocab_size"):
            if getattr(model, field) % tensor:
                raise ConfigError(
                    f"model.{field}",
                    f"{getattr(model, field)} is not divisible by mesh.tensor={tensor}",
                )
        if model.d_model % fsdp:
            raise ConfigError(
                "model.d_model", f"{model.d_model} is not divisible by mesh.fsdp={fsdp}"
            )
    return LMSetup(model, mesh, optim, train)


# Config fields that name files or directories; data specs are KIND:PATH.
_PATH_FIELDS = ("path", "data_dir", "init_from", "policy_from", "rm_from")
_SPEC_FIELDS = ("pretrain", "demos", "comparisons", "prompts")


def check_paths(config, prefix: str = "") -> None:
    """No path in the config may contain a `..` component: a config (possibly someone
    else's) cannot reach outside the workdir or the directories it names explicitly."""
    for key, value in config.items():
        field = f"{prefix}{key}"
        if hasattr(value, "items"):
            check_paths(value, f"{field}.")
            continue
        if not isinstance(value, str) or not value:
            continue
        if key in _SPEC_FIELDS and ":" in value:
            path = value.split(":", 1)[1]
        elif key in _PATH_FIELDS:
            path = value
        else:
            continue
        if ".." in path.replace("\\", "/").split("/"):
            raise ConfigError(
                field, f"{value!r}: '..' is not allowed in paths; give an absolute path"
            )
