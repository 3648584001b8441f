"""The reason stage's results (experiments/stages/reason.py) read back: over several
runs (seeds), the mean and 95% t-interval over runs of every accuracy and every paired
difference; and flattened to the eval stage's shape for the sweep runner.

    python -m experiments.reason_report runs/reason_seed0 runs/reason_seed1 runs/reason_seed2

Each run is one whole pipeline (pretrain, SFT, reason) at its own seeds; a difference's
interval over seeds is the one a claim rests on (the per-run bootstrap intervals are
over tasks only).
"""

from __future__ import annotations

import json
import os
import sys

from gptjax import eval_stats
from gptjax.world import reasoning

KINDS = [f"accuracy_{k}" for k in reasoning.KINDS] + ["accuracy_multistep", "abstention_unknown"]


def flat_variants(out: dict) -> dict:
    """The results as the eval stage's shape, {"MODEL (mode)": {protocol: {metric: stat}}}
    (the sweep runner's cells): self-consistency's vote under "sample" (it samples), the
    tool metrics as stats of their own."""
    flat = {}
    for name, res in out["variants"].items():
        for mode, by_proto in res.items():
            if mode == "differences":
                continue
            for proto, m in by_proto.items():
                stats = {k: v for k, v in m.items() if k != "tools"}
                for k, v in m.get("tools", {}).items():
                    if k != "replies":
                        stats[f"tools_{k}"] = {
                            "mean": v,
                            "lo": float("nan"),
                            "hi": float("nan"),
                            "n": 1,
                        }
                flat.setdefault(f"{name} ({mode})", {})["sample" if proto == "vote" else proto] = (
                    stats
                )
    return flat


def _cell(values) -> str:
    mean, lo, hi = eval_stats.t_interval(values)
    return f"{mean:.3f} [{lo:.2f}, {hi:.2f}]" if len(values) > 1 else f"{mean:.3f}"


def summarize(results: list[dict]) -> str:
    lines = [f"runs: {len(results)}; mean [95% t-interval over runs]"]
    names = [k.replace("accuracy_", "") for k in KINDS]
    header = f"{'model':<20}{'mode':<7}{'protocol':<9}" + "".join(f"{n[:18]:>22}" for n in names)
    lines.append(header)
    first = results[0]["variants"]
    for name, res in first.items():
        for mode, by_proto in res.items():
            if mode == "differences" or any(mode not in r["variants"][name] for r in results):
                continue
            for proto in by_proto:
                cells = []
                for k in KINDS:
                    values = [
                        r["variants"][name][mode][proto][k]["mean"]
                        for r in results
                        if r["variants"][name][mode][proto].get(k, {}).get("n")
                    ]
                    cells.append(f"{_cell(values) if values else '-':>22}")
                lines.append(f"{name:<20}{mode:<7}{proto:<9}" + "".join(cells))
        for label, by in res.get("differences", {}).items():
            for proto, d in by.items():
                values = [
                    r["variants"][name]["differences"].get(label, {}).get(proto, {}).get("mean")
                    for r in results
                ]
                if None in values:
                    continue
                lines.append(f"  {name}: {label} ({d['metric']}, {proto}): {_cell(values)}")
        tool_rows = [
            (mode, proto)
            for mode, by_proto in res.items()
            if mode != "differences" and all(mode in r["variants"][name] for r in results)
            for proto, m in by_proto.items()
            if m.get("tools", {}).get("call_rate", 0) > 0.5
        ]
        for mode, proto in tool_rows:
            for key in (
                "call_rate",
                "valid_calls",
                "right_result_rate",
                "accuracy_given_right_result",
            ):
                values = [r["variants"][name][mode][proto]["tools"][key] for r in results]
                lines.append(f"  {name} {mode} {proto}: {key} {_cell(values)}")
    recalls = [r["lookup_recall"]["recall_known"] for r in results if "lookup_recall" in r]
    if recalls:
        lines.append(f"lookup recall@k on known people's facts: {_cell(recalls)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m experiments.reason_report RUN_DIR [RUN_DIR ...]", file=sys.stderr)
        return 2
    results = []
    for run in argv:
        path = os.path.join(run, "reason", "results.json")
        if not os.path.exists(path):
            print(f"error: no {path}: run --stages=reason in {run} first", file=sys.stderr)
            return 2
        with open(path) as f:
            results.append(json.load(f))
    print(summarize(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
