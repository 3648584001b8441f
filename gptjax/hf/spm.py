"""A checkpoint's sentencepiece `tokenizer.model` as the `tokenizers` pipeline transformers
5 builds from it for a Llama-style tokenizer (`LlamaTokenizer`: what Llama 2 and Mistral
checkpoints name in tokenizer_config.json), so ids equal `AutoTokenizer`'s.

That pipeline is not sentencepiece's own: transformers extracts the vocabulary, derives
BPE merges from it (every split of a piece into two pieces of the vocabulary, ranked by
the merged piece's id: `generate_merges`), and encodes with a Metaspace pre-tokenizer
(spaces to "▁", one "▁" prepended to the first word) and byte fallback, ignoring the
model's normalizer. Control pieces (<s>, </s>) and user-defined ones are added tokens.
BOS is added unless tokenizer_config.json says `add_bos_token: false`.
"""

from __future__ import annotations

from collections.abc import Mapping

CONTROL, USER_DEFINED, UNKNOWN = 3, 4, 2
SPACE = "\u2581"


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """transformers' generate_merges without scores: ranked by the merged piece's id,
    then the lengths of its parts."""
    merges = []
    for piece, rank in vocab.items():
        local = [
            (piece[:i], piece[i:], rank)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(a, b) for a, b, _ in merges]


def _text(value):
    return value.get("content") if isinstance(value, dict) else value


def llama_tokenizer(model_proto: bytes, config: Mapping):
    """The `tokenizers.Tokenizer` for a sentencepiece model, as transformers 5's
    LlamaTokenizer builds it (see the module docstring)."""
    import tokenizers
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import decoders, models, pre_tokenizers, processors

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    pieces = list(proto.pieces)
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=_merges(vocab), fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPACE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    added = [
        tokenizers.AddedToken(p.piece, special=p.type != USER_DEFINED, normalized=False)
        for p in pieces
        if p.type in (CONTROL, USER_DEFINED)
    ]
    unk = proto.trainer_spec.unk_piece or "<unk>"
    if unk in vocab:
        added.append(tokenizers.AddedToken(unk, special=True, normalized=False))
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    bos = _text(config.get("bos_token")) or proto.trainer_spec.bos_piece or "<s>"
    if config.get("add_bos_token", True) and bos in vocab:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0",
            pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, vocab[bos])],
        )
    return tok


def spm_defaults(model_proto: bytes) -> dict:
    """bos/eos/unk token names from the model, for a config that leaves them out."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    spec = proto.trainer_spec
    return {
        "bos_token": spec.bos_piece or "<s>",
        "eos_token": spec.eos_piece or "</s>",
        "unk_token": spec.unk_piece or "<unk>",
    }
