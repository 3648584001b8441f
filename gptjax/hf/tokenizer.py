"""A Hugging Face checkpoint's tokenizer behind gptjax's tokenizer interface.

`HFTokenizer` reads `tokenizer.json` (the `tokenizers` library: GPT-2, Llama 3, Qwen2,
Mistral, Pythia, Llama 2), or a sentencepiece `tokenizer.model` alone, built into the
pipeline transformers builds from it (gptjax/hf/spm.py). Ids equal
`transformers.AutoTokenizer`'s (tests/test_hf_tokenizer.py).

It answers the calls gptjax's stages make of its own sentencepiece `Tokenizer`:
`encode` (text only: special-token spellings inside text stay text, so a user's message
cannot forge a turn), `encode_batch`, `decode`, `vocab_size`, `pad_id`, `eos_id`, `hash`,
`special_id`, `special_tokens`, `id_to_piece`. `encode(..., parse_special=True,
add_special_tokens=True)` is transformers' default `tokenizer(text)` (BOS and friends from
the post-processor; special spellings become their ids), used for rendered chat templates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPM_MODEL = "tokenizer.model"


def token_text(value) -> str | None:
    """A special token in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def read_tokenizer_config(directory: str) -> dict:
    path = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


class HFTokenizer:
    """A loaded Hugging Face tokenizer (see the module docstring)."""

    def __init__(self, directory: str):
        import tokenizers

        self.path = directory
        self.config = read_tokenizer_config(directory)
        json_path = os.path.join(directory, TOKENIZER_JSON)
        if os.path.exists(json_path):
            with open(json_path, "rb") as f:
                blob = f.read()
            self._tok = tokenizers.Tokenizer.from_str(blob.decode("utf-8"))
        elif os.path.exists(os.path.join(directory, SPM_MODEL)):
            from gptjax.hf import spm

            with open(os.path.join(directory, SPM_MODEL), "rb") as f:
                blob = f.read()
            self.config = {**spm.spm_defaults(blob), **self.config}
            self._tok = spm.llama_tokenizer(blob, self.config)
        else:
            raise FileNotFoundError(f"{directory}: no {TOKENIZER_JSON} or {SPM_MODEL}")
        self.hash = hashlib.sha256(
            blob + json.dumps(self.config, sort_keys=True).encode()
        ).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special = {
            t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self.bos_id = self._id_of(self.config.get("bos_token"))
        self.eos_id = self._id_of(self.config.get("eos_token"))
        if self.eos_id is None:
            raise ValueError(f"{directory}: {TOKENIZER_CONFIG} names no eos_token")
        pad = self._id_of(self.config.get("pad_token"))
        # GPT-2 and Llama 3 have no pad token: pad with EOS. Padding is always masked by
        # the batch's segment ids, never found by comparing ids, so a real EOS stays in
        # the loss.
        self.pad_is_eos = pad is None
        self.pad_id = self.eos_id if pad is None else pad
        self.unk_id = self._id_of(self.config.get("unk_token"))
        # A ChatTemplate when loaded by chat_template.load_chat_tokenizer: gptjax/data/chat.py
        # then renders conversations with it instead of gptjax's own template.
        self.chat = None
        # transformers' decode cleans up spaces only where asked and never for BPE.
        self._clean_up = bool(self.config.get("clean_up_tokenization_spaces", False)) and (
            type(self._tok.model).__name__ != "BPE"
        )

    def _id_of(self, token) -> int | None:
        text = token_text(token)
        return None if text is None else self._tok.token_to_id(text)

    @contextlib.contextmanager
    def _specials_as_text(self, yes: bool):
        old = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = yes
        try:
            yield
        finally:
            self._tok.encode_special_tokens = old

    def encode(
        self, text: str, add_special_tokens: bool = False, parse_special: bool = False
    ) -> list[int]:
        """Ids of `text`. By default text only: no BOS, and "<|eot_id|>" typed by a user
        stays characters. `parse_special` reads special-token spellings as those tokens
        (a rendered chat template); `add_special_tokens` applies the post-processor."""
        with self._specials_as_text(not parse_special):
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` (text only) and each token's character span in it."""
        with self._specials_as_text(True):
            enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        with self._specials_as_text(True):
            return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` as transformers decodes it (special tokens kept as their text
        unless skipped); ids beyond the tokenizer's vocabulary (a model's padded rows) are
        dropped."""
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self._clean_up else text

    def special_id(self, name: str) -> int:
        if name not in self._special:
            raise KeyError(f"{name!r} is not a special token of tokenizer {self.path}")
        return self._special[name]

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(sorted(self._special.items(), key=lambda kv: kv[1]))

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (for WordPiece-era tokenizers)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text
