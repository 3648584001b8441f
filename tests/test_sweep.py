"""The sweep runner and the reports: verdict rule, skipping finished cells, report files."""

import json
import os

import numpy as np
import pytest

from configs import sweep as sweep_configs
from experiments import report
from experiments import sweep as sweep_lib
from gptjax.errors import ConfigError


def _stat(mean):
    return {"mean": mean, "lo": mean - 0.05, "hi": mean + 0.05, "n": 64}


def _cell(variant, seed, ppo_gold, sft_gold=0.2, kl=1.0, tax=2.0):
    metrics = lambda gold, rm, k: {  # noqa: E731
        "gold_reward": _stat(gold),
        "rm_reward": _stat(rm),
        "kl_to_sft": _stat(k),
        "entropy": _stat(1.0),
        "distinct_2": _stat(0.5),
        "unique_rate": _stat(0.6),
        "accuracy": _stat(0.5),
    }
    return {
        "variant": variant,
        "seed": seed,
        "variants": {
            "SFT": {
                "greedy": metrics(sft_gold, 0.0, 0.0),
                "sample": {**metrics(sft_gold, 0.0, 0.0), "kl_to_sft": _stat(0.0)},
                "model": {"heldout_lm_loss": _stat(tax - 0.1)},
            },
            "PPO": {
                "greedy": metrics(ppo_gold, 1.0, kl),
                "sample": metrics(ppo_gold, 1.0, kl),
                "model": {"heldout_lm_loss": _stat(tax)},
            },
        },
    }


@pytest.mark.parametrize(
    "effects, sign, want",
    [
        ([0.10, 0.12, 0.09], +1, "supported"),
        ([0.10, 0.12, 0.09], -1, "contradicted"),
        ([-0.10, -0.12, -0.09], -1, "supported"),
        ([0.10, -0.10, 0.05], +1, "inconclusive"),
        ([0.30], +1, "inconclusive"),  # one seed: no interval
    ],
)
def test_verdict_rule(effects, sign, want):
    assert sweep_lib.verdict(effects, sign)["verdict"] == want


def test_findings_are_judged_on_paired_seeds():
    cells = [_cell("a", s, ppo_gold=0.5 + 0.01 * s) for s in range(3)]
    cells += [_cell("b", s, ppo_gold=0.3 + 0.01 * s) for s in range(3)]
    finding = dict(
        name="a beats b",
        metric="gold_reward",
        protocol="sample",
        a=("a", "PPO"),
        b=("b", "PPO"),
        sign=+1,
        why="",
    )
    (v,) = sweep_lib.judge([finding], cells)
    assert v["verdict"] == "supported" and v["effect"] == pytest.approx(0.2)
    assert v["seeds"] == 3 and v["lo"] == pytest.approx(0.2)  # paired: no variance


def _fake_stages(monkeypatch, ran):
    """pipeline.run_stage as a recorder: (cell, stage, seed) of every stage actually run."""

    def fake_run_stage(config, workdir, name, key=None):
        cell = os.path.relpath(workdir, os.path.dirname(os.path.dirname(os.path.dirname(workdir))))
        ran.append((cell, name, config.seeds.init))
        if name == "eval":
            variant = os.path.basename(os.path.dirname(workdir))
            return {"variants": _cell(variant, config.seeds.init, 0.4)["variants"]}
        return {"stage": name}

    class FakeTokenizer:
        hash = "f" * 64

    monkeypatch.setattr(sweep_lib.stage_cache.pipeline, "run_stage", fake_run_stage)
    monkeypatch.setattr(sweep_lib.stage_cache.pipeline, "validate", lambda *a: None)
    monkeypatch.setattr(sweep_lib.sources, "get_tokenizer", lambda config, wd: FakeTokenizer())


def test_sweep_runner_skips_finished_cells(tmp_path, monkeypatch):
    sweep = sweep_configs.get_config("ptx")
    with sweep.unlocked():
        sweep.seeds = [0, 1]
    workdir = tmp_path / "sweep"
    done = sweep_lib.cell_dir(str(workdir), "ppo", 0)
    os.makedirs(done)
    with open(os.path.join(done, "DONE.json"), "w") as f:
        json.dump(_cell("ppo", 0, 0.5), f)
    ran = []
    _fake_stages(monkeypatch, ran)
    out = sweep_lib.run_sweep(sweep, "ptx", str(workdir))
    # The stages before ppo are not seeded: run once, shared by every cell; ppo (whose
    # ptx_coef the variants set) and eval run per cell.
    shared = [("cells/ppo/seed1", s, 0) for s in ("pretrain", "sft", "compare", "rm")]
    assert sorted(ran) == sorted(
        [
            *shared,
            ("cells/ppo/seed1", "ppo", 1),
            ("cells/ppo/seed1", "eval", 1),
            ("cells/ppo_ptx/seed0", "ppo", 0),
            ("cells/ppo_ptx/seed0", "eval", 0),
            ("cells/ppo_ptx/seed1", "ppo", 1),
            ("cells/ppo_ptx/seed1", "eval", 1),
        ]
    )
    # Cells link their stages' cache entries: the shared ones are the same entry.
    a, b = (workdir / f"cells/{v}/seed1/sft" for v in ("ppo", "ppo_ptx"))
    assert os.path.islink(a) and os.path.realpath(a) == os.path.realpath(b)
    a, b = (workdir / f"cells/{v}/seed1/ppo" for v in ("ppo", "ppo_ptx"))
    assert os.path.realpath(a) != os.path.realpath(b)
    assert os.path.exists(out["report"])
    ran.clear()
    sweep_lib.run_sweep(sweep, "ptx", str(workdir))
    assert ran == []  # every cell finished: nothing reruns


def test_seed_all_reruns_the_whole_pipeline_per_seed_and_shares_it_across_variants(
    tmp_path, monkeypatch
):
    sweep = sweep_configs.get_config("ptx")
    with sweep.unlocked():
        sweep.seeds, sweep.seed_all = [0, 1], True
    ran = []
    _fake_stages(monkeypatch, ran)
    sweep_lib.run_sweep(sweep, "ptx", str(tmp_path / "sweep"))
    for stage in ("pretrain", "sft", "compare", "rm"):  # once per seed, whatever the variant
        assert sorted(seed for _, s, seed in ran if s == stage) == [0, 1]
    assert sorted(seed for _, s, seed in ran if s == "ppo") == [0, 0, 1, 1]


def test_a_finished_run_shares_the_stages_whose_key_matches(tmp_path, monkeypatch):
    from experiments import pipeline

    sweep = sweep_configs.get_config("ptx")
    with sweep.unlocked():
        sweep.seeds = [0]
    base = sweep_lib.cell_config(sweep, None, 0, "pretrain")
    shared = tmp_path / "default"
    for stage in ("pretrain", "sft", "compare", "rm"):
        (shared / stage).mkdir(parents=True)
        # The default run's stages record their keys; the RM's was made with other settings.
        key = pipeline.stage_key(base, stage, present=sweep.stages)
        key = "other" if stage == "rm" else key
        (shared / stage / "stage.json").write_text(json.dumps({"key": key}))
    (shared / "tokenizer").mkdir()
    ran = []
    _fake_stages(monkeypatch, ran)
    sweep_lib.run_sweep(sweep, "ptx", str(tmp_path / "sweep"), shared_from=str(shared))
    assert sorted(s for _, s, _ in ran) == ["eval", "eval", "ppo", "ppo", "rm"]
    cell = tmp_path / "sweep" / "cells" / "ppo" / "seed0"
    assert os.path.realpath(cell / "sft") == str(shared / "sft")
    assert os.path.realpath(cell / "tokenizer") == str(shared / "tokenizer")


PRESETS = (
    "kl",
    "ptx",
    "best_of_n",
    "rm_data",
    "label_noise",
    "code_frac",
    "verbosity",
    "abstention",
    "algorithms",
    "reasoning",
)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_judges_variants_it_runs(name):
    sweep = sweep_configs.get_config(name)
    sweep_lib.check_findings(sweep)  # raises on a finding that names a missing variant
    assert sweep.findings and len(sweep.variants) >= 2


def test_a_finding_on_a_missing_variant_fails_before_any_cell_runs(tmp_path, monkeypatch):
    from gptjax.errors import ConfigError

    sweep = sweep_configs.get_config("kl")
    sweep.findings[1]["a"] = ("beta_1e-3", "PPO")  # a variant the preset does not have
    monkeypatch.setattr(sweep_lib, "run_cell", lambda *a: pytest.fail("a cell ran"))
    with pytest.raises(ConfigError, match=r"sweep.findings.*over-optimisation.*beta_1e-3"):
        sweep_lib.run_sweep(sweep, "kl", str(tmp_path))


def test_sweep_report_from_fake_results(tmp_path):
    sweep = sweep_configs.get_config("kl")
    cells = [
        _cell(v, s, ppo_gold=g + 0.01 * s, kl=k)
        for v, g, k in (("beta_3e-1", 0.5, 1.0), ("beta_3e-2", 0.3, 6.0))
        for s in range(3)
    ]
    prov = {
        "commit": "abc",
        "packages": {"jax": "x"},
        "world_hash": "w",
        "tokenizer_hash": "t" * 16,
        "seeds": {"init": 0},
    }
    out = sweep_lib.write_report(str(tmp_path), "kl", sweep, cells, prov)
    text = open(out["report"]).read()
    verdicts = {v["name"]: v["verdict"] for v in out["verdicts"]}
    assert verdicts["RLHF beats SFT on gold reward"] == "supported"
    assert verdicts["over-optimisation lowers gold reward"] == "supported"
    assert verdicts["the proxy RM keeps rising"] == "inconclusive"  # equal RM: effect 0
    assert "**supported**" in text and "commit: `abc`" in text
    rows = report.read_csv(os.path.join(tmp_path, "results.csv"))
    assert {r["commit"] for r in rows} == {"abc"} and {r["seed"] for r in rows} == {"0", "1", "2"}
    for path in out["plots"].values():
        assert os.path.getsize(path) > 1000  # a real PNG


def test_run_report_from_fake_eval_results(tmp_path):
    variants = _cell("x", 0, 0.5)["variants"]
    gates = [
        {
            "name": "g",
            "description": "a gate",
            "op": ">=",
            "threshold": 0.5,
            "value": 0.7,
            "passed": True,
            "stage": "eval",
        }
    ]
    prov = {
        "commit": "abc",
        "packages": {},
        "world_hash": "w",
        "tokenizer_hash": "t" * 16,
        "seeds": {"init": 0},
    }
    # A workdir with a PPO stage's and the RM's logged metrics: one curve figure each.
    workdir = tmp_path / "run"
    (workdir / "ppo").mkdir(parents=True)
    (workdir / "rm" / "train").mkdir(parents=True)
    rows = [{"step": i, "kl": 0.1 * i, "clipfrac": 0.1, "score": i} for i in range(1, 6)]
    (workdir / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (workdir / "rm" / "train" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    (workdir / "eval").mkdir()  # no metrics: no figure
    compiling = {"sft": {"total_s": 12.4, "programs": 7}}
    paths = report.write_run_report(
        str(tmp_path / "report"), "TABLE", variants, gates, {"sft": 61.0, "rm": 5.0}, prov,
        str(workdir), compiling,
    )  # fmt: skip
    text = open(paths["report"]).read()
    assert "TABLE" in text and "PASS" in text and "| sft | 61 | 12 | 7 |" in text
    assert "| rm | 5 | — | — |" in text  # timed before compile seconds were recorded
    assert {k for k in paths if k.startswith("curves_")} == {"curves_ppo", "curves_rm"}
    assert "![ppo](curves_ppo.png)" in text and os.path.getsize(paths["curves_ppo"]) > 1000
    assert os.path.getsize(paths["gold_plot"]) > 1000 and os.path.exists(paths["kl_plot"])
    assert len(report.read_csv(paths["csv"])) == sum(
        len(v[p]) for v in variants.values() for p in ("greedy", "sample", "model")
    )


def _algorithm_cell(variant, seed, models):
    """A cell whose models have (KL to SFT, gold reward); greedy gold = sample gold."""

    def metrics(kl, gold):
        return {"gold_reward": _stat(gold), "kl_to_sft": _stat(kl), "rm_reward": _stat(0.0)}

    return {
        "variant": variant,
        "seed": seed,
        "variants": {
            name: {"greedy": metrics(kl, gold), "sample": metrics(kl, gold), "model": {}}
            for name, (kl, gold) in models.items()
        },
    }


def test_algorithms_report_reads_gold_at_matched_kl_inside_the_measured_range(tmp_path):
    from experiments import frontier

    sweep = sweep_configs.get_config("algorithms")
    betas = list(sweep.variants)
    cells = []
    for s in range(3):
        for i, variant in enumerate(betas):  # one KL per β: 0.2, 0.6, 1.0 (PPO)
            models = {
                "SFT": (0.0, 0.0 + 0.01 * s),
                "PPO": (0.2 + 0.4 * i, 0.5 * (0.2 + 0.4 * i) + 0.01 * s),  # gold = KL/2
                "GRPO": (0.9 + 0.1 * i, -0.1 + 0.01 * s),  # measured only above 0.9
                "PPO (gold reward)": (0.5, 0.9),
            }
            if i == 0:  # references in one variant: temperature and best-of-n curves
                models.update(
                    {"SFT T=0.5": (1.0, 0.1 + 0.01 * s), "best-of-4": (1.0, 0.3 + 0.01 * s)}
                )
            cells.append(_algorithm_cell(variant, s, models))
    spec = sweep.frontier
    spec.methods = ["PPO", "GRPO"]
    analysis = frontier.analyse(spec, sweep, cells)
    at = {row["kl"]: row for row in analysis["matched"]}
    ppo = at[0.4]["methods"]["PPO"]
    # Interpolated on PPO's own points: gold = KL/2 (+ 0.01 seed), per seed.
    assert ppo["values"] == pytest.approx({0: 0.2, 1: 0.21, 2: 0.22})
    assert at[0.4]["methods"]["GRPO"]["values"] == {}  # never extrapolated below 0.9
    # References from SFT at KL 0: temperature at 0.4 = 0.04 (+ seed); best-of-n 0.12.
    assert at[0.4]["methods"]["matched-temperature SFT"]["values"][0] == pytest.approx(0.04)
    versus = at[0.4]["versus"]
    assert versus["PPO", "matched-temperature SFT"]["verdict"] == "beats"
    assert versus["PPO", "best-of-n"]["verdict"] == "beats"  # 0.2 > 0.12, every seed
    assert versus["GRPO", "best-of-n"]["seeds"] == 0
    beats = {(b["method"], b["variant"]): b["verdict"] for b in analysis["beats_sft"]}
    assert beats["PPO", betas[1]] == "beats SFT" and beats["GRPO", betas[0]] == "loses to SFT"
    lines = "\n".join(frontier.report_lines(analysis, spec))
    assert "not measured (KL outside the range)" in lines
    path = str(tmp_path / "frontier.png")
    frontier.plot(path, cells, spec)
    assert os.path.getsize(path) > 1000


def test_gate_stats_flag_a_gate_whose_worst_seed_is_within_two_sd_of_its_floor():
    def cell(seed, acc, gap):
        rows = {
            "acc": dict(description="accuracy", op=">=", threshold=0.6, value=acc),
            "gap": dict(description="gap", op="<=", threshold=0.8, value=gap),
        }
        for r in rows.values():
            r["passed"] = r["value"] >= 0.6 if r["op"] == ">=" else r["value"] <= 0.8
        return {"variant": "default", "seed": seed, "variants": {}, "gates": rows}

    accs, gaps = [0.70, 0.72, 0.69, 0.71, 0.70], [0.60, 0.75, 0.62, 0.70, 0.79]
    cells = [cell(*c) for c in zip(range(5), accs, gaps)]
    # Another variant's cells (a changed world) are its own rows, not pooled with these.
    cells += [{**cell(s, 0.3, 0.9), "variant": "other"} for s in range(3)]
    stats = sweep_lib.gate_stats(cells)
    rows = {r["name"]: r for r in stats if r["variant"] == "default"}
    other = {r["name"]: r for r in stats if r["variant"] == "other"}
    assert other["acc"]["n"] == 3 and other["acc"]["passed"] == 0 and other["acc"]["fragile"]
    acc, gap = rows["acc"], rows["gap"]
    assert acc["n"] == gap["n"] == 5 and acc["passed"] == gap["passed"] == 5
    assert acc["min"] == 0.69 and acc["sd"] == pytest.approx(np.std(accs, ddof=1))
    assert acc["mean"] == pytest.approx(np.mean(accs)) and acc["lo"] < acc["mean"] < acc["hi"]
    assert not acc["fragile"]  # 0.69 - 0.6 = 0.09 > 2 x 0.011
    assert gap["fragile"]  # worst 0.79 is 0.01 from 0.8, sd 0.08
    assert "| default | accuracy | >= 0.6 |" in "\n".join(sweep_lib.gate_lines(stats))


def test_a_demoted_gate_is_reported_against_its_floor_but_never_fails_a_run():
    from gptjax.world.calibration import Gate, check

    gate = Gate("g", "PPO − SFT accuracy", ">=", -0.02, "eval")
    demoted = Gate("g", "PPO − SFT accuracy", ">=", -0.02, "eval", demoted="fragile over 5 seeds")
    row, row_d = check(gate, -0.04), check(demoted, -0.04)
    assert report.gate_failed(row) and not report.gate_failed(row_d)
    assert row_d["passed"] is False  # still measured against its floor
    assert "[gate FAIL]" in report.gate_line(row)
    assert "[metric reported, not gated (below floor)]" in report.gate_line(row_d)
    table = report.gates_md([row_d])
    assert "fragile over 5 seeds" in table and "FAIL" not in table and "reported, not" in table


def test_every_demoted_gate_is_a_gate():
    from experiments import gates

    names = {g.name for g in gates.WORLD_GATES} | {gates.RM_GATE.name, "ppo_accuracy_kept"}
    names |= {g.name for g, _ in gates.EVAL_GATES}
    assert set(gates.DEMOTED) <= names and len(names - set(gates.DEMOTED)) == 5


def test_a_method_is_read_against_each_reference_at_its_own_kl():
    from experiments import frontier

    cells = [
        _algorithm_cell(
            "v", s, {"SFT": (0.0, 0.0), "SFT T=0.5": (1.0, 0.4), "PPO": (0.5, 0.3 + 0.01 * s)}
        )
        for s in range(3)
    ]
    cells.append(_algorithm_cell("w", 0, {"SFT": (0.0, 0.0), "SFT T=0.5": (1.0, 4.0)}))
    got = frontier.at_own_kl(cells, [0, 1, 2], "v", "PPO", frontier.TEMPERATURE)
    # SFT T's curve at PPO's KL 0.5 is 0.2 (variant w's curve is not read): +0.1, +0.11, +0.12
    assert got["seeds"] == 3 and got["stat"][0] == pytest.approx(0.11)
    assert got["verdict"] == "beats"
    far = frontier.at_own_kl(cells, [0], "v", "PPO", frontier.BEST_OF)  # no best-of-n curve
    assert far["seeds"] == 0 and far["verdict"] == "inconclusive"


def test_seeding_only_the_evaluator_is_refused():
    sweep = sweep_configs.get_config("best_of_n")
    sweep_lib.check_findings(sweep)
    sweep.seeded = ["eval"]
    with pytest.raises(ConfigError, match="sweep.seeded: .*identical cells"):
        sweep_lib.check_findings(sweep)
    sweep.seed_all = True
    sweep_lib.check_findings(sweep)


@pytest.mark.parametrize("form, alpha, beta", [("bon", 0.8, 0.3), ("rl", 0.5, 0.4)])
def test_overopt_fits_recover_gaos_coefficients_and_peak(form, alpha, beta):
    from experiments import overopt

    d = np.linspace(0.05, 3.0, 12)
    gain = d * (alpha - beta * (d if form == "bon" else np.log(d)))
    got = overopt.fit(d, gain, form)
    assert got["alpha"] == pytest.approx(alpha) and got["beta"] == pytest.approx(beta)
    assert got["r2"] == pytest.approx(1.0)
    # d* is where the fitted curve is highest.
    grid = np.linspace(0.01, 20, 20000)
    curve = grid * (alpha - beta * (grid if form == "bon" else np.log(grid)))
    assert got["d_star"] == pytest.approx(grid[np.argmax(curve)], abs=2e-3)
    rising = overopt.fit(d, 0.5 * d, form)
    assert rising["beta"] <= 1e-9 or rising["d_star"] > d.max()


def test_overopt_says_gold_falls_only_when_it_peaks_inside_the_range_and_drops():
    from experiments import overopt

    d = [0.0, 0.5, 1.0, 1.5, 2.0]
    peaked = [0.0, 0.10, 0.15, 0.10, 0.05]
    assert overopt.peaks_and_falls(list(zip(d, peaked)), d_star=1.0)
    assert not overopt.peaks_and_falls(list(zip(d, [0.0, 0.1, 0.15, 0.16, 0.17])), d_star=9.0)
    flat_end = [0.0, 0.10, 0.15, 0.145, 0.14]  # within FALL of the peak: not a fall
    assert not overopt.peaks_and_falls(list(zip(d, flat_end)), d_star=1.2)


def test_overopt_report_reads_best_of_n_and_the_rl_stage_curves(tmp_path):

    sweep = sweep_configs.get_config("overopt")
    cells = []
    for variant, fall in (("rm_256", 0.4), ("rm_1536", 0.0)):
        for seed in (0, 1):
            models = {"SFT": {"sample": {"gold_reward": _stat(0.1), "rm_reward": _stat(0.0),
                                         "kl_to_sft": _stat(0.0)}}}  # fmt: skip
            for n in (2, 4, 8, 16, 32, 64):
                d = np.sqrt(np.log(n) - (n - 1) / n)
                models[f"best-of-{n}"] = {
                    "sample": {
                        "gold_reward": _stat(0.1 + d * (0.3 - fall * d)),
                        "rm_reward": _stat(0.5 * d),
                        "kl_to_sft": _stat(d**2),
                    }
                }
            rows = [
                {"step": 4 * i, "eval/sample/kl_to_sft": (0.4 * i) ** 2,
                 "eval/sample/gold_reward": 0.1 + 0.4 * i * (0.2 - fall * np.log(0.4 * i)),
                 "eval/sample/rm_reward": 0.3 * i}
                for i in range(1, 9)
            ]  # fmt: skip
            cells.append({"variant": variant, "seed": seed, "variants": models,
                          "stage_evals": {"ppo": rows}})  # fmt: skip
    prov = {"commit": "abc", "packages": {}, "world_hash": "w", "tokenizer_hash": "t" * 16,
            "seeds": {"init": 0}}  # fmt: skip
    out = sweep_lib.write_report(str(tmp_path), "overopt", sweep, cells, prov)
    rows = {(r["variant"], r["method"], r["seed"]): r for r in out["overopt"]}
    assert len(rows) == 8  # 2 RMs x 2 seeds x (best-of-n, ppo)
    assert rows["rm_256", "best-of-n", 0]["gold"]["beta"] == pytest.approx(0.4)
    assert rows["rm_256", "ppo", 1]["gold"]["beta"] == pytest.approx(0.4)
    assert rows["rm_256", "best-of-n", 0]["falls"] and rows["rm_256", "ppo", 0]["falls"]
    assert not rows["rm_1536", "best-of-n", 0]["falls"] and not rows["rm_1536", "ppo", 0]["falls"]
    assert rows["rm_1536", "ppo", 0]["points"][0] == [0.0, 0.1, 0.0]  # SFT at d = 0
    text = open(out["report"]).read()
    assert "## Over-optimisation" in text and "| rm_256 | best-of-n | 2 |" in text
    assert os.path.getsize(out["plots"]["overopt"]) > 1000


def test_the_compile_clock_counts_each_new_program_once():
    import jax
    import jax.numpy as jnp

    from experiments import compile_clock

    fn = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    seven, nine = np.ones(7, np.float32), np.ones(9, np.float32)  # host arrays: no programs
    start = compile_clock.snapshot()
    fn(seven)
    first = compile_clock.since(start)
    assert first["programs"] == 1 and first["total_s"] > 0 and first["trace_s"] > 0
    again = compile_clock.snapshot()
    fn(seven)  # the same shapes: nothing traced or compiled again
    assert compile_clock.since(again)["programs"] == 0
    fn(nine)  # a new shape: a new program
    assert compile_clock.since(again)["programs"] == 1
