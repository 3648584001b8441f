"""Bad input (issue 10): every bad config value, data file, checkpoint or tokenizer is one
line on stderr naming the problem, before step 1, with nothing in the workdir modified."""

import os
import re

import ml_collections
import pytest

from configs import pipeline as pipeline_configs
from experiments import pipeline, sources
from gptjax.errors import ConfigError
from gptjax.optim import OptimConfig
from tests.fault_helpers import fresh_copy, losses, main_cmd, record, run_cli, snapshot
from tests.helpers import config_from_flags, write_demos, write_text_corpus


def _set(path, value):
    def apply(config, files):
        *parents, last = path.split(".")
        target = config
        for part in parents:
            target = target[part]
        target[last] = value(files) if callable(value) else value

    return apply


def _bad_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "bad_demos.jsonl")
    lines = open(files["demos"]).read().splitlines()
    lines[2] = '{"prompt": "what is 1 plus'  # cut off mid-record
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"demos:{path}"


def _half_bad_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "half_bad_demos.jsonl")
    lines = open(files["demos"]).read().splitlines()[:20]
    lines[::2] = ['{"prompt": "hi"}'] * len(lines[::2])  # no response
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return f"demos:{path}"


def _empty_demos(files):
    path = os.path.join(os.path.dirname(files["demos"]), "empty.jsonl")
    open(path, "w").close()
    return f"demos:{path}"


def _other_tokenizer(files):
    from gptjax.data import tokenizer as tok_lib

    path = os.path.join(os.path.dirname(files["demos"]), "other", "spm.model")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        other = os.path.join(os.path.dirname(files["demos"]), "other.txt")
        write_text_corpus(other, seed=1)
        texts = open(other).read().split("\n\n")
        tok_lib.train_tokenizer(texts, path, 320)
    return path


BAD_INPUTS = {
    # name: (stages, config change, the one-line error)
    "unknown field": (
        "pretrain",
        _set("pretrain.optim.bogus", 1),
        r"config\.pretrain\.optim\.bogus: unknown field",
    ),
    "wrong type": (
        "pretrain",
        _set(
            "pretrain.optim",
            lambda f: ml_collections.ConfigDict({**OptimConfig().__dict__, "lr": "fast"}),
        ),
        r"config\.pretrain\.optim\.lr: expected float, got str",
    ),
    "seq_len > max_len": (
        "pretrain",
        _set("pretrain.seq_len", 64),
        r"config\.pretrain\.seq_len: 64 exceeds model\.max_len=32",
    ),
    "mesh vs devices": ("pretrain", _set("mesh.data", 3), r"config\.mesh.*8 devices"),
    "batch not divisible": (
        "pretrain",
        _set("pretrain.batch_size", 6),
        r"config\.pretrain\.batch_size: 6 is not divisible",
    ),
    "bad nonfinite policy": (
        "pretrain",
        _set("pretrain.nonfinite", "ignore"),
        r"config\.pretrain\.nonfinite: 'ignore' not in skip\|stop",
    ),
    "bad kl_guard": ("ppo", _set("ppo.kl_guard", "maybe"), r"config\.ppo\.kl_guard: 'maybe'"),
    "path with ..": (
        "sft",
        _set("data.demos", "demos:../demos.jsonl"),
        r"config\.data\.demos: .*'\.\.' is not allowed",
    ),
    "malformed record": (
        "sft",
        _set("data.demos", _bad_demos),
        r"config\.data\.demos: .*bad_demos\.jsonl:3: bad JSON",
    ),
    "too many bad records": (
        "sft",
        lambda c, f: (
            _set("data.demos", _half_bad_demos)(c, f),
            _set("data.max_bad_fraction", 0.2)(c, f),
        ),
        r"half_bad_demos\.jsonl:1: missing field 'response' .*10 of 20 records are malformed",
    ),
    "empty dataset": (
        "sft",
        _set("data.demos", _empty_demos),
        r"config\.data\.demos: .*no records",
    ),
    "resume, other tokenizer": (
        "pretrain",
        _set("tokenizer.path", _other_tokenizer),
        r"pretrain: refusing to resume from .*/8: it was trained with tokenizer",
    ),
    "base model, other tokenizer": (
        "sft",
        _set("tokenizer.path", _other_tokenizer),
        r"pretrain/checkpoints/8 was trained with tokenizer \w+, this run has \w+",
    ),
    "resume, other data order": (
        "pretrain",
        _set("seeds.data", 1),
        r"refusing to resume .*: config\.seeds\.data was 0, now 1",
    ),
    "resume, other dims": (
        "pretrain",
        _set("model.d_ff", 128),
        r"cannot resume from .*/8: params\.\S+: checkpoint has float32\[\d+(, \d+)*\], "
        r"this config float32\[",
    ),
    "resume, other dtype": (
        "pretrain",
        _set("model.param_dtype", "bfloat16"),
        r"params\.\S+: checkpoint has float32\[.*\], this config bfloat16\[",
    ),
}


@pytest.fixture(scope="module")
def bad_input_workdir(tiny_run, tmp_path_factory):
    return fresh_copy(tiny_run, tmp_path_factory.mktemp("bad") / "run")


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_named_error_before_step_1(case, tiny_run, bad_input_workdir, capsys):
    stages, change, message = BAD_INPUTS[case]
    config = config_from_flags(tiny_run["flags"])
    change(config, tiny_run["files"])
    before = snapshot(bad_input_workdir)
    metrics = {s: losses(bad_input_workdir, s) for s in ("pretrain", "sft")}
    capsys.readouterr()
    code = pipeline.run_guarded(config, str(bad_input_workdir), stages.split(","))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and re.search(message, err), err
    assert snapshot(bad_input_workdir) == before  # no checkpoint, data or tokenizer touched
    assert {s: losses(bad_input_workdir, s) for s in ("pretrain", "sft")} == metrics
    record(case, stages, "named error before step 1, nothing modified")


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--config=/no/such/config.py:tiny"], r"^error: --config: .*No such file .*/no/such"),
        (["--config.pretrain.bogus=1"], r"^error: --config\.pretrain\.bogus: no such config field"),
        (
            ["--config.model.d_model=abc"],
            r"^error: flag --config\.model\.d_model=abc: invalid literal",
        ),
        (
            ["--config=configs/pipeline.py:nosuch"],
            r"^error: flag --config=.*unknown model preset 'nosuch'",
        ),
    ],
)
def test_bad_command_line_is_one_line_and_non_zero(flags, message, tmp_path):
    out = run_cli(main_cmd(tmp_path / "run", "pretrain", *flags), timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "run" / "pretrain").exists()
    record(f"CLI: {flags[0].split('=')[0]}", "main", "one-line error, exit 2")


def test_bad_records_below_the_allowed_fraction_are_dropped_and_reported(tmp_path, capsys):
    demos = write_demos(tmp_path / "demos.jsonl", n=40)
    lines = open(demos).read().splitlines()
    lines[4] = "not json"
    (tmp_path / "demos.jsonl").write_text("\n".join(lines) + "\n")
    config = pipeline_configs.get_config("tiny")
    config.data.demos = f"demos:{demos}"
    config.data.max_bad_fraction = 0.1
    train, heldout = sources.demo_sources(config, str(tmp_path))
    assert len(train) + len(heldout) == 39
    err = capsys.readouterr().err
    assert "data.demos: dropped 1 malformed records" in err and "demos.jsonl:5: bad JSON" in err
    record("1 of 40 demos malformed, max_bad_fraction=0.1", "sft", "dropped and reported")


def test_prompts_longer_than_the_context_are_reported_not_fatal(capsys):
    source = [[1] * n for n in (3, 9, 12, 5)]
    n = sources.report_long_prompts(source, list, 8, "ppo.max_prompt_len")
    err = capsys.readouterr().err
    assert n == 2 and "2 of 4 prompts are longer than 8 tokens (longest 12)" in err
    assert sources.report_long_prompts(source, list, 12, "ppo.max_prompt_len") == 0
    with pytest.raises(ConfigError, match="ppo.prompts"):
        sources.report_long_prompts([], list, 8, "ppo.max_prompt_len")


def _ppo_fits(config, files):
    """tiny_run's model and data on this process's 8 devices: PPO prompts from its demos,
    within model.max_len; the RM's batch split over 8."""
    config.rm.batch_size = 8
    for name, value in dict(max_prompt_len=16, max_new_tokens=8, prompts_per_iteration=16).items():
        config.ppo[name] = value
    config.ppo.prompts = f"demos:{files['demos']}"


@pytest.mark.parametrize(
    "change, message",
    [
        (_set("ppo.kl_coef", -1.0), r"config\.ppo\.kl_coef: must be >= 0"),
        (_set("ppo.minibatches", 3), r"config\.ppo\.prompts_per_iteration: 16 is not divisible"),
        (_set("data.demos", _bad_demos), r"config\.data\.demos: .*bad_demos\.jsonl:3: bad JSON"),
    ],
    ids=["ppo value", "ppo layout", "demos line"],
)
def test_every_requested_stage_is_checked_before_pretraining_begins(
    change, message, tiny_run, tmp_path, capsys
):
    """pretrain -> sft -> rm -> ppo on an empty workdir: a bad value of a later stage or a
    bad line in sft's demos stops the run before pretraining computes anything."""
    config = config_from_flags(tiny_run["flags"])
    _ppo_fits(config, tiny_run["files"])
    change(config, tiny_run["files"])
    capsys.readouterr()
    code = pipeline.run_guarded(config, str(tmp_path), ["pretrain", "sft", "rm", "ppo"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "pretrain").exists() and not (tmp_path / "tokenizer").exists()


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("samples", -1)])
def test_a_bad_eval_protocol_fails_before_pretraining(field, value, tmp_path, capsys):
    config = pipeline_configs.get_config("tiny")
    config.eval[field] = value
    code = pipeline.run_guarded(config, str(tmp_path), ["pretrain", "eval"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.search(rf"config\.eval\.{field}: must be >= 1, got {value}", err), err
    assert not (tmp_path / "pretrain").exists()
