"""SentencePiece tokenizer: train from a text iterator, cache in the run directory, load.

gptjax's token ids are fixed: pad = 0, eos = 1, unk = 2, no BOS, then the chat special
tokens (`<|user|>`, `<|assistant|>`) as sentencepiece *control* symbols. Control symbols
are never produced by encoding text, so a user typing "<|user|>" cannot forge a turn;
the chat template inserts them by id.

SentencePiece's defaults are lossy (NFKC, newline/indentation/repeated-space removal,
unknown characters collapsed to one piece, a dummy leading "▁"). Training here sets
identity normalisation, keeps whitespace, adds no dummy prefix, splits digits and falls
back to bytes, so `decode(encode(text)) == text` for every string. One hole remains:
sentencepiece reads a literal "▁" (U+2581) in the input as a space; `encode` therefore
emits that character as its three byte-fallback pieces.

On a small corpus sentencepiece cannot always reach the requested vocabulary size. We
train with `hard_vocab_limit=False` and use the size it reached: `Tokenizer.vocab_size`
is the actual size (the requested one is kept in the cache metadata), and the model's
embedding is `padded_vocab_size(tokenizer.vocab_size, multiple)`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence

import sentencepiece as spm

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
USER, ASSISTANT = "<|user|>", "<|assistant|>"
DEFAULT_SPECIAL_TOKENS = (USER, ASSISTANT)

_SPACE_MARK = "\u2581"  # sentencepiece's whitespace symbol "▁"
_SPACE_MARK_BYTES = tuple(f"<0x{b:02X}>" for b in _SPACE_MARK.encode("utf-8"))
_NUM_BYTE_PIECES = 256
# Training reads text in pieces of at most this many characters: sentencepiece skips
# "sentences" longer than max_sentence_length, which would drop whole long documents.
_TRAIN_CHUNK_CHARS = 4096
# Unigram seeds (see `_write_unigram_seeds`): a word is an optional space and what
# follows up to the next space; pieces are at most 16 characters, as in sentencepiece.
_SEED_WORD = re.compile(r" ?[^ ]+| +")
_SEED_MAX_WORDS = 50_000
_SEED_MAX_PIECE_CHARS = 16
_SEED_MAX_PIECES = 200_000
# Bumped whenever training options change, so cached models are retrained.
_TRAINER_VERSION = 1


class Tokenizer:
    """A loaded sentencepiece model with gptjax's id conventions checked."""

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        self.hash = hashlib.sha256(model_proto).hexdigest()
        self.vocab_size = self._sp.get_piece_size()
        ids = {"pad": self._sp.pad_id(), "eos": self._sp.eos_id(), "unk": self._sp.unk_id()}
        want = {"pad": PAD_ID, "eos": EOS_ID, "unk": UNK_ID}
        if ids != want or self._sp.bos_id() != -1:
            raise ValueError(
                f"tokenizer {path or '<proto>'} has ids {ids}, bos={self._sp.bos_id()}; "
                f"gptjax needs {want} and no BOS (train one with train_tokenizer)"
            )
        self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID
        self._control_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._space_mark_ids = [self._sp.piece_to_id(p) for p in _SPACE_MARK_BYTES]
        if any(self._sp.is_unknown(i) for i in self._space_mark_ids):
            raise ValueError(f"tokenizer {path or '<proto>'} was trained without byte_fallback")

    def special_id(self, name: str) -> int:
        """Id of a control symbol such as "<|user|>" or "</s>"; KeyError if absent."""
        i = self._sp.piece_to_id(name)
        if i not in self._control_ids or self._sp.id_to_piece(i) != name:
            raise KeyError(f"{name!r} is not a special token of tokenizer {self.path}")
        return i

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every control symbol (pad, eos and the chat tokens) by piece text."""
        return {self._sp.id_to_piece(i): i for i in sorted(self._control_ids)}

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; never produces special tokens."""
        parts = text.split(_SPACE_MARK)
        if len(parts) == 1:
            return self._sp.encode(text)
        ids = []
        for k, part in enumerate(parts):
            if k:
                ids.extend(self._space_mark_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        plain = [k for k, t in enumerate(texts) if _SPACE_MARK not in t]
        out: list[list[int]] = [[] for _ in texts]
        for k, ids in zip(plain, self._sp.encode([texts[k] for k in plain])):
            out[k] = ids
        for k, t in enumerate(texts):
            if _SPACE_MARK in t:
                out[k] = self.encode(t)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping pad and rendering other special tokens as their text.

        It does not stop at EOS (cut there first if you want only a response). Ids at or
        above `vocab_size` (the model's padded region) decode like the unknown piece.
        """
        out, run = [], []
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if not 0 <= i < self.vocab_size:
                i = self.unk_id
            if i in self._control_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    """The model's vocabulary: the tokenizer's rounded up to `multiple` (e.g. 128 for TPU)."""
    if tokenizer_vocab <= 0 or multiple <= 0:
        raise ValueError(f"need positive sizes, got vocab {tokenizer_vocab}, multiple {multiple}")
    return -(-tokenizer_vocab // multiple) * multiple


def check_vocab(tokenizer_vocab: int, model_vocab: int) -> None:
    """A model whose embedding is smaller than the tokenizer would index out of range."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"tokenizer vocab size {tokenizer_vocab} is larger than the model's vocab size "
            f"{model_vocab}; set the model's vocab to at least {tokenizer_vocab}"
        )


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return Tokenizer(f.read(), path)


def _training_chunks(text: str) -> Iterable[str]:
    """Cuts long documents after a newline (else before a space) so none is skipped."""
    text = text.replace(_SPACE_MARK, " ")
    while len(text) > _TRAIN_CHUNK_CHARS:
        cut = text.rfind("\n", 0, _TRAIN_CHUNK_CHARS) + 1
        if cut <= 0:
            cut = text.rfind(" ", 1, _TRAIN_CHUNK_CHARS)
        if cut <= 0:
            cut = _TRAIN_CHUNK_CHARS
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text


def train_tokenizer(
    texts: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    eos_piece: str = "</s>",
    max_chars: int = 20_000_000,
    num_threads: int = 2,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Trains a byte-fallback sentencepiece model on `texts` and writes it to `path`.

    Reads at most `max_chars` characters from the start of `texts` (pass a shuffled
    sample for a huge corpus). If `path` already holds a model trained here from the same
    text and settings (checked by a hash kept in `path + ".json"`), it is loaded instead.
    `num_threads` is fixed rather than the core count because unigram training gives
    different scores with different thread counts; BPE is quick either way. Characters
    outside `character_coverage` of the sample get no piece of their own and are spelled
    in bytes, which keeps a small vocabulary possible on text with many rare characters.

    The resulting vocabulary may be smaller than `vocab_size` on a small corpus; see
    the module docstring.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    reserved = 3 + len(special_tokens) + _NUM_BYTE_PIECES
    if vocab_size <= reserved:
        raise ValueError(
            f"vocab_size {vocab_size} leaves no room for learned pieces: pad/eos/unk, "
            f"{len(special_tokens)} special tokens and {_NUM_BYTE_PIECES} byte-fallback "
            f"pieces already take {reserved}"
        )
    path = os.fspath(path)
    settings = {
        "trainer_version": _TRAINER_VERSION,
        "vocab_size": vocab_size,
        "model_type": model_type,
        "special_tokens": list(special_tokens),
        "eos_piece": eos_piece,
        "max_chars": max_chars,
        "num_threads": num_threads,
        "character_coverage": character_coverage,
    }
    sample, digest, n_chars = [], hashlib.sha256(), 0
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for text in texts:
        for chunk in _training_chunks(text):
            chunk = chunk[: max_chars - n_chars]
            sample.append(chunk)
            data = chunk.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little") + data)
            n_chars += len(chunk)
            if n_chars >= max_chars:
                break
        if n_chars >= max_chars:
            break
    if not n_chars:
        raise ValueError("no text to train the tokenizer on")
    settings_hash = digest.hexdigest()

    meta_path = path + ".json"
    if os.path.exists(path):
        if not os.path.exists(meta_path):
            raise FileExistsError(
                f"{path} exists but was not written by train_tokenizer (no {meta_path}); "
                "load it with load_tokenizer or remove it"
            )
        with open(meta_path) as f:
            if json.load(f).get("settings_hash") == settings_hash:
                return load_tokenizer(path)

    options = _trainer_options(
        vocab_size, model_type, special_tokens, eos_piece, num_threads, character_coverage
    )
    model = io.BytesIO()
    with tempfile.TemporaryDirectory() as tmp:
        if model_type == "unigram":
            options["seed_sentencepieces_file"] = _write_unigram_seeds(sample, tmp)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sample), model_writer=model, **options
            )
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {e}") from e
    tokenizer = Tokenizer(model.getvalue(), path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    meta = {
        "settings_hash": settings_hash,
        "requested_vocab_size": vocab_size,
        "vocab_size": tokenizer.vocab_size,
        "model_hash": tokenizer.hash,
        "training_chars": n_chars,
    }
    # Model first, metadata last: after a crash in between, the metadata on disk (if any)
    # holds an older hash, so the next call retrains rather than trusting the model.
    _atomic_write(path, model.getvalue())
    _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    return tokenizer


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _trainer_options(
    vocab_size, model_type, special_tokens, eos_piece, num_threads, character_coverage
) -> dict:
    return dict(
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=character_coverage,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        eos_piece=eos_piece,
        control_symbols=list(special_tokens),
        max_sentence_length=4 * _TRAIN_CHUNK_CHARS,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        minloglevel=2,
    )


def _write_unigram_seeds(sample: list[str], directory: str) -> str:
    """Seed pieces for unigram training: frequent substrings of whitespace-split words.

    sentencepiece 0.2.3's own seed extractor can return almost no candidates on small,
    repetitive corpora (seen: 3 candidates for 2,000 templated sentences ending in a
    number), which leaves a character-level model. This is the same recipe (substrings
    of words, scored by frequency x length) computed directly; sentencepiece still
    validates each seed and prunes them by EM.
    """
    words = collections.Counter()
    for text in sample:
        words.update(_SEED_WORD.findall(text))
    substrings = collections.Counter()
    for word, count in words.most_common(_SEED_MAX_WORDS):
        word = word.replace(" ", _SPACE_MARK)
        for i in range(len(word)):
            for j in range(i + 2, min(len(word), i + _SEED_MAX_PIECE_CHARS) + 1):
                substrings[word[i:j]] += count
    scored = sorted(((c * len(p), p) for p, c in substrings.items() if c >= 2), reverse=True)[
        :_SEED_MAX_PIECES
    ]
    path = os.path.join(directory, "seeds.tsv")
    with open(path, "w", encoding="utf-8") as f:
        # One "piece<TAB>score" per line, so pieces holding either character are left out.
        f.writelines(f"{p}\t{score}\n" for score, p in scored if "\t" not in p and "\n" not in p)
    return path
