"""The one chat template of gptjax.

A conversation is rendered as

    <|user|> user text <|assistant|> assistant text EOS <|user|> ... <|assistant|> ... EOS

with the special tokens inserted by id (encoding text never produces them) and each
message's text encoded on its own after one space (`SEP`), so training and generation see
identical ids for the same prefix:
`render(m + [reply]).ids == render_prompt(m) + encode(SEP + reply) + [EOS]`.

Why the space: the tokenizer has no dummy prefix, and in running text (the pretraining
corpus) words follow a space, so " oslo" and "oslo" are different pieces. With the space,
an answer in a chat reply is tokenized the way the base model saw it in pretraining, and
SFT can reuse what pretraining learned. `decode_reply` strips it again.

The loss mask is 1 exactly on assistant content tokens and the EOS that ends them: the
model learns to write answers and to stop, never to predict the user's words.

With a tokenizer that has the tool markers (gptjax/tools.py), an assistant message's
`<|call|>…<|/call|><|result|>…<|/result|>` text becomes those special tokens, and the
result (its markers included) is masked out: the tool wrote it, not the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gptjax import tools
from gptjax.data.tokenizer import ASSISTANT, USER, Tokenizer

ROLES = ("user", "assistant")
SEP = " "


def _check(messages: Sequence[Mapping[str, str]], last_role: str) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for k, m in enumerate(messages):
        want = ROLES[k % 2]
        if m.get("role") != want:
            raise ValueError(
                f"message {k} has role {m.get('role')!r}, expected {want!r} "
                "(turns alternate user/assistant, starting with user)"
            )
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {k} content must be a string")
    if messages[-1]["role"] != last_role:
        raise ValueError(f"the last message must be from the {last_role}")


def tool_ids(tokenizer) -> dict[str, int] | None:
    """The tool markers' ids, if the tokenizer has them (tools.names was set)."""
    special = getattr(tokenizer, "special_tokens", None) or {}
    return (
        {t: special[t] for t in tools.TOKENS} if all(t in special for t in tools.TOKENS) else None
    )


def _assistant(content: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(ids, mask) of an assistant message's content (no EOS)."""
    markers = tool_ids(tokenizer)
    if markers is None or not any(t in content for t in tools.TOKENS):
        ids = tokenizer.encode(SEP + content)
        return ids, [1] * len(ids)
    ids, mask, in_result = [], [], False
    for k, piece in enumerate(tools.split_markup(content)):
        if piece in markers:
            in_result = piece == tools.RESULT or (in_result and piece != tools.RESULT_END)
            ids.append(markers[piece])
            mask.append(0 if in_result or piece == tools.RESULT_END else 1)
            continue
        piece_ids = tokenizer.encode(SEP + piece if k == 0 else piece)
        ids += piece_ids
        mask += [0 if in_result else 1] * len(piece_ids)
    return ids, mask


def _render(messages, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    user_id, assistant_id = tokenizer.special_id(USER), tokenizer.special_id(ASSISTANT)
    ids, mask = [], []
    for m in messages:
        if m["role"] == "user":
            content = tokenizer.encode(SEP + m["content"])
            ids += [user_id, *content, assistant_id]
            mask += [0] * (len(content) + 2)
        else:
            content, content_mask = _assistant(m["content"], tokenizer)
            ids += [*content, tokenizer.eos_id]
            mask += [*content_mask, 1]
    return ids, mask


def _checkpoint_template(tokenizer):
    """A Hugging Face checkpoint's template (gptjax/hf/chat_template.py), if the tokenizer
    came with one: it replaces this module's template in every function below."""
    return getattr(tokenizer, "chat", None)


def render(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer):
    """(ids, loss_mask) of a conversation ending with an assistant message."""
    _check(messages, "assistant")
    if (template := _checkpoint_template(tokenizer)) is not None:
        return template.render(messages)
    return _render(messages, tokenizer)


def render_prompt(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer) -> list[int]:
    """Ids of a conversation ending with a user message, ready for the model to answer."""
    _check(messages, "user")
    if (template := _checkpoint_template(tokenizer)) is not None:
        return template.render_prompt(messages)
    return _render(messages, tokenizer)[0]


def encode_reply(reply: str, tokenizer: Tokenizer) -> list[int]:
    """Ids of an assistant reply as the template writes it (without its EOS)."""
    if (template := _checkpoint_template(tokenizer)) is not None:
        return template.reply_ids(reply)
    return _assistant(reply, tokenizer)[0]


def reply_ids(record: Mapping, k: int, tokenizer: Tokenizer) -> list[int]:
    """Reply k of a comparison record as the model reads it: the ids it was sampled as when
    the record carries them for this tokenizer (`response_ids`, `tokenizer`: the compare
    stage's records), else its text encoded by the template, with EOS if it ended. Sampled
    ids need not be the text's canonical encoding; the RM, its reference feature and DPO
    then learn on the tokens the policy produced, as PPO's scoring sees them."""
    if record.get("response_ids") is not None and record.get("tokenizer") == tokenizer.hash:
        return list(record["response_ids"][k])
    ended = (record.get("ended") or [True] * len(record["responses"]))[k]
    return encode_reply(record["responses"][k], tokenizer) + ([tokenizer.eos_id] if ended else [])


def decode_reply(ids: Sequence[int], tokenizer: Tokenizer) -> tuple[str, bool]:
    """(text, ended) of generated reply ids: cut at the first EOS, template space removed."""
    ids = list(ids)
    ended = tokenizer.eos_id in ids
    if ended:
        ids = ids[: ids.index(tokenizer.eos_id)]
    text = tokenizer.decode(ids)
    if _checkpoint_template(tokenizer) is not None:
        return text.strip(), ended
    return (text[len(SEP) :] if text.startswith(SEP) else text), ended


def pair_messages(prompt: str, response: str | None = None) -> list[dict[str, str]]:
    """A single-turn conversation; without `response`, just the prompt turn."""
    messages = [{"role": "user", "content": prompt}]
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def render_pair(prompt: str, response: str, tokenizer: Tokenizer):
    """(ids, loss_mask) of a single (prompt, response) exchange."""
    return render(pair_messages(prompt, response), tokenizer)


def prompt_messages(record: Mapping) -> list[dict[str, str]]:
    """The prompt turns of a comparison record (its `messages`, else its `prompt`)."""
    if record.get("messages"):
        return [dict(m) for m in record["messages"]]
    return pair_messages(record["prompt"])


def question_turns(record: Mapping) -> list[dict[str, str]]:
    """The turns up to the last user message (a world prompt's, or a demonstration's):
    what an RL policy is asked to answer."""
    messages = prompt_messages(record)
    while messages and messages[-1]["role"] != "user":
        messages.pop()
    return messages


def render_comparison(record: Mapping, tokenizer: Tokenizer):
    """(ids, loss_mask) of each of a comparison record's responses after its prompt."""
    context = prompt_messages(record)
    return [
        render(context + [{"role": "assistant", "content": r}], tokenizer)
        for r in record["responses"]
    ]
