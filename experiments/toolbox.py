"""The tools a run's models may call (the `tools` config section): which, checked before
any stage runs, and built for the samplers (gptjax/tools.py, gptjax/tool_sampling.py).

    --config.tools.names=calc,lookup,my_tools:weather     # built in, and a user's

A user's tool is `module:function`, a function str -> str (ValueError: an error result),
called by the function's name: `weather(oslo)`.
"""

from __future__ import annotations

import functools

from experiments import sources
from gptjax import retrieval, tools
from gptjax.errors import ConfigError
from gptjax.tool_sampling import ToolTokens
from gptjax.world import calc

BUILT_IN_TOOLS = ("calc", "lookup")


def names_of(config) -> list[str]:
    """tools.names as a list, each checked (a built-in tool or an importable
    module:function); a run saved before tools existed has none."""
    section = config.get("tools")
    names = tools.parse_names(section.names) if section is not None else []
    for name in names:
        if name in BUILT_IN_TOOLS:
            continue
        if ":" not in name:
            raise ConfigError(
                "tools.names",
                f"unknown tool {name!r}: built in are {', '.join(BUILT_IN_TOOLS)}; "
                "a user's tool is module:function",
            )
        try:
            tools.import_function(name)
        except ValueError as e:
            raise ConfigError("tools.names", str(e).partition(": ")[2]) from None
    called = [n.partition(":")[2] or n for n in names]
    if len(set(called)) != len(called):
        raise ConfigError("tools.names", f"two tools share a name: {called}")
    return names


def check(config) -> None:
    """Checked before any stage runs: the tools load, and tool demos have their tools."""
    chosen = names_of(config)
    world = config.get("world")
    if world is not None and world.get("tool_demo_frac", 0) > 0 and world.get("n_reason_demos", 0):
        missing = [t for t in BUILT_IN_TOOLS if t not in chosen]
        if missing:
            raise ConfigError(
                "tools.names",
                f"world.tool_demo_frac > 0: the demos call {', '.join(missing)}; add them",
            )


def build(config, workdir: str) -> tools.Toolbox | None:
    """The tools of tools.names (None when there are none): calc, lookup over the
    pretraining documents (the train split: never the world's fact table), a user's
    module:function called by its function's name."""
    chosen = names_of(config)
    if not chosen:
        return None
    box = {}
    for name in chosen:
        if name == "calc":
            box["calc"] = calc.calc
        elif name == "lookup":
            index = retrieval.PassageIndex(
                sources.texts(sources.pretrain_sources(config, workdir)[0])
            )
            box["lookup"] = functools.partial(index.lookup, k=int(config.tools.lookup_k))
        else:
            box[name.partition(":")[2]] = tools.import_function(name)
    return tools.Toolbox(box)


def tokens(config, tokenizer):
    """The tool markers' ids and the caps of the tools section."""
    try:
        return ToolTokens.of(
            tokenizer,
            max_calls=int(config.tools.max_calls),
            max_result_tokens=int(config.tools.max_result_tokens),
        )
    except ValueError as e:
        raise ConfigError("tools.names", str(e)) from None
