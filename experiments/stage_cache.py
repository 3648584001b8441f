"""The stage cache: a stage instance's outputs stored under its key (experiments/pipeline.py
stage_key: a hash of the config sections it reads and of its inputs' keys), so that runs
which would compute the same stage from the same settings and inputs share it.

    <cache>/<stage>/<key[:16]>/<stage>/     the stage's directory (and any other outputs,
                                            e.g. pretrain's tokenizer/)
    <cache>/<stage>/<key[:16]>/DONE.json    its key and summary, written when it finished

A run's workdir links each stage's entries (`<workdir>/<stage>` -> the cache), so the
stages themselves read and write their usual paths; a finished entry is not run again. A
stage that stopped half way resumes from its checkpoints in the entry. The sweep runner
(experiments/sweep.py) runs every cell through one cache: cells share each stage whose
key is the same (the stages a variant does not change, at the seeds they share) and run
the rest, for every seed (all of them with `seed_all`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from experiments import pipeline
from experiments.rundir import stage_dir

DONE = "DONE.json"


def entry_dir(cache: str, stage: str, key: str) -> str:
    return os.path.join(cache, stage, key[:16])


def _link(src: str, dst: str) -> None:
    if os.path.islink(dst) and os.readlink(dst) == src:
        return
    if os.path.lexists(dst):
        raise FileExistsError(f"{dst} exists and is not the cache's {src}")
    os.symlink(src, dst)


def finished(entry: str, key: str) -> dict | None:
    """The summary of a finished cache entry with this key, else None."""
    path = os.path.join(entry, DONE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    return done["summary"] if done.get("key") == key else None


def run_cached(
    config_for: Callable[[str], object],
    workdir: str,
    stages: list[str],
    cache: str,
    data_dir: str | None = None,
    shared_from: str | None = None,
) -> dict[str, dict]:
    """Runs `stages` (table order) on `workdir` through the cache; returns the summaries.

    config_for(stage): the config the stage runs with. data_dir: a prepared-data directory
    linked as `<workdir>/data` (shared, its datasets are named by content hash).
    shared_from: a finished pipeline workdir whose stages are linked instead of run when
    their recorded key (`<stage>/stage.json`) is the key wanted here.
    """
    base = config_for(stages[0])
    stages = pipeline.order(base, stages)
    for name in stages:  # every stage's config, before any stage computes
        pipeline.validate(config_for(name), workdir, [name])
    rows = pipeline.table(base)
    os.makedirs(workdir, exist_ok=True)
    if data_dir is not None:
        os.makedirs(data_dir, exist_ok=True)
        _link(os.path.abspath(data_dir), os.path.join(workdir, "data"))
    summaries = {}
    for name in stages:
        key = pipeline.stage_key(base, name, config_for, present=stages)
        entries = (name, *rows[name].outputs)
        reused = _shared(shared_from, name, key)
        if reused is not None:
            for out in entries:
                _link(os.path.abspath(os.path.join(shared_from, out)), os.path.join(workdir, out))
            summaries[name] = reused
            print(f"== {name}: shared from {shared_from} (key {key[:12]})")
            continue
        entry = entry_dir(cache, name, key)
        for out in entries:
            os.makedirs(os.path.join(entry, out), exist_ok=True)
            _link(os.path.abspath(os.path.join(entry, out)), os.path.join(workdir, out))
        done = finished(entry, key)
        if done is not None:
            summaries[name] = done
            print(f"== {name}: cached (key {key[:12]})")
            continue
        summary = pipeline.run_stage(config_for(name), workdir, name, key)
        with open(os.path.join(entry, DONE + ".tmp"), "w") as f:
            json.dump({"key": key, "summary": summary}, f, default=_plain)
        os.replace(os.path.join(entry, DONE + ".tmp"), os.path.join(entry, DONE))
        summaries[name] = json.loads(json.dumps(summary, default=_plain))
    return summaries


def _shared(shared_from: str | None, name: str, key: str) -> dict | None:
    if shared_from is None:
        return None
    path = os.path.join(stage_dir(shared_from, name), "stage.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        recorded = json.load(f)
    return recorded.get("summary", {}) if recorded.get("key") == key else None


def _plain(x):
    return float(x) if hasattr(x, "__float__") else str(x)
