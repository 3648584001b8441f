"""The declared pipeline: one table of stages, each naming its runner and the stages it
reads, and running a list of them on one workdir.

A row is a stage *instance*: its name is also its config section and its directory in
the workdir, and `reads` maps each input role of its runner to the instance it reads
(ppo and ppo_ptx are two instances of one runner). A config may declare more instances
(`config.instances`, below). The table orders `--stages` and resolves each stage's inputs;
stage runners never import each other (tests/test_layers.py).

Every stage instance has a key: a hash of the config sections it reads and of its inputs'
keys, recorded in `<workdir>/<stage>/stage.json` when it finishes. Two runs whose stage
keys are equal computed that stage from the same settings and inputs; the sweep runner
(experiments/sweep.py) shares such stages between cells through its stage cache.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Collection, Mapping

from experiments import (
    calibrate,
    compile_clock,
    gates,
    report,
    rundir,
    show_data,
    sources,
    toolbox,
)
from experiments.loop import StageStopped
from experiments.rundir import StageContext, on_process_0, stage_dir, write_json
from experiments.stages import compare, dpo, evaluate, pretrain, reason, rl, rm, sft
from gptjax import config as config_lib
from gptjax import host
from gptjax.errors import CheckpointError, ConfigError
from gptjax.world import config as world_config

# Sections every stage reads besides its own: what the data, tokenizer, model and mesh are.
GLOBAL_SECTIONS = ("seeds", "world", "data", "tokenizer", "model", "mesh", "tools")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # the instance: its config section and its directory in the workdir
    run: Callable[[StageContext], dict]
    reads: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role -> instance
    # Roles the runner reads only if present (the eval stage evaluates what was trained).
    optional: tuple[str, ...] = ()
    # Validates the instance's config before any stage runs (no data is read).
    check: Callable[[StageContext], object] | None = None
    sections: tuple[str, ...] = ()  # config sections read besides GLOBAL_SECTIONS and its own
    # Whether it calls the world's labeler (rankings, gold rewards): a stage that does not
    # (pretraining, SFT) is shared across sweeps of the labeler's fields (stage_key).
    judges: bool = True
    runner: str = ""  # the runner's name, for instances declared in a config
    outputs: tuple[str, ...] = ()  # workdir entries it writes besides its own directory
    # The user datasets it reads (sources.check_user_data), read before any stage runs.
    data: tuple[str, ...] = ()


def _report(ctx: StageContext) -> dict:
    # Files only, no devices: one writer in a multi-host run.
    written = on_process_0("report", functools.partial(report.run, ctx))
    return written or {"text": "report: written by process 0"}


# The eval stage's inputs: every trained model it may evaluate (those present).
TRAINED = {
    "base": "pretrain",
    "sft": "sft",
    "rm": "rm",
    **{name: name for name in ("ppo", "ppo_ptx", "grpo", "rloo", "dpo")},
    **{name: name for name in ("ppo_gold", "grpo_gold", "rloo_gold")},
}
_RL = dict(check=rl.settings, sections=("eval",), data=("prompts",))
TABLE = (
    Stage("show_data", show_data.run),
    Stage(
        "pretrain",
        pretrain.run,
        check=pretrain.settings,
        outputs=("tokenizer",),
        data=("pretrain",),
        judges=False,
    ),
    Stage("sft", sft.run, {"init": "pretrain"}, check=sft.settings, data=("demos",), judges=False),
    Stage("compare", compare.run, {"init": "sft"}, check=compare.settings),
    Stage(
        "rm",
        rm.run,
        {"init": "sft", "comparisons": "compare"},
        ("comparisons",),
        rm.settings,
        data=("comparisons",),
    ),
    Stage("ppo", rl.run, {"policy": "sft", "rm": "rm"}, **_RL),
    Stage("ppo_ptx", rl.run, {"policy": "sft", "rm": "rm"}, **_RL),
    Stage("grpo", rl.run, {"policy": "sft", "rm": "rm"}, **_RL),
    Stage("rloo", rl.run, {"policy": "sft", "rm": "rm"}, **_RL),
    Stage("ppo_gold", rl.run, {"policy": "sft"}, **_RL),
    Stage("grpo_gold", rl.run, {"policy": "sft"}, **_RL),
    Stage("rloo_gold", rl.run, {"policy": "sft"}, **_RL),
    Stage(
        "dpo",
        dpo.run,
        {"init": "sft", "comparisons": "compare"},
        ("comparisons",),
        dpo.settings,
        data=("comparisons",),
    ),
    Stage(
        "eval",
        evaluate.run,
        TRAINED,
        tuple(TRAINED),
        evaluate.settings,
        sections=("eval",),
        data=("prompts",),
    ),
    Stage(
        "reason",
        reason.run,
        {"base": "pretrain", "sft": "sft", **{r: r for r in reason.POLICIES.values()}},
        ("base", *reason.POLICIES.values()),
        reason.settings,
        sections=("eval",),
    ),
    Stage("calibrate", calibrate.run, {"base": "pretrain", "sft": "sft"}, ("sft",)),
    Stage("report", _report, {"eval": "eval"}, sections=("eval",)),
)
DEFAULT_STAGES = "pretrain,sft,compare,rm,ppo,ppo_ptx,eval,report"


def table(config) -> dict[str, Stage]:
    """The stage instances of a config: TABLE, plus `config.instances`, each
    `{name: {"like": row, "reads": {role: instance}}}` (a config section `name` must exist),
    e.g. a second comparison round {"compare_2": {"like": "compare", "reads": {"init": "ppo"}}}.
    """
    rows = {s.name: s for s in TABLE}
    for name, spec in (config.get("instances") or {}).items():
        like = spec.get("like", "")
        if like not in rows:
            raise ConfigError(f"instances.{name}.like", f"{like!r} is not a stage: {list(rows)}")
        if name not in config:
            raise ConfigError(f"instances.{name}", f"the config has no section {name!r}")
        reads = {**rows[like].reads, **dict(spec.get("reads", {}))}
        rows[name] = dataclasses.replace(rows[like], name=name, reads=reads, runner=like)
    return rows


def order(config, names: list[str]) -> list[str]:
    """The requested stages, each after the requested stages it reads (table order
    otherwise)."""
    rows = table(config)
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise ConfigError("stages", f"unknown stage(s) {unknown}; known: {list(rows)}")
    index = {name: i for i, name in enumerate(rows)}
    todo, out = sorted(set(names), key=index.__getitem__), []
    while todo:  # the first stage whose requested inputs are all placed
        ready = next(
            n for n in todo if all(s in out or s not in todo for s in rows[n].reads.values())
        )
        out.append(ready)
        todo.remove(ready)
    return out


def context(config, workdir: str, name: str, devices=None) -> StageContext:
    """What stage `name` is given; devices: its mesh's (default every device)."""
    row = table(config)[name]
    return StageContext(config, workdir, name, dict(row.reads), devices)


def stage_key(
    config,
    name: str,
    config_for: Callable[[str], object] | None = None,
    present: Collection[str] | None = None,
) -> str:
    """A hash of what stage `name` computes from: the config sections it reads and its
    inputs' keys (an input given as a `<role>_from` directory counts by its path).
    config_for(stage): the config each stage runs with (default `config` for all; a sweep
    gives shared stages other seeds than the cell's own). present: the stages of the run;
    an optional input (the eval stage's) outside it is not read, and not in the key."""
    config_for = config_for or (lambda _: config)
    own_config = config_for(name)
    row = table(own_config)[name]
    sections = (*GLOBAL_SECTIONS, name, *row.sections)
    own = {s: own_config[s].to_dict() for s in sections if s in own_config}
    if not row.judges and "world" in own:
        # The labeler's fields change no document or demo the stage reads.
        own["world"] = {
            k: v for k, v in own["world"].items() if k not in world_config.LABELER_FIELDS
        }
    inputs = {}
    for role, source in row.reads.items():
        override = own_config[name].get(f"{role}_from", "") if name in own_config else ""
        if override:
            inputs[role] = ("dir", os.path.abspath(override))
        elif present is None or source in present or role not in row.optional:
            inputs[role] = stage_key(config, source, config_for, present)
    text = json.dumps(
        {"runner": row.runner or row.name, "config": own, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def validate(config, workdir: str, names: list[str]) -> None:
    """Every requested stage's config, then the user data files they read, checked before
    any stage computes."""
    config_lib.check_paths(config)
    toolbox.check(config)
    rows = table(config)
    for name in names:
        if rows[name].check is not None:
            rows[name].check(context(config, workdir, name))
    for name in names:
        if rows[name].data:
            section = config.get(name) if name in config else None
            sources.check_user_data(config, workdir, rows[name].data, section, name)


def print_summary(summary: dict) -> None:
    if "text" in summary:
        print(summary["text"])
        return
    print(
        f"\n== {summary['stage']}: {summary['steps_run']} steps in {summary['wall_s']:.0f} s"
        + (f" (resumed from step {summary['resumed_from']})" if summary["resumed_from"] else "")
    )
    parts = [
        f"{label} {summary[key]:.4f}"
        for key, label in (
            ("heldout_loss", "held-out loss"),
            ("heldout_accuracy", "token accuracy"),
            ("train_loss", "train loss"),
        )
        if summary.get(key) is not None
    ]
    if parts:
        print("  ".join(parts))
    for prompt, completion in summary.get("samples", []):
        print(f"  {prompt!r} -> {completion!r}")


def run_stage(config, workdir: str, name: str, key: str | None = None) -> dict:
    """Runs one stage: prints its summary and gates, records its wall time and its key
    (default stage_key(config, name))."""
    ctx = context(config, workdir, name)
    start, compiled = time.perf_counter(), compile_clock.snapshot()
    summary = table(config)[name].run(ctx)
    print_summary(summary)
    seconds, compiling = time.perf_counter() - start, compile_clock.since(compiled)
    on_process_0(
        "stage times",
        functools.partial(report.record_stage_time, workdir, name, seconds, compiling),
    )
    if os.path.isdir(stage_dir(workdir, name)):
        key = key or stage_key(config, name)
        write_json(os.path.join(stage_dir(workdir, name), "stage.json"), {"key": key})
    for row in gates.after_stage(ctx, summary):
        print(report.gate_line(row))
    return summary


def run_stages(config, workdir: str, stages: list[str]) -> dict[str, dict]:
    """Validates every requested stage, then runs them in table order on one workdir.
    Returns the summaries by stage."""
    stages = order(config, stages)
    validate(config, workdir, stages)
    return {
        name: run_stage(config, workdir, name, stage_key(config, name, present=stages))
        for name in stages
    }


def run_guarded(config, workdir: str, stages: list[str]) -> int:
    """Runs the stages, with JAX's persistent compilation cache (host.use_compilation_cache);
    a bad config, data file or checkpoint, or a stop (signal, non-finite values) is one
    line on stderr and a non-zero exit code."""
    report.git_commit()  # the commit of the code this process loaded, before HEAD can move
    try:
        host.use_compilation_cache(rundir.multihost(config))
        run_stages(config, workdir, stages)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0
