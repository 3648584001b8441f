"""Reading and writing the safetensors format (huggingface/safetensors, "format" in its
README): an 8-byte little-endian header length, a JSON header mapping each tensor's name to
its dtype, shape and byte range, then the raw little-endian bytes.

Our own few lines rather than the `safetensors` package: its numpy reader cannot return
bfloat16 (numpy has no such dtype), and reading lazily means mapping the file and viewing
each tensor's bytes with `ml_dtypes`, which is all a reader is. Nothing is read until a
tensor's slice is indexed: a 7B checkpoint never sits whole in host memory.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsFile:
    """One .safetensors file, memory-mapped; `get(name)` is a read-only view (lazy)."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._start = 8 + n
        self._map = np.memmap(path, np.uint8, "r") if os.path.getsize(path) > 8 + n else None

    def names(self) -> list[str]:
        return list(self.entries)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        e = self.entries[name]
        if e["dtype"] not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {e['dtype']}")
        return DTYPES[e["dtype"]], tuple(e["shape"])

    def get(self, name: str) -> np.ndarray:
        dtype, shape = self.info(name)
        begin, end = self.entries[name]["data_offsets"]
        if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{self.path}: tensor {name}'s byte range does not match its shape")
        raw = self._map[self._start + begin : self._start + end]
        return raw.view(dtype).reshape(shape)


class Checkpoint:
    """The tensors of a Hugging Face model directory: model.safetensors, or the shards that
    model.safetensors.index.json names. Files are opened (mapped) on first use."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE)):
            single = SafetensorsFile(os.path.join(directory, SINGLE))
            self.weight_map = {name: SINGLE for name in single.names()}
        else:
            raise FileNotFoundError(
                f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read; "
                "convert .bin files with transformers' save_pretrained first)"
            )
        self._files: dict[str, SafetensorsFile] = {}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self.weight_map:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name}")
        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = SafetensorsFile(os.path.join(self.directory, fname))
        return self._files[fname]

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...]]:
        return self._file(name).info(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """Writes one .safetensors file (names in order given; "format": "pt" as transformers
    expects)."""
    header, offset = {}, 0
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype not in NAMES:
            raise ValueError(f"tensor {name}: dtype {a.dtype} has no safetensors name")
        header[name] = {
            "dtype": NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for a in tensors.values():
            # Little-endian, as every platform JAX runs on is.
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
    os.replace(tmp, path)


def write_sharded(
    directory: str, tensors: dict[str, np.ndarray], max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """model.safetensors, or model-0000k-of-0000n.safetensors shards of at most
    max_shard_bytes plus the index, as save_pretrained writes them. Returns the files."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, a in tensors.items():
        if shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    if len(shards) == 1:
        write(os.path.join(directory, SINGLE), shards[0])
        return [SINGLE]
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(files, shards):
        write(os.path.join(directory, fname), shard)
        weight_map.update({name: fname for name in shard})
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, INDEX]
