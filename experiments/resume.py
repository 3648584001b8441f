"""What a resumed stage may change: a checkpoint is refused when it was trained with another
tokenizer or with a config field that decides what its data stream is (RESUME_KEYS).
Steps, learning rate and checkpoint/eval cadence may change."""

from __future__ import annotations

import json

# Config fields (dotted prefixes of the saved config) a resume must not change: they
# decide the tokens and the order the data iterator's saved position refers to. "STAGE"
# is the stage's own section.
RESUME_KEYS = (
    "world.",
    "seeds.",
    "tokenizer.vocab_size",
    "tokenizer.model_type",
    "tokenizer.pad_vocab_to",
    "data.pretrain",
    "data.demos",
    "data.comparisons",
    "STAGE.batch_size",
    "STAGE.seq_len",
    "STAGE.packed",
    "STAGE.k_max",
    "STAGE.prompts",
    "STAGE.max_prompt_len",
    "STAGE.ptx_batch_size",
    "STAGE.ptx_fraction",
    "STAGE.ptx_seq_len",
)


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_conflict(saved: dict, current: dict) -> str | None:
    """Why a checkpoint with meta `saved` must not be resumed under meta `current` (another
    tokenizer, or a RESUME_KEYS config field changed), or None."""
    a, b = saved.get("tokenizer_hash"), current.get("tokenizer_hash")
    if a and b and a != b:
        return f"it was trained with tokenizer {a[:12]}, this run has {b[:12]}"
    if "config" not in saved or "config" not in current:
        return None
    stage = current.get("stage", "")
    keys = tuple(k.replace("STAGE.", f"{stage}.") for k in RESUME_KEYS)
    old, new = _flat(json.loads(saved["config"])), _flat(json.loads(current["config"]))
    for key in sorted(set(old) | set(new)):
        if key.startswith(keys) and old.get(key) != new.get(key):
            return f"config.{key} was {old.get(key)!r}, now {new.get(key)!r}"
    return None
