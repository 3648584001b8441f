"""Entry point: runs the pipeline's stages on one workdir.

    python -m experiments.main                                    # the whole tiny pipeline
    python -m experiments.main --config=configs/pipeline.py:tiny --workdir=runs/tiny \
        --stages=pretrain --config.pretrain.steps=200

With no flags: pretrain -> sft -> compare -> rm -> ppo -> ppo_ptx -> eval -> report on
the built-in world (the stage table: experiments/pipeline.py), checking each stage's
gates as it finishes (experiments/gates.py) and ending with the comparison table and
<workdir>/report/{report.md, results.csv, *.png}. Every requested stage's config is
checked before the first one runs; rerunning with the same --workdir resumes each stage
from its last checkpoint.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.pipeline import DEFAULT_STAGES, TABLE, run_guarded

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline.py")
try:
    # Defining the flag applies the --config.* overrides in sys.argv already.
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        os.path.normpath(_DEFAULT_CONFIG) + ":tiny",
        "Pipeline config file:preset.",
        lock_config=True,
    )
except (KeyError, AttributeError) as e:  # an override of a field that does not exist
    if __name__ != "__main__":
        raise
    _key = str(e).strip("'\"")
    _bad = [a.split("=")[0] for a in sys.argv if a.startswith("--config.") and f".{_key}" in a]
    print(f"error: {(_bad or ['--config'])[0]}: no such config field {_key!r}", file=sys.stderr)
    sys.exit(2)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (default: a new runs/<preset>-<time>)."
)
_STAGES = flags.DEFINE_string(
    "stages",
    DEFAULT_STAGES,
    f"Comma list of stages from {[s.name for s in TABLE]} (run in that order).",
)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # tfds logs a warning for every custom (content-hashed) dataset config it loads.
    logging.set_verbosity(logging.ERROR)
    try:
        config = _CONFIG.value
        _ = config.preset  # a config file that failed to load raises on first use
    except OSError as e:  # the message ends with the underlying reason, e.g. no such file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"error: --config: {lines[-1]}", file=sys.stderr)
        return 2
    stages = [s.strip() for s in _STAGES.value.split(",") if s.strip()]
    workdir = _WORKDIR.value or os.path.join(
        "runs", f"{config.preset}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    )
    os.makedirs(workdir, exist_ok=True)
    print(f"workdir: {workdir}")
    return run_guarded(config, workdir, stages)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
