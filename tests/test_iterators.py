"""Batch iterators: exact resume from saved state, epochs cover the data once, SFT masks."""

import collections
import itertools
import json
from collections.abc import Sequence

import numpy as np
import pytest

from gptjax.data import chat, formats, iterators, packing
from gptjax.data import tokenizer as tok_lib

B, T = 4, 16


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [f"doc {i}: the cat sat on mat {i * 7}.\nbye" for i in range(300)]
    return tok_lib.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", 300)


def documents(n=37):
    # Lengths from a few tokens to several rows, so documents get split and carried over.
    return [{"text": f"doc {i}: " + "the cat sat. " * (i % 9)} for i in range(n)]


def demos(n=23):
    return [
        {"messages": chat.pair_messages(f"what is {i} + {i}?", f"{2 * i}. " * (1 + i % 4))}
        for i in range(n)
    ]


def take(it, n):
    return list(itertools.islice(it, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("kind", ["lm", "sft-padded", "sft-packed"])
@pytest.mark.parametrize("k", [0, 1, 7, 20])
def test_restored_state_replays_the_same_batches(tok, kind, k):
    def make():
        if kind == "lm":
            return iterators.lm_batches(documents(), tok, batch_size=B, seq_len=T, seed=3)
        return iterators.sft_batches(
            demos(), tok, batch_size=B, seq_len=T, seed=3, packed=kind == "sft-packed"
        )

    reference = take(make(), k + 15)  # Runs across several epoch boundaries.
    interrupted = make()
    take(interrupted, k)
    state = json.loads(json.dumps(interrupted.get_state()))  # As saved in a checkpoint.
    resumed = make()
    resumed.set_state(state)
    assert resumed.step == k
    assert_same_batches(take(resumed, 15), reference[k:])


class _BlockSource(Sequence):
    """A list with a batched read (as a prepared TFDS split has), counting its calls."""

    def __init__(self, records):
        self.records, self.reads = records, []

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.reads.append(1)
        return self.records[i]

    def __getitems__(self, indices):
        self.reads.append(len(indices))
        return [self.records[i] for i in indices]


def test_records_are_read_in_blocks_and_give_the_batches_of_single_reads(tok, monkeypatch):
    monkeypatch.setattr(iterators, "_READ_AHEAD", 8)
    source = _BlockSource(documents())

    def make(src):
        return iterators.lm_batches(src, tok, batch_size=B, seq_len=T, seed=3)

    reference = take(make(documents()), 40)  # a plain list: one record at a time
    assert_same_batches(take(make(source), 40), reference)  # across epoch boundaries
    assert max(source.reads) == 8 and len(source.reads) < len(documents())
    interrupted = make(source)
    take(interrupted, 13)
    resumed = make(source)
    resumed.set_state(interrupted.get_state())
    assert_same_batches(take(resumed, 27), reference[13:])


def test_same_seed_same_batches_other_seed_other_order(tok):
    def run(seed):
        it = iterators.lm_batches(documents(), tok, batch_size=B, seq_len=T, seed=seed)
        return take(it, 5)

    assert_same_batches(run(1), run(1))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(run(1), run(2)))


def lm_chunks(tok, docs):
    return collections.Counter(
        tuple(t)
        for d in docs
        for t, _ in packing.chunk_example(packing.lm_example(tok.encode(d["text"]), tok.eos_id), T)
    )


def test_each_epoch_yields_every_document_once(tok):
    docs = documents()
    it = iterators.lm_batches(docs, tok, batch_size=B, seq_len=T, seed=0, num_epochs=2)
    batches = list(it)
    with pytest.raises(StopIteration):
        next(it)
    seen = collections.Counter(tuple(t) for b in batches for t, m in packing.segments(b) if all(m))
    assert seen == lm_chunks(tok, docs) + lm_chunks(tok, docs)
    # Nothing but padding is left out of the loss.
    for b in batches:
        np.testing.assert_array_equal(b["loss_mask"], (b["segment_ids"] > 0).astype(np.float32))


def test_epochs_are_shuffled_differently(tok):
    docs = [{"text": f"doc {i}"} for i in range(12)]
    # One document per row, one row per batch: the batch sequence is the visiting order.
    it = iterators.lm_batches(docs, tok, batch_size=1, seq_len=T, seed=0, packed=False)
    order = [tok.decode(b["tokens"][0]) for b in take(it, 24)]
    first, second = order[:12], order[12:]
    assert sorted(first) == sorted(second) == sorted(d["text"] + "</s>" for d in docs)
    assert first != second and first != sorted(first)


def test_sft_mask_covers_exactly_the_response_and_eos(tok):
    records = demos()
    it = iterators.sft_batches(records, tok, batch_size=B, seq_len=64, seed=0, num_epochs=1)
    batches = list(it)
    got = sorted(
        tok.decode(np.asarray(t)[np.asarray(m) > 0])
        for b in batches
        for t, m in packing.segments(b)
    )
    want = sorted(" " + r["messages"][1]["content"] + "</s>" for r in records)
    assert got == want
    for b in batches:  # Padded: one conversation per row.
        assert (b["segment_ids"].max(axis=1) <= 1).all()


def test_sft_accepts_prompt_response_records(tok):
    records = [{"prompt": "what is 1 + 1?", "response": "2."}]
    batch = next(iterators.sft_batches(records, tok, batch_size=1, seq_len=32, seed=0))
    ids, mask = chat.render_pair("what is 1 + 1?", "2.", tok)
    assert batch["tokens"][0, : len(ids)].tolist() == ids
    assert batch["loss_mask"][0, : len(ids)].tolist() == mask


def comparisons(n=11):
    return [
        {"prompt": f"what is {i} + {i}?", "responses": [f"{2 * i}.", f"{i}."], "ranks": [0, 1]}
        for i in range(n)
    ]


def make_batches(kind, tok, **kw):
    if kind == "lm":
        return iterators.lm_batches(documents(), tok, batch_size=B, seq_len=T, seed=5, **kw)
    if kind == "comparisons":
        return iterators.ComparisonBatches(
            comparisons(), tok, batch_size=B, seq_len=T, k_max=3, seed=5, **kw
        )
    return iterators.sft_batches(
        demos(), tok, batch_size=B, seq_len=T, seed=5, packed=kind == "sft-packed", **kw
    )


@pytest.mark.parametrize("kind", ["lm", "sft-padded", "sft-packed", "comparisons"])
def test_hosts_get_disjoint_slices_of_the_same_global_batch(tok, kind):
    # Multi-host: each process yields its block of rows, and the position every process
    # would checkpoint is the same (and the single-process one), so any of them restores.
    n = 9  # Past an epoch boundary of every source.
    whole_it = make_batches(kind, tok)
    whole = take(whole_it, n)
    host_its = [make_batches(kind, tok, process_index=i, process_count=2) for i in range(2)]
    halves = [take(it, n) for it in host_its]
    for step in range(n):
        for key in whole[step]:
            assert halves[0][step][key].shape[0] == B // 2
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), whole[step][key]
            )
    assert host_its[0].get_state() == host_its[1].get_state() == whole_it.get_state()
    resumed = make_batches(kind, tok, process_index=1, process_count=2)
    resumed.set_state(host_its[0].get_state())
    assert_same_batches(
        take(resumed, 2), [{k: v[B // 2 :] for k, v in b.items()} for b in take(whole_it, 2)]
    )


def test_a_batch_that_does_not_split_over_the_hosts_is_rejected(tok):
    for kind in ("lm", "comparisons"):
        with pytest.raises(ValueError, match="3 hosts"):
            make_batches(kind, tok, process_index=0, process_count=3)


def test_state_from_another_setup_is_rejected(tok):
    it = iterators.lm_batches(documents(), tok, batch_size=B, seq_len=T, seed=1)
    take(it, 2)
    state = it.get_state()
    other_seed = iterators.lm_batches(documents(), tok, batch_size=B, seq_len=T, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.set_state(state)
    other_data = iterators.lm_batches(documents(10), tok, batch_size=B, seq_len=T, seed=1)
    with pytest.raises(ValueError, match="records"):
        other_data.set_state(state)
    with pytest.raises(ValueError):
        iterators.lm_batches([], tok, batch_size=B, seq_len=T, seed=1)


@pytest.mark.parametrize("seq_len", [64, 12])
def test_comparison_reply_mask_covers_the_reply_and_its_eos_and_keeps_the_end(tok, seq_len):
    record = {
        "prompt": "what is 3 plus 4? please answer",
        "responses": ["7. the cat sat", "no"],
        "ranks": [0, 1],
        "ended": [True, False],
        "ref_seq_logp": [-3.5, -7.25],
    }
    out = iterators.comparison_example(record, tok, seq_len, k_max=3)
    for k, (reply, ended) in enumerate(zip(record["responses"], record["ended"])):
        ids = chat.encode_reply(reply, tok) + ([tok.eos_id] if ended else [])
        n = int(out["segment_ids"][k].sum())
        # The row ends with the reply (and EOS); a long row loses its prompt's start first.
        assert out["tokens"][k, :n].tolist()[-len(ids) :] == ids
        masked = out["tokens"][k][out["reply_mask"][k] > 0].tolist()
        assert masked == ids[-n:]
        assert out["reward_index"][k] == n - 1
    assert not out["reply_mask"][2].any() and out["valid"].tolist() == [1, 1, 0]
    np.testing.assert_array_equal(out["ref_seq_logp"], [-3.5, -7.25, 0.0])


def test_comparison_rows_are_the_ids_the_replies_were_sampled_as(tok):
    """A record carrying response_ids for this tokenizer is trained on those ids, even when
    they are not the text's own encoding (a sampled reply may spell a word in pieces);
    for another tokenizer, or none, the text is encoded."""
    canonical = chat.encode_reply("oslo", tok)
    pieces = canonical[:1] + tok.encode("o") + canonical[1:]  # not what the text encodes to
    assert pieces != canonical
    record = {
        "prompt": "where does ka ri live?",
        "responses": ["oslo", "oslo"],
        "ranks": [0, 1],
        "ended": [True, False],
        "response_ids": [pieces + [tok.eos_id], canonical],
        "tokenizer": tok.hash,
    }
    out = iterators.comparison_example(record, tok, 32, k_max=2)
    for k, ids in enumerate(record["response_ids"]):
        assert out["tokens"][k][out["reply_mask"][k] > 0].tolist() == ids
    other = iterators.comparison_example({**record, "tokenizer": "another"}, tok, 32, k_max=2)
    assert other["tokens"][0][other["reply_mask"][0] > 0].tolist() == canonical + [tok.eos_id]
    assert formats.normalize_comparison(record)["response_ids"] == record["response_ids"]
    with pytest.raises(ValueError, match="response_ids"):
        formats.normalize_comparison({**record, "response_ids": [pieces]})
