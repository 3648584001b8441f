"""Orbax checkpoints of a stage: named pytrees (params, opt_state, ...) plus JSON metadata.

Layout: `<workdir>/<stage>/checkpoints/<step>/{params,opt_state,...,meta}`. Orbax writes
each step to a temporary directory and renames it when complete, so a killed save never
leaves a "latest" step that looks finished. Arrays are restored straight into the target
shardings (which may come from a different mesh than the one that saved them). Metadata
(iterator position, RNG, controller state, resolved config, tokenizer hash) is JSON:
checkpoints are data and are never unpickled.

Integrity: orbax's rename only says a checkpoint is complete, not that its bytes are
intact (flipped bytes restore silently as wrong values; a truncated file still looks like
the latest step), and it silently casts float32 to a bfloat16 target. So once a save has
finished, `<step>/manifest.sha256.json` records every file's size and sha256; a restore
checks it and the saved shapes/dtypes first. A step that fails is moved aside to
`checkpoints/corrupt/<step>-<reason>` (never deleted) and the previous one is used; a
config whose shapes or dtypes differ is an error naming the parameter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gptjax.errors import CheckpointError

META = "meta"
MANIFEST = "manifest.sha256.json"
CORRUPT = "corrupt"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in out if not f.startswith(MANIFEST))  # also a killed write's .tmp


def write_manifest(step_dir: str) -> None:
    """Size and sha256 of every file of a finished step, written atomically (a temporary
    file of this process and thread, then os.replace), so writing it twice is harmless."""
    files = {}
    for rel in _files(step_dir):
        path = os.path.join(step_dir, rel)
        files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    tmp = os.path.join(step_dir, f"{MANIFEST}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> tuple[str, str] | None:
    """None if every file matches the manifest, else (kind, reason); kind is one of
    incomplete | truncated | checksum."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return "incomplete", "no manifest: the save never finished (killed during it?)"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError) as e:
        return "incomplete", f"unreadable manifest ({e})"
    for rel, want in sorted(files.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.exists(p):
            return "incomplete", f"{rel} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return "truncated", f"{rel} has {size} bytes, {want['size']} were written"
        if _sha256(p) != want["sha256"]:
            return "checksum", f"{rel} does not match its sha256 (flipped bytes)"
    return None


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _describe(x) -> str:
    return f"{np.dtype(x.dtype).name}{list(x.shape)}"


def saved_structure(item_dir: str):
    """The saved tree of one item as ArrayMetadata leaves (shape, dtype), from disk."""
    meta = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    return getattr(meta, "tree", meta)


def structure_mismatch(name: str, saved, target) -> str | None:
    """None if `saved` (metadata) and `target` (abstract arrays) agree leaf by leaf in
    names, shapes and dtypes; else the first difference, naming the parameter."""
    got = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
    want = {_path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    for key in sorted(set(want) - set(got)):
        return f"{name}.{key} is in this config but not in the checkpoint"
    for key in sorted(set(got) - set(want)):
        return f"{name}.{key} is in the checkpoint but not in this config"
    for key in sorted(want):
        a, b = got[key], want[key]
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype):
            return f"{name}.{key}: checkpoint has {_describe(a)}, this config {_describe(b)}"
    return None


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A checkpoint step that failed verification and was moved aside."""

    step: int
    reason: str
    moved_to: str


def abstract_tree(tree, shardings=None):
    """ShapeDtypeStructs (with shardings, if given) describing what to restore into."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Keeps the last `keep` checkpoints of one stage; saves asynchronously."""

    def __init__(
        self, directory: str, item_names: tuple[str, ...], keep: int = 3, async_save: bool = True
    ):
        self.directory = os.path.abspath(directory)
        self._async = async_save
        self.item_names = tuple(item_names)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(*self.item_names, META)
        )
        self._unsealed: list[int] = []  # saved, but no manifest yet
        self._lock = threading.Lock()  # guards _unsealed and the manifest writes
        self._sealer: threading.Thread | None = None  # seals the async save in flight
        self._seal_error: BaseException | None = None
        self.rejected: list[Rejected] = []  # steps moved aside by restore_latest_good

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _write_manifests(self) -> None:
        """Manifests of the saved steps that have none yet (their saves have finished)."""
        with self._lock:
            steps, self._unsealed = self._unsealed, []
            if jax.process_index() == 0:
                for step in steps:
                    if os.path.isdir(self.step_dir(step)):  # max_to_keep may have removed it
                        write_manifest(self.step_dir(step))

    def _seal_in_background(self) -> None:
        """Runs beside training: waits for orbax's finalize thread (the rename of the
        temporary directory to `<step>`, then old-step cleanup) and writes the manifest at
        once. Orbax's `AsyncOptions.post_finalization_callback` cannot do this: it runs
        before that rename (and before orbax adds commit_success.txt and rewrites
        _CHECKPOINT_METADATA), so a manifest written there would not match the step."""
        try:
            self._manager.wait_until_finished()
            self._write_manifests()
        except BaseException as e:  # noqa: BLE001 - re-raised by _seal in the caller
            with self._lock:
                self._seal_error = e
                self._unsealed = []  # a failed save gets no manifest: it stays incomplete

    def _seal(self) -> None:
        """Waits for pending saves and their manifests: a step is complete only once its
        manifest exists (a kill before that leaves it "incomplete")."""
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        error, self._seal_error = self._seal_error, None
        if error is not None:
            raise error
        self._manager.wait_until_finished()
        self._write_manifests()  # synchronous saves (and anything left over)

    def poll(self) -> None:
        """Between steps: surfaces a failed async save without waiting for a running one.
        (The manifest itself is written by the background sealer as soon as the save
        finishes, not here: a kill before the next step boundary would otherwise lose it.)"""
        if self._sealer is not None and not self._sealer.is_alive():
            self._seal()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, items: dict[str, Any], meta: dict[str, Any]) -> None:
        missing = set(self.item_names) - set(items)
        if missing:
            raise ValueError(f"checkpoint at step {step} is missing items {sorted(missing)}")
        args = {name: ocp.args.StandardSave(items[name]) for name in self.item_names}
        args[META] = ocp.args.JsonSave(meta)
        self._seal()  # the previous async save must finish first anyway
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)
        with self._lock:
            self._unsealed.append(step)
        if self._async:
            self._sealer = threading.Thread(
                target=self._seal_in_background, name=f"manifest-{step}", daemon=False
            )
            self._sealer.start()
        else:
            self._seal()

    def problem(self, step: int, abstract_items: dict[str, Any]) -> tuple[str, str] | None:
        """None if `step` is intact and matches the target shapes/dtypes, else (kind,
        reason) with kind incomplete | truncated | checksum | unreadable | mismatch."""
        bad = verify_manifest(self.step_dir(step))
        if bad is not None:
            return bad
        # Params first: the parameter is what a user recognises (the moments mirror it).
        for name in sorted(abstract_items, key=lambda n: n != "params"):
            tree = abstract_items[name]
            if tree is None:  # restore as saved: nothing to compare against
                continue
            try:
                saved = saved_structure(os.path.join(self.step_dir(step), name))
            except Exception as e:  # noqa: BLE001 - any failure to read it means unusable
                return "unreadable", f"{name}: {type(e).__name__}: {e}"
            diff = structure_mismatch(name, saved, tree)
            if diff is not None:
                return "mismatch", diff
        return None

    def read_meta(self, step: int) -> dict[str, Any]:
        with open(os.path.join(self.step_dir(step), META, "metadata")) as f:
            return json.load(f)

    def restore(self, abstract_items: dict[str, Any], step: int | None = None):
        """Restores the named items (a subset is fine) of `step` (default the latest) into
        their abstract shardings, after checking its manifest, shapes and dtypes."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        bad = self.problem(step, abstract_items)
        if bad is not None:
            raise CheckpointError(f"{self.step_dir(step)}: {bad[0]}: {bad[1]}")
        return self._restore(abstract_items, step)

    def _restore(self, abstract_items, step):
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args[META] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        items = {name: restored[name] for name in abstract_items}
        return step, items, restored[META]

    def restore_latest_good(self, abstract_items: dict[str, Any], check_meta=None):
        """(step, items, meta) of the newest intact checkpoint, or None if there is none.

        Newer steps that are incomplete, truncated, bit-flipped or unreadable are moved
        to `corrupt/<step>-<kind>` (see `self.rejected`). If every intact step has other
        shapes/dtypes than the target, the config changed: CheckpointError naming the
        parameter, and nothing is moved. check_meta(meta) may raise to refuse a resume
        (e.g. another tokenizer); it runs before anything is moved.
        """
        steps = sorted(self.all_steps(), reverse=True)
        bad, mismatch, chosen, checked = [], None, None, False
        for step in steps:
            if (
                check_meta is not None
                and not checked
                and verify_manifest(self.step_dir(step)) is None
            ):
                # The newest intact step decides whether resuming is allowed at all (another
                # tokenizer also changes shapes: say so rather than name a shape).
                check_meta(self.read_meta(step), self.step_dir(step))
                checked = True
            problem = self.problem(step, abstract_items)
            if problem is None:
                chosen = step
                break
            if problem[0] == "mismatch" and mismatch is None:
                mismatch = (step, problem[1])
            bad.append((step, *problem))
        if chosen is None and mismatch is not None:
            raise CheckpointError(
                f"cannot resume from {self.step_dir(mismatch[0])}: {mismatch[1]} "
                f"(the model or dtype config differs from the one that saved it)"
            )
        for step, kind, reason in bad:
            self._move_aside(step, kind, reason)
        if bad:
            self._manager.reload()
        if chosen is None:
            return None
        return self._restore(abstract_items, chosen)

    def _move_aside(self, step: int, kind: str, reason: str) -> None:
        target_dir = os.path.join(self.directory, CORRUPT)
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{step}-{kind}")
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(target_dir, f"{step}-{kind}-{n}")
        os.rename(self.step_dir(step), target)
        self.rejected.append(Rejected(step, f"{kind}: {reason}", target))

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        self._seal()
        self._manager.close()


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


def key_from_json(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def save_params(directory: str, step: int, params, meta: dict) -> None:
    """A stage's final params as `directory/<step>/params`, what later stages load with
    `load_params` (e.g. the RM after its bias is normalised); a no-op if that step is there."""
    ckpt = Checkpointer(directory, ("params",), keep=1, async_save=False)
    try:
        if ckpt.latest_step() != step:
            ckpt.save(step, {"params": params}, meta)
    finally:
        ckpt.close()


def fingerprint(directory: str, step: int | None = None) -> str:
    """An identity of a saved step (default the latest): the sha256 of its manifest, which
    holds every file's sha256, so equal fingerprints mean equal bytes. For caches keyed
    by a checkpoint (DPO's reference log-probs)."""
    ckpt = Checkpointer(directory, ("params",), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        return f"{step}:{_sha256(os.path.join(ckpt.step_dir(step), MANIFEST))}"
    finally:
        ckpt.close()


def load_params(
    directory: str, abstract_params, step: int | None = None, tokenizer_hash: str | None = None
):
    """Params of another stage's checkpoint (e.g. SFT starting from the base model),
    verified (manifest, shapes, dtypes, and the tokenizer if `tokenizer_hash` is given)."""
    ckpt = Checkpointer(directory, ("params",), async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        if verify_manifest(ckpt.step_dir(step)) is None and tokenizer_hash is not None:
            saved = ckpt.read_meta(step).get("tokenizer_hash")
            if saved not in (None, tokenizer_hash):
                raise CheckpointError(
                    f"{ckpt.step_dir(step)} was trained with tokenizer {saved[:12]}, this "
                    f"run has {tokenizer_hash[:12]}"
                )
        problem = ckpt.problem(step, {"params": abstract_params})
        if problem is not None:
            kind, reason = problem
            hint = (
                "the model config differs from the one that saved it"
                if kind == "mismatch"
                else "rerun that stage to recover from its previous checkpoint"
            )
            raise CheckpointError(f"{ckpt.step_dir(step)} is unusable: {kind}: {reason} ({hint})")
        step, items, meta = ckpt._restore({"params": abstract_params}, step)
    finally:
        ckpt.close()
    return items["params"], step, meta
