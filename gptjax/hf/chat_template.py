"""A checkpoint's own chat template (jinja), rendered as transformers renders it, into the
token ids and the SFT loss mask gptjax trains on.

Rendering: the environment of transformers' `apply_chat_template` (a sandboxed jinja with
`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`, `strftime_now`, a
`tojson` that does not HTML-escape, and the `{% generation %}` block), given the
tokenizer's special tokens (`bos_token`, `eos_token`, ...) as transformers passes them.

Ids: the rendered text split at the special tokens the *template* wrote; each piece is
encoded with special spellings read as text. A user message that spells "<|im_end|>" so
stays characters instead of closing the turn (encoding the whole text at once, as
`apply_chat_template(tokenize=True)` does, would let it). For text without such
spellings the ids equal the reference tokenizer's ids of the whole text: tokenizers
split the text at special tokens first, so the pieces are the same.

Loss mask (1 on what the model learns to write): every assistant turn's tokens and the
end-of-turn token that closes it. With `{% generation %}` blocks in the template, exactly
the tokens of those blocks (transformers' `return_assistant_tokens_mask`); without (most
Hub templates), the text each assistant message adds to the rendering of the conversation
before it with the generation prompt, cut after the first EOS token in it (Qwen's
"<|im_end|>" is masked, the newline after it is not).
"""

from __future__ import annotations

import bisect
import datetime
import json
import os
import re
from collections.abc import Mapping, Sequence

from gptjax.hf.tokenizer import HFTokenizer, token_text

TEMPLATE_FILE = "chat_template.jinja"
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


# For checkpoints without a template (GPT-2, base Pythia): Anthropic HH's plain-text turns,
# each reply closed by the tokenizer's EOS; no special tokens needed.
DEFAULT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{ '\\n\\nHuman: ' + m.content + '\\n\\nAssistant:' }}"
    "{%- elif m.role == 'assistant' -%}{{ ' ' + m.content + eos_token }}"
    "{%- else -%}{{ m.content }}"
    "{%- endif -%}{%- endfor -%}"
)


def read_template(directory: str, config: Mapping) -> str | None:
    """The checkpoint's template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: "default")."""
    path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: records the block's character span
        in the output (transformers' AssistantTracker)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            call = self.call_method("_mark", [jinja2.nodes.ContextReference()])
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, context, caller):
            text = caller()
            return _GEN + text + _END if context.get(_MARK_VARIABLE) else text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


# The generation blocks' bounds, marked in the output while finding them (characters no
# template writes).
_GEN, _END = "\x00gen\x01", "\x00end\x01"
_MARK_RE = re.compile(f"{_GEN}|{_END}")
_MARK_VARIABLE = "gptjax_mark_generation"


class ChatTemplate:
    """A compiled template with its tokenizer (see the module docstring)."""

    def __init__(self, source: str, tokenizer: HFTokenizer):
        self.source = source
        self.tokenizer = tokenizer
        self._template = _environment().from_string(source)
        self.has_generation_blocks = bool(_GENERATION.search(source))
        config = tokenizer.config
        self._specials = {
            key: token_text(config[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if token_text(config.get(key)) is not None
        }
        # Longest first, so "<|im_end|>" is not read as a shorter token's spelling.
        names = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def text(self, messages: Sequence[Mapping], add_generation_prompt: bool = False) -> str:
        """The rendered conversation, equal to apply_chat_template(tokenize=False)."""
        return _MARK_RE.sub("", self._render(messages, add_generation_prompt, False))

    def _render(self, messages, add_generation_prompt: bool, mark: bool) -> str:
        variables = dict(self._specials)
        variables.update(messages=[dict(m) for m in messages])
        variables["add_generation_prompt"] = add_generation_prompt
        variables[_MARK_VARIABLE] = mark
        return self._template.render(**variables)

    def _generation_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        marked = self._render(messages, False, True)
        text, spans, start, pos = [], [], None, 0
        for m in _MARK_RE.finditer(marked):
            text.append(marked[pos : m.start()])
            length = sum(len(t) for t in text)
            if m.group() == _GEN:
                start = length
            else:
                spans.append((start, length))
            pos = m.end()
        text.append(marked[pos:])
        return "".join(text), spans

    def _assistant_spans(self, messages) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character spans of every assistant turn (with its
        end-of-turn token)."""
        if self.has_generation_blocks:
            return self._generation_spans(messages)
        full = self.text(messages)
        eos = self.tokenizer.id_to_piece(self.tokenizer.eos_id)
        spans = []
        for k, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.text(messages[:k], add_generation_prompt=True)
            after = self.text(messages[: k + 1])
            if not (full.startswith(after) and after.startswith(before)):
                raise ValueError(
                    "the chat template does not render a conversation as the extension of "
                    f"its prefix at message {k}: mark the assistant replies with "
                    "{% generation %} blocks to train on it"
                )
            end = after.find(eos, len(before))
            spans.append((len(before), len(after) if end < 0 else end + len(eos)))
        return full, spans

    def _content_spans(self, text: str, messages) -> list[tuple[int, int]]:
        """Where the messages that spell a special token sit in the text (in order)."""
        spans, pos = [], 0
        for m in messages:
            content = m.get("content")
            if not isinstance(content, str) or not self._special_re:
                continue
            if not self._special_re.search(content):
                continue
            for candidate in (content, content.strip()):
                at = text.find(candidate, pos)
                if at >= 0:
                    spans.append((at, at + len(candidate)))
                    pos = at + len(candidate)
                    break
            else:
                raise ValueError(
                    f"a {m.get('role')} message spells a special token and the template "
                    "changes its text, so it cannot be kept as text: remove the spelling"
                )
        return spans

    def encode(self, text: str, messages=()) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered `text` and each token's character span: special tokens where the
        template wrote them, the messages' text never read as special tokens."""
        protected = self._content_spans(text, messages)
        ids, offsets, pos = [], [], 0

        def plain(a: int, b: int):
            if a < b:
                enc = self.tokenizer.encode_with_offsets(text[a:b])
                ids.extend(enc[0])
                offsets.extend((a + s, a + e) for s, e in enc[1])

        for m in self._special_re.finditer(text) if self._special_re else ():
            if any(s <= m.start() < e for s, e in protected):
                continue
            plain(pos, m.start())
            ids.append(self.tokenizer.special_id(m.group()))
            offsets.append((m.start(), m.end()))
            pos = m.end()
        plain(pos, len(text))
        return ids, offsets

    def render(self, messages: Sequence[Mapping]) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a whole conversation, for SFT."""
        text, spans = self._assistant_spans(messages)
        ids, offsets = self.encode(text, messages)
        mask = [0] * len(ids)
        starts = [s for s, _ in offsets]
        for a, b in spans:
            # Every token with a character inside the span (transformers' char_to_token).
            k = max(bisect.bisect_right(starts, a) - 1, 0)
            while k < len(ids) and offsets[k][0] < b:
                if offsets[k][1] > a:
                    mask[k] = 1
                k += 1
        return ids, mask

    def reply_ids(self, reply: str) -> list[int]:
        """Ids of an assistant reply as this template writes it, without its end of turn:
        the masked tokens of a one-exchange conversation (its leading space, trimming or
        other wrapping included)."""
        ids, mask = self.render(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]
        )
        out = [i for i, m in zip(ids, mask) if m]
        return out[:-1] if out and out[-1] == self.tokenizer.eos_id else out

    def end_of_turn(self) -> int | None:
        """The special token the template writes after an assistant reply (Llama 3's
        <|eot_id|>, Qwen's <|im_end|>; the tokenizer's EOS for the default template)."""
        probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        before = self.text(probe[:1], add_generation_prompt=True)
        after = self.text(probe)
        tail = after[len(before) :] if after.startswith(before) else after
        found = self._special_re.search(tail, tail.find("a") + 1) if self._special_re else None
        return None if found is None else self.tokenizer.special_id(found.group())

    def render_prompt(self, messages: Sequence[Mapping]) -> list[int]:
        """Ids of a conversation ending in a user turn, with the generation prompt."""
        text = self.text(messages, add_generation_prompt=True)
        return self.encode(text, messages)[0]


def load_chat_tokenizer(directory: str) -> tuple[HFTokenizer, list[str]]:
    """A checkpoint's tokenizer with its chat template attached (`.chat`, used by
    gptjax/data/chat.py), and notes on what was assumed. Generation and the SFT mask end a
    reply at the template's end-of-turn token, which becomes the tokenizer's `eos_id`
    (a base Qwen2.5's EOS is <|endoftext|>, its template closes turns with <|im_end|>)."""
    tokenizer = HFTokenizer(directory)
    notes = []
    source = read_template(directory, tokenizer.config)
    if source is None:
        source = DEFAULT_TEMPLATE
        notes.append("no chat template: using gptjax's plain-text one (Human:/Assistant: turns)")
    tokenizer.chat = ChatTemplate(source, tokenizer)
    end = tokenizer.chat.end_of_turn()
    if end is not None and end != tokenizer.eos_id:
        notes.append(
            f"replies end at {tokenizer.id_to_piece(end)!r} (the template's end of turn), "
            f"not the tokenizer's EOS {tokenizer.id_to_piece(tokenizer.eos_id)!r}"
        )
        tokenizer.eos_id = end
    if tokenizer.pad_is_eos:
        tokenizer.pad_id = tokenizer.eos_id
        notes.append("no pad token: padding uses EOS (masked by segment ids, never by id)")
    return tokenizer, notes
