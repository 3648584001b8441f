"""Ahead-of-time compile of every stage's jitted step for a TPU slice, on a CPU host.

    pip install -e ".[tpu]"     # libtpu: it compiles for TPUs without one attached
    python -m experiments.aot --config=configs/pipeline.py:llama_1b --topology=v5e:4x4
    python -m experiments.aot --config=configs/pipeline.py:gpt2_124m --stage=ppo
    python -m experiments.aot --table --write=BUILD.md   # every TPU preset x stage

MaxText's train_compile.py idea: `get_topology_desc` gives the TPU devices of a slice
(no TPU needed), the preset's mesh is built over them, the train state and batches are
`jax.ShapeDtypeStruct`s carrying their shardings (shapes from `jax.eval_shape`: no param
is ever materialised), and each stage's real jitted step (the objects the stages build:
`LMTrainer`, `PPOTrainer`) is lowered and compiled. XLA:TPU reports memory per chip and
refuses to compile a program whose temporaries exceed HBM, so an out-of-memory shows here,
not an hour into a pod reservation. `--topology` defaults to the preset's target slice
(configs/model.py TARGETS).

Programs per stage: pretrain, sft, rm, dpo: the train step; ppo, grpo, rloo: the rollout
sampler, the scoring pass (RM + reference) and the update step; ppo_ptx: its update step
(its rollout and scoring are ppo's). `all` and the table are the InstructGPT stages;
grpo, rloo and dpo compile when named (`--stage=grpo,rloo,dpo`).

Memory per chip (GiB) = arguments + outputs − donated (aliased) + temporaries + code, from
`compiled.memory_analysis()`, plus "resident": the arrays that live on the chips while the
program runs but are not its arguments (during PPO's update: the frozen RM and reference
params; during the rollout: the value model and optimizer states too). Fits: that total <=
the chip's HBM (HBM_GIB).

FLOPs per step, global (all chips), by gptjax/flops.py's convention: "analytic" is the
model's work (PPO's update: one forward of policy and value for the old log-probs and
values, then epochs x (forward + backward) of both, plus the ptx LM loss); "program" the
matmul FLOPs of the traced step. XLA's own `cost_analysis()` is printed too, but XLA:TPU
counts each while-loop body once, so with scanned layers and microbatches it is a
fraction of a step. Projected step time = program FLOPs / (chips x peak bf16 FLOP/s x
MFU), MFU 40%: a projection, not a measurement (the decode loop is bandwidth-bound).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import time

# libtpu, once installed, probes for local TPUs in every process that initialises JAX;
# compiling for a topology needs none of that.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu takes a lock file (/tmp/libtpu_lockfile) so that one process owns the local TPUs;
# compiling touches no TPU, so compiles may run side by side (tests, the table, a user).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402

import experiments.cli as cli  # noqa: E402
from experiments.aot_programs import (  # noqa: E402
    MORE_STAGES,
    STAGES,
    Program,
    bytes_per_chip,
    stage_programs,
)
from gptjax import config as config_lib  # noqa: E402
from gptjax import sharding  # noqa: E402
from gptjax.errors import ConfigError  # noqa: E402
from gptjax.flops import matmul_flops  # noqa: E402

# Per chip, by the topology name's prefix: HBM (GiB) and peak bf16 TFLOP/s (Cloud TPU docs).
HBM_GIB = {"v5e": 16, "v5p": 95, "v4": 32, "v6e": 32}
PEAK_TFLOPS = {"v5e": 197, "v5p": 459, "v4": 275, "v6e": 918}
MFU = 0.4
INSTALL = 'compiling for TPU needs libtpu: pip install -e ".[tpu]"'
GIB = 2**30


class NoLibtpu(RuntimeError):
    pass


def topology_devices(topology: str) -> list:
    """The TPU devices of a slice, e.g. "v5e:2x4" (8 chips), "v5p:2x4x4" (32 chips)."""
    if importlib.util.find_spec("libtpu") is None:
        raise NoLibtpu(INSTALL)
    chip = topology.split(":")[0]
    if chip not in HBM_GIB:
        raise ConfigError("topology", f"{topology!r}: chip {chip!r} not in {sorted(HBM_GIB)}")
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu names the bad part
        raise ConfigError("topology", f"{topology!r}: {e}") from None
    return list(desc.devices)


# --------------------------------------------------------------------- the slice


def hosts_per_block(mesh) -> int:
    """How many hosts of the slice load the same block of batch rows: 1 normally, more
    when tensor-parallel groups span hosts (gptjax/sharding.py host_blocks; raises
    ConfigError, as a run on the slice would, for a mesh no input pipeline can feed)."""
    blocks = sharding.host_blocks(mesh)
    return len(blocks) // len(set(blocks.values()))


def topology_mesh(config, devices):
    """The preset's mesh (config.mesh) over the slice's devices."""
    mesh_cfg = config_lib.from_dict(sharding.MeshConfig, config.mesh, "mesh")
    return sharding.make_mesh(mesh_cfg, devices)


# --------------------------------------------------------------------- compile

_OOM_BYTES = re.compile(r"([\d.]+)([KMGT])\b")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def compile_program(prog: Program, chip: str, chips: int) -> dict:
    """Lowers and compiles one program; returns its row (memory in GiB per chip)."""
    out = {"stage": prog.stage, "program": prog.name, "chips": chips, "hbm_gib": HBM_GIB[chip]}
    jaxpr = jax.make_jaxpr(prog.fn)(*prog.args)
    out["program_tflop"] = matmul_flops(jaxpr, prog.while_trips) / 1e12
    out["analytic_tflop"] = prog.analytic_flops / 1e12
    resident = bytes_per_chip(prog.resident) / GIB if prog.resident is not None else 0.0
    out["resident_gib"] = resident
    t0 = time.perf_counter()
    try:
        compiled = prog.fn.lower(*prog.args).compile()
    except Exception as e:  # XLA:TPU refuses programs that cannot fit in HBM
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg:
            raise
        out["compile_s"] = time.perf_counter() - t0
        out["fits"] = False
        out["error"] = msg.split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
        sizes = [float(v) * _UNITS[u] / GIB for v, u in _OOM_BYTES.findall(out["error"])]
        out["total_gib"] = (max(sizes) if sizes else float("nan")) + resident
        return out
    out["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for field in ("argument", "output", "alias", "temp", "generated_code"):
        out[f"{field}_gib"] = getattr(mem, f"{field}_size_in_bytes") / GIB
    out["total_gib"] = (
        out["argument_gib"]
        + out["output_gib"]
        - out["alias_gib"]
        + out["temp_gib"]
        + out["generated_code_gib"]
        + resident
    )
    out["fits"] = out["total_gib"] <= HBM_GIB[chip]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["xla_tflop_per_chip"] = float((cost or {}).get("flops", float("nan"))) / 1e12
    out["projected_s"] = out["program_tflop"] / (chips * PEAK_TFLOPS[chip] * MFU)
    return out


def run_aot(config, topology: str, stages, log=print, programs=()) -> list[dict]:
    """Compiles each stage's programs (those named in `programs`, default all) for the
    slice; returns one row per program."""
    devices = topology_devices(topology)
    chip = topology.split(":")[0]
    mesh = topology_mesh(config, devices)
    log(
        f"{config.preset} on {topology}: {len(devices)} chips, mesh "
        f"{dict(mesh.shape)}, HBM {HBM_GIB[chip]} GiB per chip"
    )
    shared = hosts_per_block(mesh)
    if shared > 1:
        log(
            f"  tensor-parallel groups span hosts: each {shared} hosts load the same rows "
            "of the batch (gptjax/sharding.py host_blocks)"
        )
    rows = []
    for stage in stages:
        for prog in stage_programs(config, stage, mesh):
            if programs and prog.name not in programs:
                continue
            row = {
                "preset": config.preset,
                "topology": topology,
                "hosts_per_block": shared,
                **compile_program(prog, chip, len(devices)),
            }
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(r: dict) -> str:
    head = f"  {r['stage']:>8} {r['program']:<10}"
    if "error" in r:
        return (
            f"{head} DOES NOT FIT: {r['error']} (+ resident {r['resident_gib']:.2f} GiB); "
            f"compile {r['compile_s']:.0f} s"
        )
    return (
        f"{head} per chip GiB: args {r['argument_gib']:.2f} out {r['output_gib']:.2f} "
        f"donated {r['alias_gib']:.2f} temp {r['temp_gib']:.2f} code "
        f"{r['generated_code_gib']:.2f} resident {r['resident_gib']:.2f} = total "
        f"{r['total_gib']:.2f} of {r['hbm_gib']}: {'fits' if r['fits'] else 'DOES NOT FIT'}\n"
        f"{'':21}TFLOP/step program {r['program_tflop']:.1f} (per chip "
        f"{r['program_tflop'] / r['chips']:.2f}; XLA cost_analysis {r['xla_tflop_per_chip']:.2f},"
        f" loop bodies once) vs analytic {r['analytic_tflop']:.1f}; compile "
        f"{r['compile_s']:.0f} s; projected {r['projected_s']:.3g} s at {MFU:.0%} MFU"
    )


# ------------------------------------------------------------------------ main


def main(argv) -> int:
    from absl import flags

    f = flags.FLAGS
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 2
    stages = STAGES if f.stage == "all" else tuple(s.strip() for s in f.stage.split(","))
    try:
        if f.table:
            from configs import model as model_presets
            from experiments.aot_table import table_markdown, table_rows, write_between_markers

            presets = f.presets.split(",") if f.presets else list(model_presets.TARGETS)
            programs = tuple(p for p in f.programs.split(",") if p)
            rows = table_rows(presets, f.results, stages, cached=f.cached, redo=programs)
            text = table_markdown(rows)
            print(text)
            if f.write:
                write_between_markers(f.write, text)
            ok = all(r.get("fits") for r in rows)
        else:
            from configs import model as model_presets

            config = _CONFIG.value
            topology = f.topology or model_presets.TARGETS.get(config.preset, ("",))[0]
            if not topology:
                raise ConfigError("topology", f"preset {config.preset!r} has no target slice")
            rows = run_aot(
                config,
                topology,
                stages,
                programs=tuple(f.programs.split(",")) if f.programs else (),
            )
            ok = all(r["fits"] for r in rows)
            print("all programs fit" if ok else "some program DOES NOT FIT")
    except NoLibtpu as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if ok else 1


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    default = os.path.join(os.path.dirname(__file__), "..", "configs", "pipeline.py")
    config = config_flags.DEFINE_config_file(
        "config", os.path.normpath(default) + ":gpt2_124m", "Pipeline config file:preset."
    )
    flags.DEFINE_string("topology", "", "TPU slice, e.g. v5e:2x4; default the preset's.")
    flags.DEFINE_string(
        "stage", "all", f"Comma list from {STAGES + MORE_STAGES}, or all (the table's {STAGES})."
    )
    flags.DEFINE_bool("table", False, "Compile every TPU preset on its target slice.")
    flags.DEFINE_string("presets", "", "With --table: comma list (default all TARGETS).")
    flags.DEFINE_string("results", "docs/aot", "With --table: per-preset JSON cache.")
    flags.DEFINE_string(
        "programs",
        "",
        "Comma list of programs (train_step, rollout, score, update) to compile; with "
        "--table: recompile these in the cache, keep its other rows.",
    )
    flags.DEFINE_string("write", "", "With --table: a file whose aot markers get the table.")
    flags.DEFINE_bool("cached", False, "With --table: only the results already compiled.")
    return config


if __name__ == "__main__":
    _CONFIG = _define_flags()
    cli.run(main)
