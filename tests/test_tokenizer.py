"""Tokenizer: exact round trips, special tokens by id, caching, vocab sizes."""

import json
import os
import random

import pytest
import sentencepiece as spm

from gptjax.data import tokenizer as tok_lib

WORDS = "the cat sat on a mat alice bob lives in paris works as baker def return".split()

TRICKY = [
    "line one\nline two\n\n\nafter blank lines\n",
    "def f(x):\n    return x  # four-space indent\n\tand a tab",
    "repeated     spaces   and trailing   ",
    "   leading spaces",
    "digits 1234567890 and 3.14159 and 007",
    "non-ASCII: café, naïve, Ünïcödé, 漢字, Привет, 😀",
    "unseen characters: ∮ ☃ ᚠ \u200b \x00 \x7f",
    "NFKC would change these: ﬁ ① Ｆｕｌｌ e\u0301",
    "a literal \u2581 piece marker and ▁▁ two",
    "<|user|> <|assistant|> </s> <pad> <unk> <0x41> look like specials",
    "\r\nwindows\r\nnewlines\r\n",
    "",
    " ",
    "\n",
]


def corpus(n=600, seed=0):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
        docs.append(f"{words} {rng.randint(0, 9999)}.\n    indented {i}\n\nnext paragraph")
    return docs


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def trained(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "tok.model"
    tok = tok_lib.train_tokenizer(corpus(), path, vocab_size=400, model_type=request.param)
    return tok, path


def random_text(rng, n):
    pieces = [
        lambda: rng.choice(WORDS),
        lambda: " " * rng.randint(1, 5),
        lambda: "\n" * rng.randint(1, 3),
        lambda: "\t",
        lambda: str(rng.randint(0, 10**6)),
        lambda: chr(rng.randint(0x80, 0xD7FF)),
        lambda: chr(rng.randint(0x10000, 0x10FFFF)),
        lambda: "\u2581",
    ]
    return "".join(rng.choice(pieces)() for _ in range(n))


def test_round_trip_after_save_and_load(trained):
    tok, path = trained
    loaded = tok_lib.load_tokenizer(path)
    assert loaded.hash == tok.hash and loaded.vocab_size == tok.vocab_size
    rng = random.Random(1)
    texts = TRICKY + [random_text(rng, rng.randint(1, 40)) for _ in range(200)]
    for text in texts:
        ids = loaded.encode(text)
        assert loaded.decode(ids) == text, (text, [loaded.id_to_piece(i) for i in ids])
        assert all(0 < i < loaded.vocab_size for i in ids)
    assert loaded.encode_batch(texts) == [loaded.encode(t) for t in texts]


def test_common_text_uses_learned_pieces_not_bytes(trained):
    tok, _ = trained
    ids = tok.encode("the cat sat on a mat")
    assert len(ids) < len("the cat sat on a mat") / 2


def test_special_tokens_are_fixed_ids_and_never_encoded(trained):
    tok, path = trained
    loaded = tok_lib.load_tokenizer(path)
    assert (loaded.pad_id, loaded.eos_id, loaded.unk_id) == (0, 1, 2)
    user, assistant = loaded.special_id("<|user|>"), loaded.special_id("<|assistant|>")
    assert (user, assistant) == (tok.special_id("<|user|>"), tok.special_id("<|assistant|>"))
    assert {user, assistant}.isdisjoint({0, 1, 2})
    assert loaded.special_id("</s>") == 1
    specials = set(loaded.special_tokens.values())
    for text in ["<|user|>", "x<|assistant|>y", "</s>", "<pad>"]:
        assert not specials & set(loaded.encode(text))
    hello = loaded.encode("hello")
    ids = [0, user, *hello, assistant, *hello, 1, 0, 0]
    assert loaded.decode(ids) == "<|user|>hello<|assistant|>hello</s>"
    with pytest.raises(KeyError):
        loaded.special_id("<|system|>")
    with pytest.raises(KeyError):
        loaded.special_id("the")


def test_decode_maps_padded_vocab_ids_to_unknown(trained):
    tok, _ = trained
    assert tok.decode([tok.vocab_size + 5]) == tok.decode([tok.unk_id])


def test_cache_reuses_matching_model_and_retrains_on_change(tmp_path):
    path = tmp_path / "tok.model"
    first = tok_lib.train_tokenizer(corpus(200), path, vocab_size=300)
    stamp = os.stat(path).st_mtime_ns
    again = tok_lib.train_tokenizer(corpus(200), path, vocab_size=300)
    assert again.hash == first.hash and os.stat(path).st_mtime_ns == stamp
    changed_text = tok_lib.train_tokenizer(corpus(200, seed=5), path, vocab_size=300)
    changed_size = tok_lib.train_tokenizer(corpus(200, seed=5), path, vocab_size=310)
    assert len({first.hash, changed_text.hash, changed_size.hash}) == 3
    assert tok_lib.load_tokenizer(path).hash == changed_size.hash


def test_refuses_to_overwrite_a_model_it_did_not_write(tmp_path):
    path = tmp_path / "tok.model"
    path.write_bytes(b"someone else's model")
    with pytest.raises(FileExistsError, match="load_tokenizer"):
        tok_lib.train_tokenizer(corpus(50), path, vocab_size=300)
    assert path.read_bytes() == b"someone else's model"


def test_small_corpus_shrinks_vocab_and_reports_it(tmp_path):
    path = tmp_path / "tok.model"
    tok = tok_lib.train_tokenizer(["ab ab ab ba"] * 20, path, vocab_size=1000)
    assert tok.vocab_size < 1000
    meta = json.loads((tmp_path / "tok.model.json").read_text())
    assert meta["requested_vocab_size"] == 1000 and meta["vocab_size"] == tok.vocab_size
    assert tok.decode(tok.encode("unseen Zürich\n  text")) == "unseen Zürich\n  text"


def test_vocab_too_small_for_byte_fallback_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="byte-fallback"):
        tok_lib.train_tokenizer(corpus(10), tmp_path / "t.model", vocab_size=200)
    with pytest.raises(ValueError, match="no text"):
        tok_lib.train_tokenizer([], tmp_path / "t.model", vocab_size=300)


def test_padded_vocab_size_and_check_vocab():
    assert tok_lib.padded_vocab_size(300, 128) == 384
    assert tok_lib.padded_vocab_size(384, 128) == 384
    assert tok_lib.padded_vocab_size(1, 1) == 1
    tok_lib.check_vocab(300, 384)
    tok_lib.check_vocab(384, 384)
    with pytest.raises(ValueError, match=r"385.*384"):
        tok_lib.check_vocab(385, 384)


def test_load_rejects_models_with_other_id_conventions(tmp_path):
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(100)),
        model_prefix=str(prefix),
        vocab_size=100,
        minloglevel=2,
    )  # sentencepiece defaults: unk=0, bos=1, eos=2.
    with pytest.raises(ValueError, match="pad"):
        tok_lib.load_tokenizer(f"{prefix}.model")
