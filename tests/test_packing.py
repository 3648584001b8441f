"""Packing: every token lands in exactly one segment, segments never mix documents."""

import collections
import random

import numpy as np
import pytest

from gptjax.data import packing

T = 16


def random_examples(n, seed=0, max_len=40, masked=False):
    rng = random.Random(seed)
    examples = []
    for doc in range(n):
        length = rng.choice([1, T - 1, T, T + 1, 2 * T, rng.randint(1, max_len)])
        # Tokens encode (document, index) so any mix-up of documents is visible.
        tokens = [1000 * (doc + 1) + i for i in range(length)]
        mask = [float(rng.random() < 0.5) for _ in tokens] if masked else [1.0] * length
        examples.append((tokens, mask))
    return examples


def expected_chunks(examples):
    return collections.Counter(
        (tuple(t), tuple(m)) for ex in examples for t, m in packing.chunk_example(ex, T)
    )


def packed_chunks(batches):
    return collections.Counter(
        (tuple(t), tuple(m)) for b in batches for t, m in packing.segments(b)
    )


def check_layout(batch, batch_size):
    assert set(batch) == {"tokens", "segment_ids", "positions", "loss_mask"}
    for name, dtype in [
        ("tokens", np.int32),
        ("segment_ids", np.int32),
        ("positions", np.int32),
        ("loss_mask", np.float32),
    ]:
        assert batch[name].shape == (batch_size, T) and batch[name].dtype == dtype
    for tokens_T, seg_T, pos_T, mask_T in zip(
        batch["tokens"], batch["segment_ids"], batch["positions"], batch["loss_mask"]
    ):
        n = int((seg_T > 0).sum())
        # Filled prefix, then padding that carries no token, position or loss.
        assert (seg_T[:n] > 0).all() and (seg_T[n:] == 0).all()
        assert (tokens_T[n:] == 0).all() and (pos_T[n:] == 0).all() and (mask_T[n:] == 0).all()
        # Segment ids count up 1, 2, ... and positions restart at each new segment.
        starts = np.flatnonzero(np.diff(seg_T[:n], prepend=0))
        assert (seg_T[starts] == np.arange(1, len(starts) + 1)).all()
        for s, e in zip(starts, [*starts[1:], n]):
            assert (pos_T[s:e] == np.arange(e - s)).all()
            docs = {int(t) // 1000 for t in tokens_T[s:e]}
            assert len(docs) == 1  # One document per segment.
            assert (np.diff(tokens_T[s:e]) == 1).all()  # Consecutive tokens of it.


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_every_chunk_appears_exactly_once(packed, batch_size):
    examples = random_examples(60, seed=batch_size, masked=True)
    batches = packing.pack(examples, batch_size, T, packed=packed)
    for batch in batches:
        check_layout(batch, batch_size)
        if not packed:
            assert (batch["segment_ids"].max(axis=1) <= 1).all()
    assert packed_chunks(batches) == expected_chunks(examples)
    total = sum(len(t) for t, _ in examples)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == total


def test_documents_reassemble_from_their_chunks():
    examples = random_examples(40, seed=3)
    batches = packing.pack(examples, 4, T)
    by_doc = collections.defaultdict(list)
    for batch in batches:
        for tokens, _ in packing.segments(batch):
            by_doc[tokens[0] // 1000 - 1].append(tokens)
    for doc, (tokens, _) in enumerate(examples):
        chunks = sorted(by_doc[doc])  # By first token, i.e. in document order.
        assert [t for chunk in chunks for t in chunk] == tokens
        assert all(len(chunk) == T for chunk in chunks[:-1])


def test_packed_rows_are_denser_than_padded_rows():
    examples = random_examples(100, seed=1, max_len=6)
    assert len(packing.pack(examples, 4, T)) < len(packing.pack(examples, 4, T, packed=False))


def test_row_packer_refuses_without_changing_anything():
    packer = packing.RowPacker(1, T)
    assert packer.add(([5] * 10, [1.0] * 10))
    before = {k: v.copy() for k, v in packer.batch().items()}
    assert not packer.add(([6] * 7, [1.0] * 7))
    assert all((packer.batch()[k] == v).all() for k, v in before.items())
    assert packer.add(([7] * 6, [0.0] * 6))
    assert packer.batch()["segment_ids"][0].tolist() == [1] * 10 + [2] * 6
    with pytest.raises(ValueError):
        packer.add(([1] * (T + 1), [1.0] * (T + 1)))


def test_lm_example_and_chunking():
    tokens, mask = packing.lm_example([7, 8, 9], eos_id=1)
    assert tokens == [7, 8, 9, 1] and mask == [1.0] * 4
    chunks = packing.chunk_example((list(range(2 * T + 3)), [1.0] * (2 * T + 3)), T)
    assert [len(t) for t, _ in chunks] == [T, T, 3]
    assert [x for t, _ in chunks for x in t] == list(range(2 * T + 3))
    with pytest.raises(ValueError):
        packing.chunk_example(([], []), T)
    with pytest.raises(ValueError):
        packing.chunk_example(([1, 2], [1.0]), T)


def test_host_slices_tile_the_global_batch():
    batch = packing.pack(random_examples(30), 8, T)[0]
    for hosts in (1, 2, 4, 8):
        parts = [packing.host_slice(batch, i, hosts) for i in range(hosts)]
        for key, value in batch.items():
            assert all(p[key].shape[0] == 8 // hosts for p in parts)
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    with pytest.raises(ValueError):
        packing.host_slice(batch, 0, 3)
    with pytest.raises(ValueError):
        packing.host_slice(batch, 2, 2)
