"""The pipeline's stages by name, and running a list of them on one workdir.

Kept apart from experiments/main.py (which defines the command-line flags) so that the
sweep runner can run stages too.
"""

from __future__ import annotations

import functools
import sys
import time

from experiments import (
    calibrate,
    common,
    compare,
    evaluate,
    gates,
    ppo,
    pretrain,
    report,
    rm,
    sft,
    show_data,
)
from experiments.loop import StageStopped
from gptjax import config as config_lib
from gptjax.errors import CheckpointError, ConfigError

STAGES = {
    "pretrain": pretrain.run,
    "show_data": show_data.run,
    "calibrate": calibrate.run,
    "sft": sft.run,
    "eval": evaluate.run,
    "compare": compare.run,
    "rm": rm.run,
    "ppo": ppo.run,
    "ppo_ptx": ppo.run_ptx,
    "report": lambda config, workdir: _report(config, workdir),
}
DEFAULT_STAGES = "pretrain,sft,compare,rm,ppo,ppo_ptx,eval,report"


def _report(config, workdir: str) -> dict:
    # Files only, no devices: one writer in a multi-host run.
    written = common.on_process_0("report", functools.partial(report.run, config, workdir))
    return written or {"text": "report: written by process 0"}


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


def run_stages(config, workdir: str, stages: list[str]) -> dict[str, dict]:
    """Runs stages in order on one workdir: prints each summary and its gates, records
    its wall time. Returns the summaries by stage."""
    summaries = {}
    for stage in stages:
        start = time.perf_counter()
        summary = STAGES[stage](config, workdir)
        print_summary(summary)
        seconds = time.perf_counter() - start
        record = functools.partial(report.record_stage_time, workdir, stage, seconds)
        common.on_process_0("stage times", record)
        for row in gates.after_stage(stage, config, workdir, summary):
            print(report.gate_line(row))
        summaries[stage] = summary
    return summaries


def run_guarded(config, workdir: str, stages: list[str]) -> int:
    """Runs the stages; a bad config, data file or checkpoint, or a stop (signal,
    non-finite values) is one line on stderr and a non-zero exit code."""
    try:
        config_lib.check_paths(config)
        run_stages(config, workdir, stages)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0
