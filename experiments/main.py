"""Entry point: runs the pipeline's stages on one workdir.

    python -m experiments.main                                    # the whole tiny pipeline
    python -m experiments.main --config=configs/pipeline.py:tiny --workdir=runs/tiny \
        --stages=pretrain --config.pretrain.steps=200

With no flags: pretrain -> sft -> compare -> rm -> ppo -> ppo_ptx -> eval -> report on
the built-in world, checking each stage's gates as it finishes (experiments/gates.py)
and ending with the comparison table and <workdir>/report/{report.md, results.csv,
*.png}. Rerunning with the same --workdir resumes each stage from its last checkpoint.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.loop import StageStopped
from experiments.stages import DEFAULT_STAGES, STAGES, run_stages
from gptjax.errors import ConfigError

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline.py")
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
        run_stages(config, workdir, stages)
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
