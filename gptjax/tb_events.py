"""TensorBoard event files of scalars, written directly.

An event file is a TFRecord file (tensorflow/core/lib/io/record_writer.cc): each record is
its length (uint64), the length's masked CRC-32C, the bytes, and their masked CRC-32C. Each
record holds one `Event` proto (tensorflow/core/util/event.proto): the first names the
file version, the others carry a step's scalars as a `Summary` (summary.proto). Scalars
are all the library logs, and these few proto fields are encoded by hand here: the
tensorboardX writer used before imports torch whenever torch is installed, which slowed
the start of every process that logs (BUILD.md, Tests).
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

import numpy as np


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):  # CRC-32C (Castagnoli), reflected polynomial
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """CRC-32C of data, rotated and offset as TFRecord stores it (crc32c.h Mask)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64 fields: a negative value as its two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _length_delimited(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value: tag (field 1) and simple_value (field 2, float32)."""
    with np.errstate(over="ignore"):  # a float64 beyond float32's range logs as inf
        value_f32 = np.asarray(value, dtype="<f4").tobytes()
    return _length_delimited(1, tag.encode()) + _varint(2 << 3 | 5) + value_f32


def event(
    wall_time: float,
    step: int,
    scalars: dict[str, float] | None = None,
    *,
    file_version: str | None = None,
) -> bytes:
    """An Event: wall_time (field 1, double), step (2, int64), file_version (3) or a
    summary (5) of one value per scalar."""
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _scalar_value(k, v)) for k, v in scalars.items())
        out += _length_delimited(5, values)
    return out


def record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    crcs = struct.pack("<I", masked_crc32c(length)), struct.pack("<I", masked_crc32c(data))
    return length + crcs[0] + data + crcs[1]


_FILES = itertools.count()


class EventWriter:
    """Appends one event per `scalars` call to a new event file in `directory`, flushed at
    once (as metrics.jsonl is). Each writer opens its own file, so a resumed stage adds a
    file beside the earlier run's, which TensorBoard reads as one run."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        name += f".{os.getpid()}.{next(_FILES)}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "wb")
        self._write(event(time.time(), 0, file_version="brain.Event:2"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._write(event(time.time(), step, values))

    def _write(self, data: bytes) -> None:
        self._file.write(record(data))
        self._file.flush()

    def close(self) -> None:
        self._file.close()
