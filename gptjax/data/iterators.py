"""Batch iterators whose every batch is a function of (seed, step), and whose position is
a small JSON dict that orbax saves with the checkpoint.

Shapes: B = global batch rows, T = tokens per row (see `packing`).

Epoch e visits the source in the order `permutation(seed, e)`; each record becomes one
example (pretraining: its tokens + EOS; SFT: the chat template), cut into T-sized
chunks and packed first-fit. The position is the cursor (epoch, index in the epoch's
order, chunk within that record) of the first chunk not yet in a batch: a chunk that did
not fit is the first one of the next batch, so restoring the cursor replays exactly the
batches an uninterrupted run would have produced. Batches run across epoch boundaries
without a partial batch, unless `num_epochs` ends the data.

Multi-host: process i of P yields only rows [i * B / P, (i + 1) * B / P) of the global
batch, where (i, P) are its block of rows and the number of blocks (`sharding.host_block`:
the process index and count, unless tensor-parallel peers on several hosts share a
block), and the position is the same on every process, so any
process's checkpointed state restores all of them. The comparison batches build only
those rows (a row is a function of its record's index). The packed iterators still
tokenize every record of the global batch on every process: which row a chunk lands in
depends on the lengths of all chunks before it, so a process cannot place its own chunks
without the others' lengths. Per-process streams would avoid that, but then the global
batch and the state would depend on the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gptjax.data import chat
from gptjax.data.packing import Example, RowPacker, chunk_example, host_slice, lm_example
from gptjax.data.tokenizer import Tokenizer

_STATE_VERSION = 1
# Records read from the source in one call (read_many).
_READ_AHEAD = 64


def read_many(source: Sequence, indices: Sequence[int]) -> list:
    """source's records at `indices`, in one batched read where the source has one (its
    `__getitems__`, ~4x faster than one at a time on ArrayRecord), else one at a time."""
    if hasattr(source, "__getitems__"):
        return source.__getitems__(indices)
    return [source[i] for i in indices]


class BatchIterator:
    """Deterministic, resumable [B, T] batches from a random-access source of records."""

    def __init__(
        self,
        source: Sequence[Any],
        example_fn: Callable[[Any], Example],
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        packed: bool = True,
        shuffle: bool = True,
        num_epochs: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(source) == 0:
            raise ValueError("cannot iterate over an empty source")
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} hosts")
        self._source, self._example_fn = source, example_fn
        self.batch_size, self.seq_len, self.packed = batch_size, seq_len, packed
        self.seed, self.shuffle, self.num_epochs = int(seed), shuffle, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self._num_records = len(source)
        self._epoch = self._index = self._chunk = self._step = 0
        self._order: tuple[int, np.ndarray] | None = None
        self._chunks: tuple[tuple[int, int], list[Example]] | None = None
        self._ahead: tuple[int, int, list[Any]] | None = None

    def __iter__(self):
        return self

    def _record_index(self, epoch: int, index: int) -> int:
        if not self.shuffle:
            return index
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self._num_records))
        return int(self._order[1][index])

    def _record(self, epoch: int, index: int) -> Any:
        """The record at `index` of the epoch's order, read with the next _READ_AHEAD."""
        ahead = self._ahead
        if ahead is None or ahead[0] != epoch or not 0 <= index - ahead[1] < len(ahead[2]):
            stop = min(index + _READ_AHEAD, self._num_records)
            indices = [self._record_index(epoch, i) for i in range(index, stop)]
            self._ahead = ahead = (epoch, index, read_many(self._source, indices))
        return ahead[2][index - ahead[1]]

    def _current_chunks(self) -> list[Example]:
        key = (self._epoch, self._index)
        if self._chunks is None or self._chunks[0] != key:
            record = self._record(*key)
            self._chunks = (key, chunk_example(self._example_fn(record), self.seq_len))
        return self._chunks[1]

    def _advance(self, n_chunks: int) -> None:
        self._chunk += 1
        if self._chunk == n_chunks:
            self._chunk, self._index = 0, self._index + 1
            if self._index == self._num_records:
                self._index, self._epoch = 0, self._epoch + 1

    def _exhausted(self) -> bool:
        return self.num_epochs is not None and self._epoch >= self.num_epochs

    def __next__(self) -> dict[str, np.ndarray]:
        packer = RowPacker(self.batch_size, self.seq_len, self.packed)
        # The source index of every chunk added, in order: unpacked one-chunk records (RL
        # prompts) make it the record of each row of the global batch.
        self.last_records = []
        while not self._exhausted():
            chunks = self._current_chunks()
            if not packer.add(chunks[self._chunk]):
                break
            self.last_records.append(self._record_index(self._epoch, self._index))
            self._advance(len(chunks))
        if packer.empty:
            raise StopIteration
        self._step += 1
        return host_slice(packer.batch(), self.process_index, self.process_count)

    @property
    def step(self) -> int:
        """Number of batches produced so far."""
        return self._step

    def get_state(self) -> dict[str, int]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "num_records": self._num_records,
            "epoch": self._epoch,
            "index": self._index,
            "chunk": self._chunk,
            "step": self._step,
        }

    def set_state(self, state: Mapping[str, int]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown iterator state version {state.get('version')!r}")
        if state["seed"] != self.seed or state["num_records"] != self._num_records:
            raise ValueError(
                f"iterator state is for seed {state['seed']} over {state['num_records']} "
                f"records; this iterator has seed {self.seed} over {self._num_records}"
            )
        if not 0 <= state["index"] < self._num_records or state["chunk"] < 0:
            raise ValueError(f"iterator state position out of range: {dict(state)}")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._chunk, self._step = int(state["chunk"]), int(state["step"])
        self._chunks = self._ahead = None


def record_text(record: Any, text_key: str = "text") -> str:
    return record if isinstance(record, str) else record[text_key]


def record_messages(record: Mapping) -> list[dict[str, str]]:
    """A demonstration record's conversation: `messages`, or `prompt` + `response`."""
    if "messages" in record:
        return record["messages"]
    return chat.pair_messages(record["prompt"], record["response"])


def lm_batches(
    source: Sequence[Any],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    text_key: str = "text",
    **kwargs,
) -> BatchIterator:
    """Pretraining batches: each document's tokens + EOS, packed, loss on every token.

    `source` holds strings or records with a `text_key` field (e.g. `load_split(...)`).
    """

    def example(record):
        return lm_example(tokenizer.encode(record_text(record, text_key)), tokenizer.eos_id)

    return BatchIterator(
        source, example, batch_size=batch_size, seq_len=seq_len, seed=seed, **kwargs
    )


def sft_batches(
    source: Sequence[Mapping],
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    packed: bool = False,
    **kwargs,
) -> BatchIterator:
    """SFT batches in the chat template, loss on assistant tokens and their EOS only.

    One conversation per row by default (`packed=False`); packed rows are also exact,
    because segments keep each conversation's attention and positions to itself.
    """

    def example(record):
        return chat.render(record_messages(record), tokenizer)

    return BatchIterator(
        source,
        example,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        packed=packed,
        **kwargs,
    )


# Per-reply values a comparison record may carry into its batch (comparison_example).
PER_REPLY = ("ref_logp", "ref_seq_logp")


def comparison_example(record: Mapping, tokenizer: Tokenizer, seq_len: int, k_max: int):
    """One comparison as K rows of [T]: the prompt, a reply, and its EOS if it ended.

    Returns tokens/segment_ids/positions [K, T] (right-padded), reply_mask [K, T] (1 on
    the reply's tokens and its EOS), reward_index [K] (the column of the reply's last
    token: its EOS when it ended), ranks [K], valid [K], and per reply the values a record
    may carry, else zeros: ref_logp [K] (its mean log-prob under the SFT model, the RM's
    reference feature, gptjax/reward_model.py) and ref_seq_logp [K] (its summed log-prob
    under DPO's reference, gptjax/dpo.py).
    A reply that did not end gets no EOS, so the RM sees it as unfinished, as it was. A
    row longer than seq_len keeps its end: the prompt loses its start first.
    """
    context = chat.render_prompt(
        record.get("messages") or chat.pair_messages(record["prompt"]), tokenizer
    )
    responses = record["responses"]
    if len(responses) > k_max:
        raise ValueError(f"comparison has {len(responses)} responses; k_max is {k_max}")
    out = {
        "tokens": np.zeros((k_max, seq_len), np.int32),
        "segment_ids": np.zeros((k_max, seq_len), np.int32),
        "positions": np.zeros((k_max, seq_len), np.int32),
        "reward_index": np.zeros((k_max,), np.int32),
        "ranks": np.zeros((k_max,), np.int32),
        "valid": np.zeros((k_max,), np.float32),
        "reply_mask": np.zeros((k_max, seq_len), np.float32),
    }
    for key in PER_REPLY:
        out[key] = np.zeros((k_max,), np.float32)
    for k in range(len(responses)):
        reply_ids = chat.reply_ids(record, k, tokenizer)
        # Keep the end (where the reward is read); cut the prompt's start if too long.
        ids = (context + reply_ids)[-seq_len:]
        n = len(ids)
        out["tokens"][k, :n] = ids
        out["segment_ids"][k, :n] = 1
        out["positions"][k, :n] = np.arange(n)
        out["reply_mask"][k, max(n - len(reply_ids), 0) : n] = 1.0
        out["reward_index"][k] = n - 1
        out["ranks"][k] = record["ranks"][k]
        out["valid"][k] = 1.0
        for key in PER_REPLY:
            if key in record:
                out[key][k] = record[key][k]
    return out


class ComparisonBatches:
    """[B, K, T] reward-model batches, deterministic from (seed, step), resumable.

    Epoch e visits the records in `permutation(seed, e)`, B at a time (batches run across
    epoch boundaries). Position = number of records consumed, so the state is tiny. Row r
    of a batch is record `consumed + r`, so each process reads and renders only its rows.
    """

    def __init__(
        self,
        source: Sequence[Mapping],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        k_max: int,
        seed: int,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(source) == 0:
            raise ValueError("cannot iterate over an empty set of comparisons")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(
                f"batch_size {batch_size} cannot be split over {process_count} hosts "
                f"(this is host {process_index})"
            )
        self._source, self._tok = source, tokenizer
        self.batch_size, self.seq_len, self.k_max = batch_size, seq_len, k_max
        self.seed, self.shuffle = int(seed), shuffle
        self.process_index, self.process_count = process_index, process_count
        self._consumed = 0
        self._order: tuple[int, np.ndarray] | None = None

    def __iter__(self):
        return self

    def _record(self, n: int) -> Mapping:
        epoch, index = divmod(n, len(self._source))
        if self.shuffle:
            if self._order is None or self._order[0] != epoch:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = (epoch, rng.permutation(len(self._source)))
            index = int(self._order[1][index])
        return self._source[index]

    def __next__(self) -> dict[str, np.ndarray]:
        per_host = self.batch_size // self.process_count
        first = self._consumed + self.process_index * per_host
        rows = [
            comparison_example(self._record(first + i), self._tok, self.seq_len, self.k_max)
            for i in range(per_host)
        ]
        self._consumed += self.batch_size
        return {key: np.stack([r[key] for r in rows]) for key in rows[0]}

    def get_state(self) -> dict[str, int]:
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "num_records": len(self._source),
            "consumed": self._consumed,
        }

    def set_state(self, state: Mapping[str, int]) -> None:
        if (
            state.get("version") != _STATE_VERSION
            or state["seed"] != self.seed
            or state["num_records"] != len(self._source)
        ):
            raise ValueError(
                f"comparison iterator state {dict(state)} does not match seed "
                f"{self.seed} over {len(self._source)} records"
            )
        self._consumed = int(state["consumed"])
