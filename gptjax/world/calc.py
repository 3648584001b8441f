"""The calculator tool: the world's arithmetic grammar, parsed, never `eval`-ed.

    expr   := term (("+" | "-") term)*
    term   := NUMBER | "(" expr ")"
    NUMBER := one or more digits

Spaces anywhere between tokens. Results may be negative ("3 - 5" is -2): a calculator
answers what it is asked. Anything else (other operators, letters, a missing operand,
an unclosed bracket, more than MAX_CHARS characters or MAX_DEPTH nested brackets) is a
CalcError naming what is wrong and where: the tool's reply to a malformed call.
"""

from __future__ import annotations

import re

MAX_CHARS = 64
MAX_DEPTH = 8
_TOKEN = re.compile(r"\s*(?:(\d+)|(\S))")


class CalcError(ValueError):
    """A malformed expression; the message says what and at which column."""


def _tokens(expr: str) -> list[tuple[str, int]]:
    out = []
    for m in _TOKEN.finditer(expr):
        number, other = m.groups()
        col = m.start(1 if number is not None else 2)
        if number is not None:
            out.append((number, col))
        elif other in "+-()":
            out.append((other, col))
        else:
            raise CalcError(f"calc: unexpected {other!r} at column {col + 1} of {expr!r}")
    return out


def evaluate(expr: str) -> int:
    """The value of `expr` under the grammar above."""
    if len(expr) > MAX_CHARS:
        raise CalcError(f"calc: expression longer than {MAX_CHARS} characters")
    tokens = _tokens(expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos][0] if pos < len(tokens) else None

    def fail(what: str):
        where = f"column {tokens[pos][1] + 1}" if pos < len(tokens) else "the end"
        raise CalcError(f"calc: {what} at {where} of {expr!r}")

    def term(depth: int) -> int:
        nonlocal pos
        tok = peek()
        if tok is not None and tok.isdigit():
            pos += 1
            return int(tok)
        if tok == "(":
            if depth >= MAX_DEPTH:
                fail(f"more than {MAX_DEPTH} nested brackets")
            pos += 1
            value = sum_(depth + 1)
            if peek() != ")":
                fail("expected ')'")
            pos += 1
            return value
        fail("expected a number or '('")

    def sum_(depth: int) -> int:
        nonlocal pos
        value = term(depth)
        while peek() in ("+", "-"):
            op = peek()
            pos += 1
            right = term(depth)
            value = value + right if op == "+" else value - right
        return value

    value = sum_(0)
    if pos != len(tokens):
        fail("unexpected " + repr(peek()))
    return value


def calc(expr: str) -> str:
    """The tool: the value as text."""
    return str(evaluate(expr))
