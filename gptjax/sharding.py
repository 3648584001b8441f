"""The one place a device mesh is built and sharding is decided.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with params and optimizer
state sharded, ZeRO-3 style), `tensor` (Megatron-style: heads and MLP hidden split).
Weights and activations carry logical axis names (see gptjax/model.py); RULES maps each
name to mesh axes, for both. A name with no rule is an error, and so is a large weight
that the rules leave replicated on a mesh that shards weights: silently replicating what
was meant to be sharded is the bug that only shows as out-of-memory on a pod.

Activations are constrained by name (`constrain`) inside functions traced under their
mesh (`with_mesh`, used by every jitted train, scoring and sampling step): without them,
XLA's propagation is free to keep whole microbatches' activations (logits, MLP hidden)
on every chip of an FSDP mesh. The mesh's axes stay Auto (with Explicit axes,
with_sharding_constraint raises); on a one-device mesh constraints are left out.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from gptjax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
# Batches are split over every data-parallel axis.
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes (None = replicated). The whole sharding of the model, weights
# and activations; a mesh axis shards only one dim of an array (the first that asks), so
# activations [batch, length, embed] are split over the batch axes only.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "length": None,  # sequence positions of activations
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "kv": None,  # head dim: small, and attention contracts over it.
    "layers": None,  # scanned over; sharding it would serialise layers across devices.
    "pos": None,
    "lora": None,  # LoRA rank: small.
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (one may be -1: the rest of the devices) and multi-host set-up.

    Multi-host (several processes, one per host, each seeing its own devices): every
    process runs the same command and `jax.distributed.initialize` joins them before
    anything touches a device. Each argument comes from the config field if set, else
    from the environment, else from JAX's own cluster detection (Cloud TPU, SLURM,
    Open MPI, Kubernetes), which needs none of them:

        GPTJAX_COORDINATOR_ADDRESS  host:port that process 0 listens on
        GPTJAX_NUM_PROCESSES        number of processes
        GPTJAX_PROCESS_ID           this process's id, 0 .. num_processes - 1

    Setting any of them turns `multihost` on, so one config serves both a laptop and a
    pod. On CPU the cross-process collectives run over gloo (JAX's default CPU
    implementation), so 2 processes on localhost are a real multi-host run.
    """

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    multihost: bool = False
    coordinator_address: str = ""  # empty: $GPTJAX_COORDINATOR_ADDRESS or auto-detected
    num_processes: int = 0  # 0: $GPTJAX_NUM_PROCESSES or auto-detected
    process_id: int = -1  # -1: $GPTJAX_PROCESS_ID or auto-detected

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


ENV_COORDINATOR = "GPTJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "GPTJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "GPTJAX_PROCESS_ID"


def _env_int(environ, name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {value!r}") from None


def distributed_kwargs(cfg: MeshConfig, environ=None) -> dict | None:
    """`jax.distributed.initialize` arguments (config field, else environment; absent
    ones are auto-detected by JAX), or None for a single-process run."""
    environ = os.environ if environ is None else environ
    coordinator = cfg.coordinator_address or environ.get(ENV_COORDINATOR, "").strip()
    num_processes = cfg.num_processes or _env_int(environ, ENV_NUM_PROCESSES)
    process_id = cfg.process_id if cfg.process_id >= 0 else _env_int(environ, ENV_PROCESS_ID)
    from_env = any(
        environ.get(k, "").strip() for k in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    )
    if not (cfg.multihost or from_env):
        return None
    if num_processes is not None and num_processes < 1:
        raise ConfigError("mesh.num_processes", f"must be >= 1, got {num_processes}")
    if process_id is not None and num_processes and not 0 <= process_id < num_processes:
        raise ConfigError(
            "mesh.process_id", f"{process_id} is not in 0 .. {num_processes - 1} (num_processes)"
        )
    kwargs = dict(
        coordinator_address=coordinator or None, num_processes=num_processes, process_id=process_id
    )
    return {k: v for k, v in kwargs.items() if v is not None}


def maybe_initialize_distributed(cfg: MeshConfig) -> None:
    """Multi-host: joins this process to the others (see MeshConfig). Every process must
    call it before anything touches a device; a no-op for single-process runs and when
    already initialised."""
    kwargs = distributed_kwargs(cfg)
    if kwargs is None or jax.distributed.is_initialized():
        return
    jax.distributed.initialize(**kwargs)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.shape(len(devices))
    # Auto axis types: jax.make_mesh defaults to Explicit, under which gathering from a
    # sharded array (the embedding lookup, a batch permutation) is a sharding type error.
    axis_types = (AxisType.Auto,) * 3
    if len(devices) == 1:
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    if len({d.process_index for d in devices}) == 1:
        return mesh
    # Each process feeds one block of the batch rows (host_block), so each process's
    # devices must be consecutive along the batch axes; make_mesh may interleave hosts
    # for the physical torus. A stable sort keeps its order within each host.
    by_process = sorted(mesh.devices.flat, key=lambda d: d.process_index)
    return Mesh(np.asarray(by_process).reshape(shape), MESH_AXES, axis_types=axis_types)


# A weight of this many bytes or more, left replicated on a mesh that shards weights (fsdp
# or tensor > 1), is a rule-table error (pure data parallelism replicates by design).
REPLICATED_LIMIT_BYTES = 1 << 20


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


def param_shardings(mesh: Mesh, logical_axes, abstract_params=None, rules=None, limit=None):
    """NamedSharding per param. With abstract_params, checks every sharded dim divides and
    that no param of `limit` bytes or more is left replicated on a mesh that shards
    weights (MaxText's guard against a rule-table bug that costs memory on every chip)."""
    specs = jax.tree.map(lambda ax: logical_to_spec(ax, rules), logical_axes, is_leaf=_is_axes)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    if abstract_params is None:
        return shardings
    flat_specs = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    flat_params = jax.tree.leaves(abstract_params)
    for (path, spec), leaf in zip(flat_specs, flat_params):
        for dim, axes in zip(leaf.shape, spec):
            if axes is None:
                continue
            size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
            if dim % size:
                raise ConfigError(
                    "mesh",
                    f"param {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                    f"sharded {spec}: dim {dim} is not divisible by mesh size {size}",
                )
    if mesh.shape["fsdp"] * mesh.shape["tensor"] > 1:
        placed = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_params,
            shardings,
        )
        limit = REPLICATED_LIMIT_BYTES if limit is None else limit
        for path, shape, nbytes in replicated_params(placed, limit):
            if "_lora_" in path:
                continue  # LoRA adapters: rank-r, replicated on purpose where no axis divides
            raise ConfigError(
                "mesh",
                f"param {path} of shape {shape} ({nbytes / 2**20:.1f} MiB) would be replicated "
                f"on every device of mesh {dict(mesh.shape)}: no rule shards its axes",
            )
    return shardings


def with_mesh(fn, mesh: Mesh):
    """fn, traced under `mesh` (as the abstract mesh), so that `constrain` inside it binds
    activations to that mesh. Wrap a function before jitting it."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def constrain(x, logical_axes: Sequence[str | None]):
    """Constrains an activation to the sharding its logical axes map to (RULES), on the
    mesh it is traced under (`with_mesh`); unchanged without one or on a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def constrain_batch(tree):
    """Every array of `tree` split over the batch axes along its leading dim."""
    return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over all data-parallel axes; the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(mesh: Mesh, rows: int, field: str, parts: int = 1, what: str = "") -> None:
    """The one batch-divisibility rule: a global batch of `rows`, cut into `parts` equal
    microbatches or minibatches (`what` names them), divides evenly over the data-parallel
    axes; each process's block of rows (host_blocks) then divides too, since the blocks
    split the data-parallel shards."""
    dp = data_parallel_size(mesh)
    if rows % (dp * parts):
        by = f"data-parallel size {dp}" + (f" x {what} {parts}" if parts > 1 or what else "")
        raise ConfigError(field, f"{rows} is not divisible by {by} = {dp * parts}")


def replicated_params(params, min_bytes: int = REPLICATED_LIMIT_BYTES) -> list[tuple]:
    """(path, shape, bytes) of the arrays (or ShapeDtypeStructs with shardings) of at least
    min_bytes that are fully replicated on more than one device."""
    found = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        sharding = getattr(x, "sharding", None)
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        if sharding is None or nbytes < min_bytes or len(sharding.device_set) == 1:
            continue
        if sharding.is_fully_replicated:
            found.append((jax.tree_util.keystr(path), tuple(x.shape), int(nbytes)))
    return found


def check_host_rows(mesh: Mesh, rows: int, field: str) -> None:
    """A part of a batch that each process concatenates with others before placing the
    batch (e.g. SFT's pretraining rows) divides into the processes' blocks of rows."""
    count = host_block(mesh).count
    if rows % count:
        raise ConfigError(field, f"{rows} rows are not divisible into the {count} host blocks")


@dataclasses.dataclass(frozen=True)
class HostBlock:
    """This process's block of every global batch: rows [index * B / count, (index + 1) *
    B / count). Usually block i of P for process i of P; processes whose devices hold the
    same rows (tensor parallelism across hosts, e.g. 8-way on 4-chip v5p hosts) share a
    block, load the same rows, and count < P."""

    index: int
    count: int

    def iterator_kwargs(self) -> dict[str, int]:
        """The batch iterators' names for it (gptjax/data/iterators.py)."""
        return dict(process_index=self.index, process_count=self.count)


def host_block(mesh: Mesh | None = None) -> HostBlock:
    """The block of batch rows this process feeds, read off where `mesh` puts the batch
    shards (no mesh: block i of P). The batch iterators take it as (process_index,
    process_count), so every process's position and checkpoint are the same."""
    if mesh is None:
        return HostBlock(jax.process_index(), jax.process_count())
    return host_blocks(mesh)[jax.process_index()]


@functools.lru_cache(maxsize=64)
def host_blocks(mesh: Mesh) -> dict[int, HostBlock]:
    """Every process's block of batch rows under `mesh` (also for a TPU slice's devices
    described on a CPU host, experiments/aot.py).

    Raises ConfigError when a process's devices hold rows that are not one aligned
    contiguous block (make_mesh orders devices by process so that they are); otherwise
    the global batch would silently differ from the single-process one.
    """
    shards = data_parallel_size(mesh)  # distinct row shards of the batch
    held: dict[int, set] = {}
    for device, index in batch_sharding(mesh).devices_indices_map((shards,)).items():
        held.setdefault(device.process_index, set()).update(range(shards)[index[0]])
    blocks = {}
    for process, rows in sorted(held.items()):
        lo, n = min(rows), len(rows)
        if rows != set(range(lo, lo + n)) or shards % n or lo % n:
            shown = ", ".join(map(str, sorted(rows)[:16])) + (", ..." if n > 16 else "")
            raise ConfigError(
                "mesh",
                f"mesh {dict(mesh.shape)} puts batch shards [{shown}] of {shards} on "
                f"process {process}'s devices, not one aligned contiguous block: the "
                f"data-parallel axes (data x fsdp) must split the devices process by process",
            )
        blocks[process] = HostBlock(lo // n, shards // n)
    return blocks


def host_batch_slice(global_batch_size: int, mesh: Mesh | None = None) -> slice:
    """This process's rows of a global batch of `global_batch_size` (see host_block)."""
    block = host_block(mesh)
    if global_batch_size % block.count:
        raise ConfigError(
            "batch_size",
            f"global batch {global_batch_size} not divisible into {block.count} host blocks",
        )
    per = global_batch_size // block.count
    return slice(block.index * per, (block.index + 1) * per)


def host_rows(tree):
    """This process's rows of batch-sharded global arrays, in order (the inverse of
    global_batch, for work done on the host, e.g. a reward function of decoded text)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)

    def rows(x):
        shards = {(s.index[0].start or 0): s.data for s in x.addressable_shards}
        return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])

    return jax.tree.map(rows, tree)


def global_batch(mesh: Mesh, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles each process's rows (`host_batch_slice`) into global arrays sharded over
    the batch axes; no process ever holds another's rows."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(host_batch, sharding)

    def put(x):
        global_shape = (x.shape[0] * host_block(mesh).count, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, host_batch)
