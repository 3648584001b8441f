"""Parsers for users' local data files, each yielding one normalised record shape.

- pretraining (`text`, `lines`, `jsonl`): `{"text": str}`
- demonstrations (`demos`): `{"messages": [{"role": "user"|"assistant", "content"}, ...]}`
  from chat `messages` (or ShareGPT `conversations`), Alpaca `instruction`/`input`/
  `output`, or `prompt`/`response`.
- comparisons (`comparisons`): `{"prompt": str, "messages": [...], "responses": [str]*K,
  "ranks": [int]*K}` with rank 0 best and equal ranks tied, from `prompt`/`chosen`/
  `rejected`, Anthropic-HH `chosen`/`rejected` transcripts, or `prompt`/`responses`/
  `ranks`. `messages` is the prompt conversation (ending with a user turn), so a multi-
  turn HH context survives; `prompt` is its last user turn.

JSON records come one per line (`.jsonl`) or as one JSON array (`.json`, as Alpaca ships).
A malformed record is an error (the message starts with `path:line:`), unless the
reader runs inside `drop_bad_records(max_fraction)`: then bad records are skipped and
collected, and only more than max_fraction of a file's records being bad is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import re
from collections.abc import Callable, Iterator, Mapping

_ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}
# "\n\nHuman: ..." / "\n\nAssistant: ..." turns of an Anthropic HH transcript.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class FormatError(ValueError):
    """A record that cannot be parsed; the message starts with `path:line:`."""


# (max_fraction, list collecting "path:line: reason" of dropped records), or None: strict.
_DROP: contextvars.ContextVar[tuple[float, list[str]] | None] = contextvars.ContextVar(
    "drop_bad_records", default=None
)


@contextlib.contextmanager
def drop_bad_records(max_fraction: float):
    """Readers called in this block skip malformed JSON records while at most
    `max_fraction` of a file's records are bad, and fail (naming the count and the first
    bad `path:line`) above it. Yields the list of dropped records' `path:line: reason`."""
    dropped: list[str] = []
    token = _DROP.set((max_fraction, dropped) if max_fraction > 0 else None)
    try:
        yield dropped
    finally:
        _DROP.reset(token)


def _read_text_file(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise FormatError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _json_array(path: str, text: str) -> Iterator[tuple[int, object]]:
    """Items of a JSON array with the line each starts on, for error messages."""
    decoder, pos = json.JSONDecoder(), 0

    def skip(p):
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if not text.startswith("[", pos):
        raise FormatError(f"{path}:{_line_of(text, pos)}: bad JSON: expected a JSON array")
    pos = skip(pos + 1)
    if text.startswith("]", pos):
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        yield _line_of(text, pos), item
        pos = skip(end)
        if text.startswith(",", pos):
            pos = skip(pos + 1)
        elif text.startswith("]", pos):
            return
        else:
            raise FormatError(f"{path}:{_line_of(text, pos)}: bad JSON: expected ',' or ']'")


def json_records(path: str) -> Iterator[tuple[int, dict]]:
    """(line, object) for each record of a `.jsonl` file or a `.json` array."""
    text = _read_text_file(path)
    if path.endswith(".json"):
        items = _json_array(path, text)
    else:
        items = _jsonl(path, text)
    for line, item in items:
        if not isinstance(item, dict):
            raise FormatError(f"{path}:{line}: expected a JSON object, got {type(item).__name__}")
        yield line, item


def _jsonl(path: str, text: str) -> Iterator[tuple[int, object]]:
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw)
        except json.JSONDecodeError as e:
            raise FormatError(f"{path}:{line}: bad JSON: {e.msg}") from None


def _parsed(path: str) -> Iterator[tuple[int, object, str | None]]:
    """(line, object, None) per record, or (line, None, reason) for a JSONL line that is
    not JSON or not an object (a broken `.json` array cannot be resynchronised: raises)."""
    if path.endswith(".json"):
        for line, item in _json_array(path, _read_text_file(path)):
            yield line, item, None
        return
    for line, raw in enumerate(_read_text_file(path).split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            yield line, json.loads(raw), None
        except json.JSONDecodeError as e:
            yield line, None, f"bad JSON: {e.msg}"


def _normalised(path: str, normalise: Callable[[Mapping], dict]) -> Iterator[dict]:
    drop = _DROP.get()
    bad, total = [], 0
    for line, obj, error in _parsed(path):
        total += 1
        if error is None and not isinstance(obj, dict):
            error = f"expected a JSON object, got {type(obj).__name__}"
        if error is None:
            try:
                record = normalise(obj)
            except ValueError as e:
                error = str(e)
        if error is not None:
            if drop is None:
                raise FormatError(f"{path}:{line}: {error}")
            bad.append(f"{path}:{line}: {error}")
            continue
        yield record
    if bad:
        max_fraction, dropped = drop
        if len(bad) > max_fraction * total:
            raise FormatError(
                f"{bad[0]} (and {len(bad) - 1} more: {len(bad)} of {total} records are "
                f"malformed, above the allowed fraction {max_fraction})"
            )
        dropped.extend(bad)


def _string(obj: Mapping, key: str, what: str | None = None) -> str:
    if key not in obj:
        raise ValueError(f"missing field {key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"empty {what or key}")
    return value


# Pretraining text.


def read_text(path: str) -> Iterator[dict]:
    """One document per paragraph: runs of non-blank lines, split at blank lines."""
    paragraph: list[str] = []
    for line in _read_text_file(path).split("\n"):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield {"text": "\n".join(paragraph)}


def read_lines(path: str) -> Iterator[dict]:
    """One document per non-blank line."""
    for line in _read_text_file(path).split("\n"):
        if line.strip():
            yield {"text": line}


def read_jsonl_text(path: str) -> Iterator[dict]:
    """One document per JSON record's `text` field."""
    return _normalised(path, lambda obj: {"text": _string(obj, "text")})


# Demonstrations.


def merge_runs(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive turns of one role as one turn, their texts joined by a blank line. Real
    files have them (Anthropic HH has two Human turns in a row); the chat template
    alternates, and dropping such records would bias the data."""
    out: list[dict[str, str]] = []
    for turn in turns:
        if out and out[-1]["role"] == turn["role"]:
            out[-1] = {**out[-1], "content": out[-1]["content"] + "\n\n" + turn["content"]}
        else:
            out.append(dict(turn))
    return out


def _turns(items: object) -> list[dict[str, str]]:
    """Chat turns from `{"role","content"}` or ShareGPT `{"from","value"}` items."""
    if not isinstance(items, list):
        raise ValueError("'messages' must be a list")
    turns, system = [], []
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"message {k} must be an object")
        role = item.get("role", item.get("from"))
        content = item.get("content", item.get("value"))
        if role not in _ROLES:
            raise ValueError(f"message {k} has unknown role {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message {k} is missing its content string")
        if _ROLES[role] == "system":
            if turns:
                raise ValueError(f"message {k}: a system message may only come first")
            system.append(content)
        else:
            turns.append({"role": _ROLES[role], "content": content})
    turns = merge_runs(turns)
    # The template has no system turn: its text becomes the start of the first user turn.
    if system and turns:
        turns[0]["content"] = "\n\n".join([*system, turns[0]["content"]])
    return turns


def _check_turns(turns: list[dict[str, str]], last_role: str) -> None:
    if not turns:
        raise ValueError("no messages")
    for k, turn in enumerate(turns):
        want = "user" if k % 2 == 0 else "assistant"
        if turn["role"] != want:
            raise ValueError(f"message {k} should be from the {want} (turns must alternate)")
        if not turn["content"].strip():
            raise ValueError(
                f"empty {'response' if want == 'assistant' else 'user message'} in message {k}"
            )
    if turns[-1]["role"] != last_role:
        raise ValueError(f"the last message must be from the {last_role}")


def normalize_demo(obj: Mapping) -> dict:
    """`{"messages": [...]}` from any supported demonstration record; ValueError if bad."""
    if "messages" in obj or "conversations" in obj:
        turns = _turns(obj["messages"] if "messages" in obj else obj["conversations"])
    elif "instruction" in obj:
        prompt = _string(obj, "instruction", "instruction")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise ValueError("field 'input' must be a string")
        if extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        turns = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _string(obj, "output", "response")},
        ]
    elif "prompt" in obj:
        key = "completion" if "completion" in obj and "response" not in obj else "response"
        turns = [
            {"role": "user", "content": _string(obj, "prompt", "prompt")},
            {"role": "assistant", "content": _string(obj, key, "response")},
        ]
    else:
        raise ValueError(
            "missing field: expected 'messages', 'conversations', 'instruction' or 'prompt'"
        )
    _check_turns(turns, "assistant")
    return {"messages": turns}


def read_demos(path: str) -> Iterator[dict]:
    return _normalised(path, normalize_demo)


# Comparisons.


def parse_hh(transcript: str) -> list[dict[str, str]]:
    """Turns of an Anthropic-HH transcript "\\n\\nHuman: ...\\n\\nAssistant: ..."."""
    marks = list(_HH_TURN.finditer(transcript))
    if not marks or transcript[: marks[0].start()].strip():
        raise ValueError("not an HH transcript (expected '\\n\\nHuman: ...')")
    ends = [m.start() for m in marks[1:]] + [len(transcript)]
    return merge_runs(
        [
            {
                "role": "user" if m.group(1) == "Human" else "assistant",
                "content": transcript[m.end() : end].strip(),
            }
            for m, end in zip(marks, ends)
        ]
    )


def _prompt_turns(prompt: str) -> list[dict[str, str]]:
    """A plain prompt is one user turn; an HH prompt ending in "Assistant:" is parsed."""
    stripped = prompt.strip()
    if stripped.startswith("Human:") and stripped.endswith("Assistant:"):
        turns = parse_hh(stripped)
        if turns[-1] == {"role": "assistant", "content": ""}:
            turns = turns[:-1]
        _check_turns(turns, "user")
        return turns
    return [{"role": "user", "content": prompt}]


def _ranked(obj: Mapping) -> tuple[list[str], list[int]]:
    responses, ranks = obj.get("responses"), obj.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError("'responses' must be a list of at least 2 strings")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise ValueError("missing field 'ranks', or its length differs from 'responses'")
    ended = obj.get("ended")
    if ended is not None and (
        not isinstance(ended, list)
        or len(ended) != len(responses)
        or not all(isinstance(e, bool) for e in ended)
    ):
        raise ValueError("'ended' must be a list of booleans, one per response")
    for k, (r, rank) in enumerate(zip(responses, ranks)):
        # Sampled replies (records with 'ended') may be empty: saying nothing is a reply
        # a labeler ranks. In hand-written files an empty response is a mistake.
        if not isinstance(r, str) or (ended is None and not r.strip()):
            raise ValueError(f"empty response {k}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"rank {k} must be a non-negative integer, got {rank!r}")
    if len(set(ranks)) < 2:
        raise ValueError("all responses are tied: a comparison needs two different ranks")
    return responses, ranks


def normalize_comparison(obj: Mapping) -> dict:
    """The comparison record of any supported format; ValueError if bad."""
    if "responses" in obj:
        turns = _prompt_turns(_string(obj, "prompt"))
        responses, ranks = _ranked(obj)
    elif "chosen" in obj and "rejected" in obj and "prompt" in obj:
        turns = _prompt_turns(_string(obj, "prompt"))
        responses = [
            _string(obj, "chosen", "chosen response"),
            _string(obj, "rejected", "rejected response"),
        ]
        ranks = [0, 1]
    elif "chosen" in obj and "rejected" in obj:
        chosen = parse_hh(_string(obj, "chosen"))
        rejected = parse_hh(_string(obj, "rejected"))
        for name, turns in (("chosen", chosen), ("rejected", rejected)):
            if turns[-1]["role"] != "assistant":
                raise ValueError(f"{name} transcript does not end with an Assistant turn")
            if not turns[-1]["content"]:
                raise ValueError(f"empty {name} response")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError("chosen and rejected transcripts differ before the last reply")
        turns = chosen[:-1]
        _check_turns(turns, "user")
        responses, ranks = [chosen[-1]["content"], rejected[-1]["content"]], [0, 1]
    else:
        raise ValueError(
            "missing field: expected 'prompt'+'chosen'+'rejected', HH 'chosen'+'rejected',"
            " or 'prompt'+'responses'+'ranks'"
        )
    record = {
        "prompt": turns[-1]["content"],
        "messages": turns,
        "responses": list(responses),
        "ranks": list(ranks),
    }
    # Optional: whether each reply ended with EOS (collected samples; default all did),
    # and free-form metadata carried through untouched (e.g. the world's gold ranks).
    if "ended" in obj:
        record["ended"] = list(obj["ended"])
    if "meta" in obj:
        record["meta"] = obj["meta"]
    # Optional: the replies as the token ids they were sampled as (chat template, EOS if
    # they ended) and the hash of that tokenizer: trained on as they are, never re-encoded
    # from the text, whose encoding may differ (gptjax/data/chat.py reply_ids).
    if "response_ids" in obj:
        ids = obj["response_ids"]
        if (
            not isinstance(ids, list)
            or len(ids) != len(record["responses"])
            or not all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in ids)
        ):
            raise ValueError("response_ids: expected one list of token ids per response")
        record["response_ids"] = ids
        record["tokenizer"] = _string(obj, "tokenizer")
    return record


def read_comparisons(path: str) -> Iterator[dict]:
    return _normalised(path, normalize_comparison)


READERS: dict[str, Callable[[str], Iterator[dict]]] = {
    "text": read_text,
    "lines": read_lines,
    "jsonl": read_jsonl_text,
    "demos": read_demos,
    "comparisons": read_comparisons,
}
