"""Tool calls in gptjax's chat template: the syntax, the registry, and running a call.

An assistant turn that uses a tool reads

    <|call|>calc(23 + 45 - 12)<|/call|><|result|> 56<|/result|> it is 56.

The four markers are special tokens (added to the tokenizer when `tools.names` is set;
encoding text never produces them, so neither a user nor a tool result can forge a
call). The model writes the call and its closing `<|/call|>`; the sampler then stops that
row, the host runs the tool, and `<|result|>`, the result's tokens and `<|/result|>` are
fed back as forced tokens (gptjax/tool_sampling.py). Result tokens are the world's, not
the policy's: every loss masks them out (`render_assistant`'s mask, and the samplers'
`tool_mask`).

A tool is a function `str -> str` (the text between the brackets to the result text);
raising ValueError makes the result "error: <message>". Built in: `calc` (the world's
arithmetic, gptjax/world/calc.py) and `lookup` (passages of the pretraining corpus,
gptjax/retrieval.py). A user registers another as `module:function` in `tools.names`;
it is called as `function(argument)` by the function's own name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

CALL, CALL_END, RESULT, RESULT_END = "<|call|>", "<|/call|>", "<|result|>", "<|/result|>"
TOKENS = (CALL, CALL_END, RESULT, RESULT_END)
SEP = " "  # results are written after a space, like chat text (gptjax/data/chat.py)

_MARKER = re.compile("(" + "|".join(re.escape(t) for t in TOKENS) + ")")
_CALL_TEXT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\((.*)\)\s*", re.DOTALL)


def call_text(name: str, argument: str) -> str:
    return f"{CALL}{name}({argument}){CALL_END}"


def result_text(result: str) -> str:
    return f"{RESULT}{SEP + result if result else ''}{RESULT_END}"


def tool_turn(name: str, argument: str, result: str) -> str:
    """A call and its result, as they appear inside an assistant message."""
    return call_text(name, argument) + result_text(result)


def split_markup(text: str) -> list[str]:
    """Text split at the markers (kept as items); empty pieces dropped."""
    return [piece for piece in _MARKER.split(text) if piece]


def strip_tool_turns(text: str) -> str:
    """The assistant's own words: calls and results removed (what a reply is judged on)."""
    text = re.sub(re.escape(RESULT) + ".*?" + re.escape(RESULT_END), " ", text, flags=re.DOTALL)
    text = re.sub(
        re.escape(CALL) + ".*?(" + re.escape(CALL_END) + "|$)", " ", text, flags=re.DOTALL
    )
    return " ".join(text.replace(RESULT, " ").replace(RESULT_END, " ").split())


def tool_calls(text: str) -> list[str]:
    """The call texts (`name(argument)`) of a reply, in order."""
    return re.findall(re.escape(CALL) + "(.*?)" + re.escape(CALL_END), text, flags=re.DOTALL)


def parse_call(text: str) -> tuple[str, str]:
    """`name(argument)` -> (name, argument); ValueError if it is not that shape."""
    m = _CALL_TEXT.fullmatch(text)
    if m is None:
        raise ValueError(f"not a call: {text!r} (expected name(argument))")
    return m.group(1), m.group(2)


def import_function(spec: str, field: str = "tools.names") -> Callable:
    """`module:function` -> the function (a ValueError naming `field` if absent)."""
    import importlib

    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{field}: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"{field}: {spec!r} is not callable")
    return fn


class Toolbox:
    """Named tools; `run(call)` gives the result text a call is answered with."""

    def __init__(self, tools: Mapping[str, Callable[[str], str]]):
        self.tools = dict(tools)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def run(self, call: str) -> tuple[str, bool]:
        """(result text, valid): valid is False for a malformed call, an unknown tool or
        a tool's ValueError; the result then says why ("error: ...")."""
        try:
            name, argument = parse_call(call)
            if name not in self.tools:
                raise ValueError(f"no tool {name!r}; tools: {', '.join(self.tools)}")
            return str(self.tools[name](argument)), True
        except ValueError as e:
            return f"error: {e}", False


def parse_names(spec: str | Sequence[str]) -> list[str]:
    """`tools.names` ("calc,lookup,mymod:fn") as a list."""
    if isinstance(spec, str):
        spec = spec.split(",")
    return [s.strip() for s in spec if s.strip()]
