"""Metrics on disk: metrics.jsonl and TensorBoard event files (gptjax/tb_events.py), read
back with tensorboardX's own TFRecord checksum and Event proto (the test extra)."""

import math
import os
import struct

import pytest

from gptjax.metrics import MetricsWriter, read_jsonl


def read_events(path) -> list:
    """Every Event in a TFRecord file, each record's two checksums checked."""
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    data, events = open(path, "rb").read(), []
    while data:
        length = data[:8]
        (n,) = struct.unpack("<Q", length)
        assert struct.unpack("<I", data[8:12])[0] == masked_crc32c(length)
        body = data[12 : 12 + n]
        assert struct.unpack("<I", data[12 + n : 16 + n])[0] == masked_crc32c(body)
        event = event_pb2.Event()
        event.ParseFromString(body)
        events.append(event)
        data = data[16 + n :]
    return events


def test_tensorboard_reads_every_logged_scalar_at_its_step(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 2.5, "lr": 1e-3})
    writer.write(300, {"loss": 1.25}, prefix="eval/")
    writer.write(2**40, {"loss": float("nan"), "grad_norm": 1e39, "finite": 1})
    writer.close()

    (name,) = os.listdir(tmp_path / "tb")
    assert name.startswith("events.out.tfevents.")  # the name TensorBoard looks for
    first, *events = read_events(tmp_path / "tb" / name)
    assert first.file_version == "brain.Event:2"
    got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events]
    assert [step for step, _ in got] == [1, 300, 2**40]
    assert got[0][1] == {"loss": 2.5, "lr": pytest.approx(1e-3, rel=1e-7)}  # float32
    assert got[1][1] == {"eval/loss": 1.25}
    last = got[2][1]
    assert math.isnan(last["loss"]) and last["grad_norm"] == math.inf and last["finite"] == 1
    assert all(e.wall_time > 1e9 for e in events)
    # The JSON lines have the same rows, a non-finite value as a string.
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[1] == {"step": 300, "eval/loss": 1.25} and rows[2]["loss"] == "nan"


def test_a_resumed_stage_adds_a_second_event_file(tmp_path):
    for step in (1, 2):
        writer = MetricsWriter(str(tmp_path))
        writer.write(step, {"loss": float(step)})
        writer.close()
    files = sorted(os.listdir(tmp_path / "tb"))
    assert len(files) == 2
    steps = sorted(e.step for f in files for e in read_events(tmp_path / "tb" / f)[1:])
    assert steps == [1, 2]
