"""Talk to a trained model of a workdir.

    python -m experiments.chat --workdir=runs/tiny                        # interactive, SFT
    python -m experiments.chat --workdir=runs/tiny --stage=base --prompt="what is 3 + 4?"
    python -m experiments.chat --workdir=runs/tiny --compare --prompt="where does ka ri live?"
    python -m experiments.chat --hf=runs/ppo_hf --prompt="what is 2 plus 3?"   # any HF dir

Interactive mode keeps the conversation (multi-turn, in the chat template) until an empty
line, `/reset` (new conversation) or end of input. --compare answers with every trained
stage side by side (one-shot or interactive). A run with tools (tools.names) answers the
model's calls as it writes, and shows each as `[calc(23 + 45) -> 68]`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags, logging

from experiments import cli, sources, toolbox
from gptjax import host, sampling, tools
from gptjax.data import chat
from gptjax.errors import ConfigError

# Stage names as users say them -> the workdir's stage directory.
STAGES = {"base": "pretrain", "sft": "sft", "ppo": "ppo", "ppo_ptx": "ppo_ptx"}

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory with trained stages.")
_STAGE = flags.DEFINE_enum("stage", "sft", list(STAGES), "Which model answers.")
_PROMPT = flags.DEFINE_string("prompt", None, "Answer this one prompt and exit.")
_COMPARE = flags.DEFINE_bool("compare", False, "Answer with every trained stage.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Longest reply, in tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_HF = flags.DEFINE_string(
    "hf", None, "A Hugging Face model directory (an export, or any supported checkpoint)."
)


class Chatter:
    """One model, one conversation."""

    def __init__(self, stage: str, tokenizer, model, params, box=None, spec=None):
        self.stage, self.tokenizer, self.model, self.params = stage, tokenizer, model, params
        self.box, self.spec = box, spec  # tools (experiments/toolbox.py), or None
        self.messages: list[dict[str, str]] = []

    @classmethod
    def from_run(cls, config, workdir: str, stage: str) -> Chatter:
        tokenizer = sources.get_tokenizer(config, workdir)
        model, params = sources.load_stage_params(config, workdir, STAGES[stage], tokenizer)
        box = toolbox.build(config, workdir)
        spec = toolbox.tokens(config, tokenizer) if box is not None else None
        return cls(stage, tokenizer, model, params, box, spec)

    @classmethod
    def from_hf(cls, directory: str) -> Chatter:
        """A Hugging Face directory with its tokenizer and chat template (gptjax/hf); a
        gptjax export (experiments/export.py) with gptjax's tokenizer and template."""
        from gptjax.data import tokenizer as tok_lib
        from gptjax.hf.chat_template import load_chat_tokenizer
        from gptjax.hf.model import import_model
        from gptjax.model import get_model

        own = os.path.join(directory, "gptjax_tokenizer.model")
        if os.path.exists(own):
            tokenizer, notes = tok_lib.load_tokenizer(own), []
        else:
            tokenizer, notes = load_chat_tokenizer(directory)
        cfg, params, note = import_model(directory)
        for line in (note, *notes):
            print(line, flush=True)
        return cls(os.path.basename(os.path.normpath(directory)), tokenizer, get_model(cfg), params)

    def reply(self, text: str, temperature: float, max_new_tokens: int, seed: int) -> str:
        self.messages.append({"role": "user", "content": text})
        ids = chat.render_prompt(self.messages, self.tokenizer)
        room = self.model.cfg.max_len - len(ids)
        while room < 1 and len(self.messages) > 1:  # forget the oldest exchange
            self.messages = self.messages[2:]
            ids = chat.render_prompt(self.messages, self.tokenizer)
            room = self.model.cfg.max_len - len(ids)
        if room < 1:
            self.messages = []
            return f"[prompt of {len(ids)} tokens does not fit max_len={self.model.cfg.max_len}]"
        tokens, mask = sampling.left_pad([ids])
        args = (self.model, self.params, tokens, mask, np.array([seed], np.int32))
        kw = dict(
            max_new_tokens=min(max_new_tokens, room),
            eos_id=self.tokenizer.eos_id,
            temperature=temperature,
        )
        if self.box is None:
            out, _, out_mask = sampling.generate(*args, **kw)
        else:
            from gptjax.tool_sampling import generate_with_tools

            got = generate_with_tools(
                *args, **kw, tokenizer=self.tokenizer, toolbox=self.box, spec=self.spec
            )
            out, out_mask = got["tokens"], got["mask"]
        new = np.asarray(out)[0][np.asarray(out_mask)[0] > 0].tolist()
        text, ended = chat.decode_reply(new, self.tokenizer)
        self.messages.append({"role": "assistant", "content": text})
        shown = show_tool_turns(text) if text.strip() else "[empty reply]"
        return shown if ended else shown + " [no EOS]"

    def reset(self):
        self.messages = []


def show_tool_turns(text: str) -> str:
    """`<|call|>calc(2 + 2)<|/call|><|result|> 4<|/result|>` as `[calc(2 + 2) -> 4]`."""
    if tools.CALL not in text:
        return text
    text = text.replace(tools.CALL, "[").replace(tools.CALL_END + tools.RESULT, " ->")
    return " ".join(text.replace(tools.RESULT_END, "]").replace(tools.CALL_END, "]").split())


def trained_stages(workdir: str) -> list[str]:
    return [s for s, d in STAGES.items() if os.path.isdir(os.path.join(workdir, d, "checkpoints"))]


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.ERROR)
    if not _WORKDIR.value and not _HF.value:
        print(
            "error: --workdir (a run directory of experiments.main) or --hf (a Hugging Face "
            "model directory) is required",
            file=sys.stderr,
        )
        return 2
    host.use_compilation_cache(multihost=False)  # chat runs on this host alone
    try:
        if _HF.value:
            chatters = [Chatter.from_hf(_HF.value)]
            stages = [chatters[0].stage]
        else:
            config = sources.load_run_config(_WORKDIR.value)
            stages = trained_stages(_WORKDIR.value) if _COMPARE.value else [_STAGE.value]
            chatters = [Chatter.from_run(config, _WORKDIR.value, s) for s in stages]
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kw = dict(temperature=_TEMPERATURE.value, max_new_tokens=_MAX_NEW.value, seed=_SEED.value)

    def answer(text: str):
        for c in chatters:
            label = f"[{c.stage}] " if len(chatters) > 1 else ""
            print(f"{label}{c.reply(text, **kw)}", flush=True)

    if _PROMPT.value is not None:
        answer(_PROMPT.value)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"chatting with {', '.join(stages)}; empty line to quit, /reset for a new conversation",
            flush=True,
        )
    while True:
        try:
            if interactive:  # our own prompt: input()'s goes to stderr under readline
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = input()
        except EOFError:
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            for c in chatters:
                c.reset()
            continue
        answer(line.strip())


if __name__ == "__main__":
    cli.run(main)
