"""Packing token sequences into [B, T] rows with segment ids, positions and loss masks.

Shapes: B = rows in a batch, T = tokens per row.

A batch is a dict of numpy arrays, all [B, T]:
  tokens       int32   token ids (pad = 0)
  segment_ids  int32   1, 2, ... per sequence within a row; 0 = padding
  positions    int32   0, 1, ... restarting at every sequence
  loss_mask    float32 weight of each token *as a target*

The train step predicts tokens[:, t] from positions < t only when segment_ids[:, t] ==
segment_ids[:, t-1] != 0, so attention and loss never cross a sequence boundary.

A sequence longer than T is cut into T-sized chunks, each its own segment: nothing is
dropped, and a chunk that does not fit in the current batch is not lost but waits (the
caller keeps it) for the next one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Example = tuple[Sequence[int], Sequence[float]]  # (tokens, loss_mask) of one sequence


def lm_example(doc_tokens: Sequence[int], eos_id: int) -> Example:
    """A pretraining document: its tokens and EOS, every token a target."""
    tokens = [*doc_tokens, eos_id]
    return tokens, [1.0] * len(tokens)


def chunk_example(example: Example, seq_len: int) -> list[Example]:
    """Cuts an example into pieces of at most `seq_len` tokens (at least one piece)."""
    tokens, mask = example
    if len(tokens) != len(mask):
        raise ValueError(f"{len(tokens)} tokens but {len(mask)} loss-mask entries")
    if not tokens:
        raise ValueError("an example needs at least one token")
    return [
        (tokens[i : i + seq_len], mask[i : i + seq_len]) for i in range(0, len(tokens), seq_len)
    ]


class RowPacker:
    """Fills a [B, T] batch one chunk at a time.

    Packed: first fit, the first row with room. Padded: each chunk takes a fresh row.
    `add` returns False (and changes nothing) when the chunk fits nowhere; the caller
    then emits `batch()` and offers the chunk to a new packer.
    """

    def __init__(self, batch_size: int, seq_len: int, packed: bool = True):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"need positive batch_size and seq_len, got {batch_size}, {seq_len}")
        self.seq_len, self.packed = seq_len, packed
        self.tokens_BxT = np.zeros((batch_size, seq_len), np.int32)
        self.segment_ids_BxT = np.zeros((batch_size, seq_len), np.int32)
        self.positions_BxT = np.zeros((batch_size, seq_len), np.int32)
        self.loss_mask_BxT = np.zeros((batch_size, seq_len), np.float32)
        self.used_B = np.zeros(batch_size, np.int64)
        self.segments_B = np.zeros(batch_size, np.int32)

    @property
    def empty(self) -> bool:
        return not self.used_B.any()

    def add(self, chunk: Example) -> bool:
        tokens, mask = chunk
        n = len(tokens)
        if not 0 < n <= self.seq_len or len(mask) != n:
            raise ValueError(f"chunk of {n} tokens / {len(mask)} mask entries for T={self.seq_len}")
        if self.packed:
            fits_B = self.used_B + n <= self.seq_len
        else:
            fits_B = self.used_B == 0
        if not fits_B.any():
            return False
        row = int(np.argmax(fits_B))
        start = int(self.used_B[row])
        self.segments_B[row] += 1
        self.tokens_BxT[row, start : start + n] = tokens
        self.loss_mask_BxT[row, start : start + n] = mask
        self.segment_ids_BxT[row, start : start + n] = self.segments_B[row]
        self.positions_BxT[row, start : start + n] = np.arange(n)
        self.used_B[row] += n
        return True

    def batch(self) -> dict[str, np.ndarray]:
        return {
            "tokens": self.tokens_BxT,
            "segment_ids": self.segment_ids_BxT,
            "positions": self.positions_BxT,
            "loss_mask": self.loss_mask_BxT,
        }


def pack(
    examples: Sequence[Example], batch_size: int, seq_len: int, packed: bool = True
) -> list[dict[str, np.ndarray]]:
    """All examples as a list of batches (the last one possibly part-filled)."""
    batches, packer = [], RowPacker(batch_size, seq_len, packed)
    for example in examples:
        for chunk in chunk_example(example, seq_len):
            if not packer.add(chunk):
                batches.append(packer.batch())
                packer = RowPacker(batch_size, seq_len, packed)
                packer.add(chunk)
    if not packer.empty:
        batches.append(packer.batch())
    return batches


def segments(batch: dict[str, np.ndarray]) -> list[Example]:
    """Every (tokens, loss_mask) segment of a batch, row by row: the inverse of packing."""
    out = []
    for tokens_T, seg_T, mask_T in zip(batch["tokens"], batch["segment_ids"], batch["loss_mask"]):
        for s in np.unique(seg_T[seg_T > 0]):
            where = seg_T == s
            out.append((tokens_T[where].tolist(), mask_T[where].tolist()))
    return out


def host_slice(
    batch: dict[str, np.ndarray], process_index: int, process_count: int
) -> dict[str, np.ndarray]:
    """Rows [i * B / P, (i + 1) * B / P) of the global batch for host i of P.

    Every host builds the same global batch; each feeds only its own block.
    """
    rows = next(iter(batch.values())).shape[0]
    if not 0 <= process_index < process_count or rows % process_count:
        raise ValueError(
            f"cannot give process {process_index} of {process_count} an equal share "
            f"of a global batch of {rows} rows"
        )
    per_host = rows // process_count
    lo = process_index * per_host
    return {k: v[lo : lo + per_host] for k, v in batch.items()}
