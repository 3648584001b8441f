"""Typed, validated views of ml_collections configs: the one route from a config section to
the frozen dataclass a library module reads, taken once, before anything compiles.

Configs stay ml_collections ConfigDicts (so `--config.model.d_model=256` works). Each
section's dataclass holds every field's default and its one-line doc, and checks its
values in `__post_init__`, raising ConfigError with the field's name within the section;
`from_dict` also rejects unknown keys and wrong types and prefixes every error with the
section's path (`ppo_ptx.optim.lr`).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable

import ml_collections

from gptjax.errors import ConfigError

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def from_dict(cls, d, prefix: str):
    """Builds dataclass `cls` from a mapping; every error names the field under `prefix`."""
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
    try:
        return cls(**d)
    except ConfigError as e:  # __post_init__ names the field within the section
        raise ConfigError(f"{prefix}.{e.field}", e.detail) from None


def section(obj, **overrides) -> ml_collections.ConfigDict:
    """A config section holding a dataclass's fields (its defaults, then `overrides`)."""
    fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise KeyError(f"{type(obj).__name__} has no field {unknown[0]!r}")
    fields.update(overrides)
    return ml_collections.ConfigDict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    )


def need(ok: bool, field: str, message: str) -> None:
    """One validation rule of a section's `__post_init__`."""
    if not ok:
        raise ConfigError(field, message)


def load_callable(spec: str, field: str) -> Callable:
    """The callable a config field names as "module:function" (a user's labeler, reward
    function); errors name the field. Configs are trusted like code."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(field, f"expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(field, f"cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(field, f"{spec!r} is not callable")
    return fn


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
