"""Entry point: runs the pipeline's stages on one workdir.

    python -m experiments.main                                    # tiny pipeline on the world
    python -m experiments.main --config=configs/pipeline.py:tiny --workdir=runs/tiny \
        --stages=pretrain --config.pretrain.steps=200

Rerunning with the same --workdir resumes each stage from its last checkpoint.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import calibrate, evaluate, pretrain, sft, show_data
from experiments.loop import StageStopped
from gptjax.errors import ConfigError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline.py")
STAGES = {
    "pretrain": pretrain.run,
    "show_data": show_data.run,
    "calibrate": calibrate.run,
    "sft": sft.run,
    "eval": evaluate.run,
}
DEFAULT_STAGES = "pretrain"

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.normpath(_DEFAULT_CONFIG) + ":tiny",
    "Pipeline config file:preset.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: a new runs/<preset>-<time>)."
)
_STAGES = flags.DEFINE_string(
    "stages", DEFAULT_STAGES, f"Comma list of stages from {list(STAGES)}."
)


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


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # tfds logs a warning for every custom (content-hashed) dataset config it loads.
    logging.set_verbosity(logging.ERROR)
    config = _CONFIG.value
    stages = [s.strip() for s in _STAGES.value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stage(s) {unknown}; known: {list(STAGES)}", file=sys.stderr)
        return 2
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    os.makedirs(workdir, exist_ok=True)
    print(f"workdir: {workdir}")
    try:
        for stage in stages:
            print_summary(STAGES[stage](config, workdir))
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run():
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
