"""Orbax checkpoints of a stage: named pytrees (params, opt_state, ...) plus JSON metadata.

Layout: `<workdir>/<stage>/checkpoints/<step>/{params,opt_state,...,meta}`. Orbax writes
each step to a temporary directory and renames it when complete, so a killed save never
leaves a "latest" step that looks finished. Arrays are restored straight into the target
shardings (which may come from a different mesh than the one that saved them). Metadata
(iterator position, RNG, controller state, resolved config, tokenizer hash) is JSON:
checkpoints are data and are never unpickled.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

META = "meta"


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
        self.item_names = tuple(item_names)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(*self.item_names, META)
        )

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
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, abstract_items: dict[str, Any], step: int | None = None):
        """Restores the named items (a subset is fine) into their abstract shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        args[META] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        items = {name: restored[name] for name in abstract_items}
        return step, items, restored[META]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def key_to_json(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


def key_from_json(data: list[int]) -> jax.Array:
    return jax.random.wrap_key_data(np.asarray(data, np.uint32))


def load_params(directory: str, abstract_params, step: int | None = None):
    """Params of another stage's checkpoint (e.g. SFT starting from the base model)."""
    ckpt = Checkpointer(directory, ("params",), async_save=False)
    try:
        step, items, meta = ckpt.restore({"params": abstract_params}, step)
    finally:
        ckpt.close()
    return items["params"], step, meta
