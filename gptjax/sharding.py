"""The one place a device mesh is built and sharding is decided.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params and optimizer
state sharded, ZeRO-3 style), `tensor` (Megatron-style: heads and MLP hidden split).
Weights carry logical axis names (see gptjax/model.py); RULES maps each name to mesh
axes. A name with no rule is an error: silently replicating a weight that was meant to be
sharded is the bug that only shows as out-of-memory on a pod.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax import config as config_lib
from gptjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Batches are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (None = replicated). The whole sharding of the model.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "kv": None,  # head dim: small, and attention contracts over it.
    "layers": None,  # scanned over; sharding it would serialise layers across devices.
    "pos": None,
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Multi-host pods: call jax.distributed.initialize() before anything touches devices.
    multihost: bool = False
    coordinator_address: str = ""  # empty: auto-detected on Cloud TPU
    num_processes: int = 0  # 0: auto-detected
    process_id: int = -1  # -1: auto-detected

    @classmethod
    def from_dict(cls, d, prefix: str = "mesh") -> MeshConfig:
        return config_lib.from_dict(cls, d, prefix)

    def shape(self, n_devices: int, prefix: str = "mesh") -> tuple[int, int, int]:
        """Resolves the one -1 axis so the sizes multiply to n_devices."""
        sizes = [self.data, self.fsdp, self.tensor]
        for name, s in zip(MESH_AXES, sizes):
            if not isinstance(s, int) or (s < 1 and s != -1):
                raise ConfigError(f"{prefix}.{name}", f"must be a positive int or -1, got {s!r}")
        if sizes.count(-1) > 1:
            raise ConfigError(
                prefix, f"at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}"
            )
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            i = sizes.index(-1)
            if n_devices % known:
                raise ConfigError(
                    f"{prefix}.{MESH_AXES[i]}",
                    f"-1 cannot be resolved: the other axes ({known}) do not divide "
                    f"the {n_devices} devices",
                )
            sizes[i] = n_devices // known
        if math.prod(sizes) != n_devices:
            raise ConfigError(
                prefix,
                f"data*fsdp*tensor = {math.prod(sizes)} "
                f"{dict(zip(MESH_AXES, sizes))} but there are {n_devices} devices",
            )
        return tuple(sizes)


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host: every process must call this before touching jax.devices()."""
    if not cfg.multihost or jax.distributed.is_initialized():
        return
    kwargs = {}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    jax.distributed.initialize(**kwargs)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.shape(len(devices))
    # Auto axis types: jax.make_mesh defaults to Explicit, under which gathering from a
    # sharded array (the embedding lookup, a batch permutation) is a sharding type error.
    device_grid = np.asarray(devices).reshape(shape) if len(devices) == 1 else None
    if device_grid is not None:
        return Mesh(device_grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules=None) -> PartitionSpec:
    rules = RULES if rules is None else rules
    spec, used = [], set()
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(
                f"logical axis {name!r} matches no sharding rule; rules: {sorted(rules)}"
            )
        mesh_axes = rules[name]
        if isinstance(mesh_axes, str):
            mesh_axes = (mesh_axes,)
        # A mesh axis can shard only one dim of an array; later dims stay replicated.
        mesh_axes = tuple(a for a in (mesh_axes or ()) if a not in used)
        used.update(mesh_axes)
        spec.append(mesh_axes if len(mesh_axes) > 1 else (mesh_axes[0] if mesh_axes else None))
    return PartitionSpec(*spec)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, str) or a is None for a in x)


def param_shardings(mesh: Mesh, logical_axes, abstract_params=None, rules=None):
    """NamedSharding per param. With abstract_params, checks every sharded dim divides."""
    specs = jax.tree.map(lambda ax: logical_to_spec(ax, rules), logical_axes, is_leaf=_is_axes)
    if abstract_params is not None:
        flat_specs = jax.tree_util.tree_leaves_with_path(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
        )
        flat_params = jax.tree.leaves(abstract_params)
        for (path, spec), leaf in zip(flat_specs, flat_params):
            for dim, axes in zip(leaf.shape, spec):
                if axes is None:
                    continue
                size = math.prod(
                    mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)
                )
                if dim % size:
                    raise ConfigError(
                        "mesh",
                        f"param {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                        f"sharded {spec}: dim {dim} is not divisible by mesh size {size}",
                    )
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over all data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def sharded_init(init_fn: Callable, out_shardings, *args):
    """Runs init_fn under jit with out_shardings, so each device creates only its shard.

    The params never exist whole on one device: the compiled init writes each shard in place.
    """
    return jax.jit(init_fn, out_shardings=out_shardings)(*args)


def replicated_params(params, min_bytes: int = 1 << 20) -> list[tuple[str, int]]:
    """(path, bytes) of arrays at least min_bytes that are fully replicated on >1 device.

    MaxText-style guard: a large replicated weight is a rule-table bug that costs memory
    on every chip.
    """
    found = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(x, "sharding", None)
        nbytes = x.size * x.dtype.itemsize
        if sharding is None or nbytes < min_bytes or len(sharding.device_set) == 1:
            continue
        if sharding.is_fully_replicated:
            found.append((jax.tree_util.keystr(path), int(nbytes)))
    return found


def host_batch_slice(global_batch_size: int) -> slice:
    """This process's rows of the global batch (each host feeds its own slice)."""
    n, i = jax.process_count(), jax.process_index()
    if global_batch_size % n:
        raise ConfigError(
            "batch_size", f"global batch {global_batch_size} not divisible by {n} processes"
        )
    per = global_batch_size // n
    return slice(i * per, (i + 1) * per)


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each host's slice into global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def log_replicated(params, min_bytes: int = 1 << 20) -> None:
    for path, nbytes in replicated_params(params, min_bytes):
        logging.warning("param %s (%d bytes) is fully replicated", path, nbytes)
