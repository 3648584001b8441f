"""Hugging Face tensors <-> gptjax params, for GPT-2, Llama/Mistral and Qwen2.

One table per architecture maps each gptjax leaf to the tensor(s) it comes from; import
and export both read it, so the two directions cannot drift apart. gptjax stacks layers
along a leading axis and keeps heads as their own axes ([D, N, H] for a query projection);
Hugging Face stores one tensor per layer, `nn.Linear` weights as [out, in] (transposed
here) and GPT-2's `Conv1D` weights as [in, out] with q, k, v fused along the output.

Import reads tensor by tensor from the memory-mapped files and builds each device's shard
from just the slice it needs (`jax.make_array_from_callback`), so a checkpoint larger than
host memory in float32 loads onto a mesh without ever being whole on one host.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from gptjax.hf.safetensors import Checkpoint
from gptjax.layers import DTYPES
from gptjax.model import ModelConfig, Params, get_model


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one gptjax leaf lives in a Hugging Face checkpoint.

    name: the tensor's name, with {i} for the layer index when the leaf is stacked.
    transpose: stored as nn.Linear's [out, in].
    lead: how many of the leaf's (per-layer) axes fold into the tensor's first axis;
      None for a 1-D tensor (biases, norm scales).
    part: (j, k): the leaf is the j-th of k pieces of the (untransposed) output axis:
      contiguous (GPT-2's fused c_attn: q | k | v) or, with `heads`, interleaved per head
      (GPT-NeoX's query_key_value: [heads, k, head_dim]).
    """

    name: str
    transpose: bool = False
    lead: int | None = 1
    part: tuple[int, int] | None = None
    heads: int = 0

    @property
    def layered(self) -> bool:
        return "{i}" in self.name


def _gpt2(cfg: ModelConfig, prefix: str = "transformer.") -> dict[tuple, Entry]:
    h = prefix + "h.{i}."
    t = {
        ("embed",): Entry(prefix + "wte.weight"),
        ("pos_embed",): Entry(prefix + "wpe.weight"),
        ("final_norm", "scale"): Entry(prefix + "ln_f.weight", lead=None),
        ("final_norm", "bias"): Entry(prefix + "ln_f.bias", lead=None),
        ("blocks", "wo"): Entry(h + "attn.c_proj.weight", lead=2),
        ("blocks", "bo"): Entry(h + "attn.c_proj.bias", lead=None),
        ("blocks", "w_up"): Entry(h + "mlp.c_fc.weight"),
        ("blocks", "b_up"): Entry(h + "mlp.c_fc.bias", lead=None),
        ("blocks", "w_down"): Entry(h + "mlp.c_proj.weight"),
        ("blocks", "b_down"): Entry(h + "mlp.c_proj.bias", lead=None),
    }
    for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        t["blocks", norm, "scale"] = Entry(h + ln + ".weight", lead=None)
        t["blocks", norm, "bias"] = Entry(h + ln + ".bias", lead=None)
    for j, x in enumerate("qkv"):
        t["blocks", "w" + x] = Entry(h + "attn.c_attn.weight", part=(j, 3))
        t["blocks", "b" + x] = Entry(h + "attn.c_attn.bias", lead=None, part=(j, 3))
    return t


def _llama(cfg: ModelConfig, prefix: str = "model.") -> dict[tuple, Entry]:
    h = prefix + "layers.{i}."
    t = {
        ("embed",): Entry(prefix + "embed_tokens.weight"),
        ("final_norm", "scale"): Entry(prefix + "norm.weight", lead=None),
        ("unembed",): Entry("lm_head.weight", transpose=True),
        ("blocks", "attn_norm", "scale"): Entry(h + "input_layernorm.weight", lead=None),
        ("blocks", "mlp_norm", "scale"): Entry(h + "post_attention_layernorm.weight", lead=None),
        ("blocks", "wo"): Entry(h + "self_attn.o_proj.weight", transpose=True, lead=2),
        ("blocks", "bo"): Entry(h + "self_attn.o_proj.bias", lead=None),
    }
    for x in "qkv":
        t["blocks", "w" + x] = Entry(h + f"self_attn.{x}_proj.weight", transpose=True)
        t["blocks", "b" + x] = Entry(h + f"self_attn.{x}_proj.bias", lead=None)
    for leaf, proj in (("gate", "gate"), ("up", "up"), ("down", "down")):
        t["blocks", "w_" + leaf] = Entry(h + f"mlp.{proj}_proj.weight", transpose=True)
        t["blocks", "b_" + leaf] = Entry(h + f"mlp.{proj}_proj.bias", lead=None)
    return t


def _gpt_neox(cfg: ModelConfig, prefix: str = "gpt_neox.") -> dict[tuple, Entry]:
    h = prefix + "layers.{i}."
    t = {
        ("embed",): Entry(prefix + "embed_in.weight"),
        ("unembed",): Entry("embed_out.weight", transpose=True),
        ("final_norm", "scale"): Entry(prefix + "final_layer_norm.weight", lead=None),
        ("final_norm", "bias"): Entry(prefix + "final_layer_norm.bias", lead=None),
        ("blocks", "wo"): Entry(h + "attention.dense.weight", transpose=True, lead=2),
        ("blocks", "bo"): Entry(h + "attention.dense.bias", lead=None),
        ("blocks", "w_up"): Entry(h + "mlp.dense_h_to_4h.weight", transpose=True),
        ("blocks", "b_up"): Entry(h + "mlp.dense_h_to_4h.bias", lead=None),
        ("blocks", "w_down"): Entry(h + "mlp.dense_4h_to_h.weight", transpose=True),
        ("blocks", "b_down"): Entry(h + "mlp.dense_4h_to_h.bias", lead=None),
    }
    for norm, ln in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
        t["blocks", norm, "scale"] = Entry(h + ln + ".weight", lead=None)
        t["blocks", norm, "bias"] = Entry(h + ln + ".bias", lead=None)
    qkv = h + "attention.query_key_value."
    for j, x in enumerate("qkv"):
        fused = dict(part=(j, 3), heads=cfg.n_heads)
        t["blocks", "w" + x] = Entry(qkv + "weight", transpose=True, **fused)
        t["blocks", "b" + x] = Entry(qkv + "bias", lead=None, **fused)
    return t


LAYOUTS = {
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
    "llama": _llama,
    "mistral": _llama,
    "qwen2": _llama,
}


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))
        else:
            yield (*prefix, k), v


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def layout(kind: str, cfg: ModelConfig, names=()) -> dict[tuple, Entry]:
    """The table for `kind`, restricted to the leaves `cfg` has. `names` (a checkpoint's
    tensor names) picks GPT-2's prefix: GPT2LMHeadModel's "transformer." or none."""
    prefix = {}
    if kind == "gpt2" and "wte.weight" in names and "transformer.wte.weight" not in names:
        prefix = {"prefix": ""}
    table = LAYOUTS[kind](cfg, **prefix)
    leaves = dict(_paths(get_model(cfg).abstract_params))
    missing = [p for p in leaves if p not in table]
    if missing:
        raise ValueError(f"no {kind} tensor holds param {'/'.join(missing[0])}")
    return {p: table[p] for p in leaves}


def _piece(x: np.ndarray, e: Entry, layer_shape) -> np.ndarray:
    """The leaf's per-layer value (a view where possible) from its stored tensor."""
    if e.transpose:
        x = x.T
    if e.part is not None:
        j, k = e.part
        if e.heads:
            x = x.reshape(*x.shape[:-1], e.heads, k, -1)[..., j, :]
        else:
            n = x.shape[-1] // k
            x = x[..., j * n : (j + 1) * n]
    return x.reshape(layer_shape)


def _join(pieces: list[np.ndarray], e: Entry) -> np.ndarray:
    """The stored tensor from its pieces (each already [..., out]): _piece's inverse."""
    if e.part is None:
        (x,) = pieces
    elif e.heads:
        split = [p.reshape(*p.shape[:-1], e.heads, -1) for p in pieces]
        x = np.stack(split, axis=-2).reshape(*pieces[0].shape[:-1], -1)
    else:
        x = np.concatenate(pieces, axis=-1)
    return np.ascontiguousarray(x.T if e.transpose else x)


def _tensor_shape(e: Entry, layer_shape) -> tuple[int, ...]:
    """The stored tensor's shape for a leaf of per-layer shape `layer_shape`."""
    shape = _folded(e, layer_shape)
    if e.part is not None:
        shape = (*shape[:-1], shape[-1] * e.part[1])
    return shape[::-1] if e.transpose else shape


def _folded(e: Entry, layer_shape) -> tuple[int, ...]:
    """The leaf's per-layer shape folded to the stored tensor's rank (before any transpose
    or fusing)."""
    if e.lead is None:
        return (math.prod(layer_shape),)
    return (math.prod(layer_shape[: e.lead]), math.prod(layer_shape[e.lead :]))


def check(ckpt: Checkpoint, kind: str, cfg: ModelConfig) -> dict[tuple, Entry]:
    """The layout, after checking that every tensor it needs is there with its shape."""
    table = layout(kind, cfg, ckpt.names())
    abstract = dict(_paths(get_model(cfg).abstract_params))
    for path, e in table.items():
        shape = abstract[path].shape[1:] if e.layered else abstract[path].shape
        want = _tensor_shape(e, shape)
        for i in range(cfg.n_layers if e.layered else 1):
            name = e.name.format(i=i)
            if name not in ckpt:
                raise ValueError(
                    f"{ckpt.directory}: tensor {name} missing (needed for {'/'.join(path)}; "
                    f"is tie_word_embeddings right?)"
                )
            got = ckpt.info(name)[1]
            if got != want:
                raise ValueError(
                    f"{ckpt.directory}: tensor {name} has shape {got}, config says {want}"
                )
    return table


def load(directory: str, kind: str, cfg: ModelConfig, shardings=None) -> Params:
    """gptjax params from a checkpoint directory, each leaf cast to cfg.param_dtype and
    placed with its sharding (a tree like the params; None: the default device)."""
    ckpt = Checkpoint(directory)
    table = check(ckpt, kind, cfg)
    abstract = get_model(cfg).abstract_params
    flat_shardings = dict(_paths(shardings)) if shardings is not None else {}
    params: Params = {}
    for path, leaf in _paths(abstract):
        e = table[path]
        dtype = DTYPES[cfg.param_dtype]
        layer_shape = leaf.shape[1:] if e.layered else leaf.shape

        def block(index, e=e, layer_shape=layer_shape, leaf=leaf, dtype=dtype):
            index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(tuple(index)))
            if not e.layered:
                return np.asarray(_piece(ckpt.get(e.name), e, layer_shape)[index], dtype)
            rows = range(leaf.shape[0])[index[0]]
            return np.stack(
                [
                    np.asarray(
                        _piece(ckpt.get(e.name.format(i=i)), e, layer_shape)[index[1:]], dtype
                    )
                    for i in rows
                ]
            )

        sharding = flat_shardings.get(path)
        if sharding is None:
            value = jax.device_put(block(()))
        else:
            value = jax.make_array_from_callback(leaf.shape, sharding, block)
        _set(params, path, value)
    return params


def to_tensors(params: Params, kind: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (names in table order) for gptjax params, in
    cfg.param_dtype. A leaf `cfg` has and `params` lacks (a bias the architecture always
    stores, of a model trained without it) is written as zeros: the same function."""
    table = layout(kind, cfg)
    flat = dict(_paths(jax.device_get(params)))
    abstract = dict(_paths(get_model(cfg).abstract_params))
    pieces: dict[str, dict[int, np.ndarray]] = {}
    entries: dict[str, Entry] = {}
    for path, e in table.items():
        leaf = abstract[path]
        value = np.asarray(flat[path]) if path in flat else np.zeros(leaf.shape, leaf.dtype)
        for i in range(cfg.n_layers if e.layered else 1):
            x = value[i] if e.layered else value
            name = e.name.format(i=i)
            pieces.setdefault(name, {})[e.part[0] if e.part else 0] = x.reshape(_folded(e, x.shape))
            entries[name] = e
    return {name: _join([p[j] for j in sorted(p)], entries[name]) for name, p in pieces.items()}
