"""A run's directory and the processes that write it: where each stage's files go, what
a stage is given (`StageContext`), and the multi-host rules for preparing and writing
files (process 0 first or alone, the others waiting).

Stages find their inputs in the same workdir (`<workdir>/<stage>/`, the tokenizer at
`<workdir>/tokenizer/spm.model`, prepared data in `<workdir>/data`) or at explicit paths
in the config (a stage section's `<role>_from`, e.g. `sft.init_from`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import ml_collections

from gptjax import config as config_lib
from gptjax import sharding

T = TypeVar("T")


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What a stage runner is given: the config, the workdir, its own instance name (also
    its config section and its directory's name) and the stage instances it reads, by
    role (experiments/pipeline.py declares them)."""

    config: ml_collections.ConfigDict
    workdir: str
    name: str
    inputs: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # The devices the stage's mesh spans; None: every device of every process.
    devices: tuple | None = None

    def mesh(self):
        """The stage's device mesh (config.mesh over `devices`)."""
        return sharding.make_mesh(initialize_distributed(self.config), self.devices)

    @property
    def section(self) -> ml_collections.ConfigDict:
        return self.config[self.name]

    @property
    def dir(self) -> str:
        return stage_dir(self.workdir, self.name)

    def input_dir(self, role: str) -> str:
        return stage_dir(self.workdir, self.inputs[role])

    def checkpoints(self, role: str) -> str:
        """The checkpoint directory of the stage read as `role`: the section's
        `<role>_from` if set (another run's output), else `<workdir>/<stage>/checkpoints`."""
        override = self.section.get(f"{role}_from", "")
        return override or os.path.join(self.input_dir(role), "checkpoints")


def initialize_distributed(config) -> sharding.MeshConfig:
    """Joins the other processes of a multi-host run (see sharding.MeshConfig); a no-op
    otherwise. Must run before anything touches a device, hence in every helper that a
    stage may call first."""
    mesh_cfg = config_lib.from_dict(sharding.MeshConfig, config.mesh, "mesh")
    sharding.maybe_initialize_distributed(mesh_cfg)
    return mesh_cfg


def multihost(config) -> bool:
    """Whether this process runs with others (sharding.MeshConfig: config fields or the
    environment)."""
    mesh_cfg = config_lib.from_dict(sharding.MeshConfig, config.mesh, "mesh")
    return sharding.distributed_kwargs(mesh_cfg) is not None


def make_mesh(config):
    return sharding.make_mesh(initialize_distributed(config))


def process_0_first(what: str, prepare: Callable[[], T]) -> T:
    """prepare() on process 0, then on the other processes once it has finished (after
    `initialize_distributed`: without it every process thinks it is alone).

    Preparing data or training the tokenizer writes into the workdir, and two processes
    writing one path race (tfds renames its temporary directory onto one that is already
    there). On a shared workdir the others then only load what process 0 wrote; on a
    host-local one each prepares its own copy, identical because preparation is
    deterministic (sources.get_tokenizer checks).
    """
    if jax.process_count() == 1:
        return prepare()
    from jax.experimental import multihost_utils

    if jax.process_index() != 0:
        multihost_utils.sync_global_devices(f"gptjax: {what} prepared")
        return prepare()
    try:
        return prepare()
    finally:  # also on an error, which the others then meet themselves, not a hang
        multihost_utils.sync_global_devices(f"gptjax: {what} prepared")


def on_process_0(what: str, fn: Callable[[], T]) -> T | None:
    """fn() on process 0 only, the others waiting until it is done (None for them).

    For files every process would write alike (results, gates, reports, comparisons) into
    the shared workdir of a multi-host run: one writer, and nobody reads a half-written file.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    try:
        return fn() if jax.process_index() == 0 else None
    finally:
        multihost_utils.sync_global_devices(f"gptjax: {what} written")


def write_text(path: str, text: str) -> None:
    """Atomically (temporary file + rename) writes `text` to `path`, from process 0 only."""

    def write():
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    on_process_0(path, write)


def write_json(path: str, obj, **dump_kwargs) -> None:
    write_text(path, json.dumps(obj, **{"indent": 2, **dump_kwargs}))


def resolved_config_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)
