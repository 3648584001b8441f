"""The compare and rm stages end to end, their metrics, and their errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pipeline
from experiments import pipeline as pipeline_lib
from experiments import sources
from experiments.stages import compare
from gptjax import evaluate, reward_model, rm_eval
from gptjax.data import chat, formats
from gptjax.errors import ConfigError
from gptjax.world import generate, labeler
from gptjax.world import probe as world_probe
from tests.helpers import (
    SFT_CLI,
    TINY_CLI,
    config_from_flags,
    subprocess_env,
    write_demos,
    write_text_corpus,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A world small enough to generate in a second; only its PPO prompts are used here.
SMALL_WORLD_CLI = [
    "--config.world.bios_per_person=2",
    "--config.world.n_worksheets=10",
    "--config.world.n_ignorance_docs=5",
    "--config.world.n_noise_docs=5",
    "--config.world.n_pretrain_heldout=5",
    "--config.world.n_demos=40",
    "--config.world.n_demos_heldout=8",
    "--config.world.n_ppo_prompts=16",
    "--config.world.n_eval_prompts=8",
]
# The tiny test model; its position table has room for the world's prompts (up to 33
# tokens with a 320-piece tokenizer) plus generated replies. Trained rows stay at T = 32.
MODEL_CLI = [*TINY_CLI, "--config.model.max_len=64"]
RM_CLI = [
    "--config.rm.steps=6",
    "--config.rm.batch_size=4",
    "--config.rm.seq_len=32",
    "--config.rm.eval_batches=2",
    "--config.rm.log_every=1",
    "--config.rm.optim.warmup_steps=2",
    "--config.rm.demo_samples=50",
]


def length_labeler(prompt_record, responses):
    """A plugged-in labeler: shorter replies are better, equal lengths tie."""
    assert "prompt" in prompt_record and len(prompt_record["ended"]) == len(responses)
    lengths = sorted(set(len(r) for r in responses))
    return [lengths.index(len(r)) for r in responses]


def _main(workdir, *flags, timeout=600):
    cmd = [sys.executable, "-m", "experiments.main", f"--workdir={workdir}", *flags]
    return subprocess.run(
        cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _hh(prompt, reply):
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def write_hh_comparisons(path, n: int = 40, seed: int = 0) -> str:
    """HH chosen/rejected transcripts (the right sum vs a wrong one), and a few ranked
    lists of 3 (so K differs between records and padding responses occur)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(x) for x in rng.integers(0, 10, size=2))
            prompt = f"what is {a} plus {b}?"
            if i % 5 == 4:
                record = {
                    "prompt": prompt,
                    "responses": [f"{a + b}", "i like cats", f"{a + b + 1}"],
                    "ranks": [0, 2, 1],
                }
            else:
                record = {"chosen": _hh(prompt, f"{a + b}"), "rejected": _hh(prompt, "cats")}
            f.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """pretrain + SFT on the user's own small files (cheap, like test_sft). The corpus is
    a small world's text, so that its tokenizer fits the world's prompts (which compare
    samples replies to) in T = 32; as user data, it skips the world's gates."""
    tmp = tmp_path_factory.mktemp("rm")
    world = generate(sources.world_config(config_from_flags(SMALL_WORLD_CLI)))
    corpus = tmp / "corpus.txt"
    write_text_corpus(corpus, n_paragraphs=60)
    # World text first; the short bigram paragraphs last, where the held-out split (and
    # the pretrain stage's sample prompts) come from.
    corpus.write_text(
        "\n\n".join(d["text"] for d in world["pretrain"]) + "\n\n" + corpus.read_text()
    )
    demos = write_demos(tmp / "demos.jsonl")
    data_flags = [
        *SMALL_WORLD_CLI,
        f"--config.data.pretrain=text:{corpus}",
        f"--config.data.demos=demos:{demos}",
    ]
    out = _main(
        tmp / "run",
        "--stages=pretrain,sft",
        "--config.pretrain.steps=10",
        "--config.sft.steps=10",
        *data_flags,
        *MODEL_CLI,
        *SFT_CLI,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp, tmp / "run", data_flags, demos


@pytest.mark.slow
def test_rm_from_a_user_hh_file_end_to_end(sft_workdir):
    tmp, workdir, data_flags, demos = sft_workdir
    fixture = write_hh_comparisons(tmp / "hh.jsonl")
    flags = [f"--config.data.comparisons=comparisons:{fixture}", *data_flags, *MODEL_CLI, *RM_CLI]
    out = _main(workdir, "--stages=rm", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== rm: 6 steps" in out.stdout and "pairwise accuracy vs labels" in out.stdout
    assert "baselines vs labels: shorter" in out.stdout and "calibration" in out.stdout

    summary = json.load(open(workdir / "rm" / "metrics.json"))
    held = summary["heldout"]
    assert summary["comparisons"]["k"] == 3  # the ranked lists of 3 set K; HH pairs are padded
    assert held["pairs"] > 0 and 0 <= held["accuracy"] <= 1 and held["calibration"]
    assert set(held["baselines"]) == {"shorter", "not_idk"}
    assert "gold_accuracy" not in held and "probe" not in held  # no gold, no world tasks
    assert "50 the user's demos" == summary["bias_demos"]

    # The stage's output contract: the normalised RM, loadable by later stages, gives the
    # demonstrations (the first 50 of the user's demos) a mean reward of 0.
    config = config_from_flags(flags)
    tok = sources.get_tokenizer(config, str(workdir))
    model, params = sources.load_stage_params(config, str(workdir), "rm", tok, head="scalar")
    assert float(params["score_logp"]) != 0.0  # the tiny preset's RM reads SFT log-probs
    records, replies = [], []
    for i, line in enumerate(open(demos).read().splitlines()[:50]):
        messages = formats.normalize_demo(json.loads(line))["messages"]
        ids = (*chat.encode_reply(messages[-1]["content"], tok), tok.eos_id)
        records.append({"messages": messages[:-1]})
        replies.append(evaluate.Reply(i, 0, messages[-1]["content"], True, len(ids), ids))
    sft_model, sft_params = sources.load_stage_params(config, str(workdir), "sft", tok)
    protocol = evaluate.Protocol(batch_size=64)
    ref_logp, _ = evaluate.score_replies(sft_model, sft_params, tok, records, replies, protocol)
    rewards = evaluate.rm_rewards((model, params), tok, records, replies, protocol, ref_logp)
    assert abs(summary["bias_subtracted"]) > 1e-4  # the shift did something...
    assert abs(np.mean(rewards)) < 1e-4  # ...and it made the demo mean 0

    # Rerunning the finished stage retrains nothing and keeps the same checkpoint.
    again = _main(workdir, "--stages=rm", *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== rm: 0 steps" in again.stdout
    assert os.listdir(workdir / "rm" / "checkpoints") == ["6"]


@pytest.mark.slow
def test_compare_with_a_plugged_in_labeler(sft_workdir):
    _, workdir, data_flags, _ = sft_workdir
    flags = [
        *data_flags,
        *MODEL_CLI,
        "--config.compare.k=3",
        "--config.compare.n_prompts=12",
        "--config.compare.heldout_fraction=0.25",
        "--config.compare.max_new_tokens=6",
        "--config.compare.batch_size=16",
        "--config.compare.labeler=tests.test_rm_stage:length_labeler",
    ]
    out = _main(workdir, "--stages=compare", *flags)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "labeler: tests.test_rm_stage:length_labeler" in out.stdout
    tok = sources.get_tokenizer(config_from_flags([*data_flags, *MODEL_CLI]), str(workdir))
    done = json.load(open(workdir / "compare" / "done.json"))
    paths = sources.compare_paths(workdir / "compare")
    records = {s: list(formats.read_comparisons(p)) for s, p in paths.items()}
    assert len(records["heldout"]) <= 3 and len(records["train"]) <= 9
    assert done["comparisons"] == {s: len(r) for s, r in records.items()}
    assert sum(done["comparisons"].values()) + done["dropped_all_tied"] == 12
    assert records["train"]  # a test that checks no record would pass vacuously
    for rec in records["train"] + records["heldout"]:
        assert len(rec["responses"]) == 3 and len(rec["ended"]) == 3
        assert rec["ranks"] == length_labeler({**rec, "ended": rec["ended"]}, rec["responses"])
        assert len(set(rec["ranks"])) >= 2
        # The ids the replies were sampled as, under this tokenizer, decode to the texts.
        assert rec["tokenizer"] == tok.hash and len(rec["response_ids"]) == 3
        for ids, text, ended in zip(rec["response_ids"], rec["responses"], rec["ended"]):
            assert chat.decode_reply(ids, tok) == (text, ended)
        meta = rec["meta"]
        assert meta["task"]["prompt"] == rec["prompt"]
        assert meta["gold_ranks"] == compare.gold_ranks(meta["gold_scores"])

    # A second round (an instance reading the first as "previous") keeps round 1's
    # comparisons first and adds its own.
    config = config_from_flags(flags)
    config.compare_2 = config.compare.copy_and_resolve_references()
    config.compare_2.n_prompts = 8
    config.instances = {"compare_2": {"like": "compare", "reads": {"previous": "compare"}}}
    assert pipeline_lib.run_guarded(config, str(workdir), ["compare_2"]) == 0
    paths_2 = sources.compare_paths(workdir / "compare_2")
    two = {s: list(formats.read_comparisons(p)) for s, p in paths_2.items()}
    done_2 = json.load(open(workdir / "compare_2" / "done.json"))
    for split, first in records.items():
        assert two[split][: len(first)] == first
        assert done_2["this_round"][split] == len(two[split]) - len(first)
    assert sum(done_2["this_round"].values()) > 0

    # The held-out RM's comparisons (configs/pipeline.py heldout_rm=1): the same prompts,
    # other replies (seed_offset 1).
    config = config_from_flags(flags)
    pipeline._heldout_rm(config)
    rows = pipeline_lib.table(config)
    assert rows["rm_heldout"].reads["comparisons"] == "compare_heldout"
    assert rows["eval"].reads["heldout_rm"] == "rm_heldout"
    assert pipeline_lib.order(config, ["eval", "rm_heldout"]) == ["rm_heldout", "eval"]
    assert pipeline_lib.run_guarded(config, str(workdir), ["compare_heldout"]) == 0
    other = formats.read_comparisons(sources.compare_paths(workdir / "compare_heldout")["train"])
    other = {r["prompt"]: r["responses"] for r in other}
    mine = {r["prompt"]: r["responses"] for r in records["train"]}
    shared = set(other) & set(mine)
    assert shared and any(other[p] != mine[p] for p in shared)

    # Replies from several policies: two temperatures and the demonstrator's reply last.
    config = config_from_flags(flags)
    config.compare_mix = config.compare.copy_and_resolve_references()
    config.compare_mix.update(temperatures="0.5,1.5", demonstration=True)
    config.instances = {"compare_mix": {"like": "compare"}}
    assert compare.slot_groups(config.compare_mix) == {0.5: [0], 1.5: [1]}  # K = 3
    assert pipeline_lib.run_guarded(config, str(workdir), ["compare_mix"]) == 0
    mixed = formats.read_comparisons(sources.compare_paths(workdir / "compare_mix")["train"])
    world = sources.world_config(config)
    for rec in mixed:
        task = rec["meta"]["task"]
        demo = rec["responses"][-1]
        assert rec["ended"][-1] and chat.decode_reply(rec["response_ids"][-1], tok) == (demo, True)
        if task["answer"] is not None:  # the demonstrator answers known people truly
            assert labeler.gold_score(task, demo, True, world.length_weight) > 0.5
        assert rec["responses"][:2] != mine.get(rec["prompt"], [])[:2]  # other draws

    # Same settings: the finished files are reused, not sampled again.
    mtime = os.path.getmtime(paths["train"])
    again = _main(workdir, "--stages=compare", *flags)
    assert again.returncode == 0 and "== compare: reused" in again.stdout
    assert os.path.getmtime(paths["train"]) == mtime

    # An RM on these world comparisons (in a copy: the user-file RM test owns rm/) gets
    # the probe of what it knows, one group per kind of held-out prompt.
    probe_dir = workdir.parent / "probe_run"
    shutil.copytree(workdir, probe_dir, symlinks=True, ignore=shutil.ignore_patterns("rm"))
    out = _main(probe_dir, "--stages=rm", *flags, *RM_CLI)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.load(open(probe_dir / "rm" / "metrics.json"))["heldout"]["probe"]
    groups = {world_probe.probe_group(r["meta"]["task"]) for r in records["heldout"]}
    assert set(probe) == groups
    assert sum(g["n"] for g in probe.values()) == len(records["heldout"])
    for group, stats in probe.items():
        assert set(stats) - {"n"} == {f"{a}>{b}" for a, b in world_probe.PROBE_ORDERS[group]}
        assert all(0 <= v <= 1 for k, v in stats.items() if k != "n")
    assert "probe on" in out.stdout


def test_probe_replies_are_what_the_gold_labeler_says_they_are():
    world = generate(sources.world_config(config_from_flags(SMALL_WORLD_CLI)))
    tasks_ = list(world["eval_prompts"]) + list(world["ppo_prompts"])
    records = world_probe.probe_records(tasks_)
    # Every group is made.
    assert {world_probe.probe_group(t) for t in tasks_} == set(world_probe.PROBE_ORDERS)
    for rec in records:
        task, (true, wrong, idk) = rec["task"], rec["responses"]
        unknown = task["answer"] is None
        assert labeler.classify(task, true, True) == ("hallucinated" if unknown else "correct")
        assert labeler.classify(task, wrong, True) == ("hallucinated" if unknown else "wrong")
        assert labeler.classify(task, idk, True) == "idk"


def test_probe_metrics_on_hand_made_rewards():
    def task(skill, answer="x"):
        return {"skill": skill, "answer": answer}

    records = [
        {"task": task("fact")},  # true > idk > wrong: every pair right
        {"task": task("fact")},  # idk on top: true>idk wrong, idk>wrong right, true=wrong tie
        {"task": task("fact", None)},  # unknown: only idk vs wrong counts
        {"task": task("arithmetic")},
    ]
    rewards_Nx3 = np.array(  # columns: true, wrong, idk
        [[1.0, -1.0, 0.0], [0.0, 0.0, 1.0], [5.0, -1.0, 0.0], [0.0, 1.0, 2.0]]
    )
    got = world_probe.probe_metrics(records, rewards_Nx3)
    assert got["fact_known"] == {"true>idk": 0.5, "idk>wrong": 1.0, "true>wrong": 0.75, "n": 2}
    assert got["fact_unknown"] == {"idk>wrong": 1.0, "n": 1}
    assert got["arithmetic"] == {"true>idk": 0.0, "idk>wrong": 1.0, "true>wrong": 0.0, "n": 1}
    assert "string" not in got


def test_gold_ranks_tie_equal_scores():
    assert compare.gold_ranks([0.2, 1.0, 0.2, -0.5]) == [1, 0, 1, 2]


def test_metrics_noise_ceiling_max_accuracy_and_baselines():
    # One prompt, 3 replies. Gold: a > b = c (b, c tied). Labels: b > a > c.
    records = [
        {
            "responses": ["i don't know", "oslo", "it is rome."],
            "ranks": [1, 0, 2],
            "meta": {"gold_ranks": [0, 1, 1]},
        }
    ]
    rewards = np.array([[2.0, 1.0, 0.0]])
    baselines = {"shorter": rm_eval.shorter, "not_idk": world_probe.not_idk}
    m = rm_eval.rm_metrics(records, rewards, 3, baselines)
    # Label pairs: b>a (RM wrong), b>c (right), a>c (right).
    assert m["accuracy"] == pytest.approx(2 / 3) and m["pairs"] == 3
    # Gold pairs a>b, a>c: the RM gets both; the labels agree on a>c only.
    assert m["gold_accuracy"] == 1.0 and m["noise_ceiling"] == 0.5
    # A perfect gold ranker vs the labels: b>a wrong, b>c tie (half), a>c right.
    assert m["max_accuracy"] == pytest.approx(0.5)
    # Shorter: b>a right (4 < 12 chars), b>c right, a>c wrong (12 > 11). Not-idk: b>a
    # right, b>c tie, a>c wrong.
    assert m["baselines"]["shorter"] == pytest.approx(2 / 3)
    assert m["baselines"]["not_idk"] == pytest.approx(0.5)


def test_scalar_head_from_lm_params_keeps_the_trunk():
    from gptjax.model import Model
    from tests.helpers import tiny_model_config

    lm = Model(tiny_model_config())
    lm_params = lm.init(jax.random.key(0))
    scalar = Model(tiny_model_config(head="scalar"))
    params = reward_model.with_scalar_head(scalar, lm_params)
    assert jax.tree.structure(params) == jax.tree.structure(scalar.abstract_params)
    np.testing.assert_array_equal(params["embed"], lm_params["embed"])
    assert float(np.abs(params["score_w"]).sum()) == 0.0
    values = scalar.apply(params, np.arange(3, 11)[None])
    assert values.shape == (1, 8)


@pytest.mark.parametrize("k", [1, 10])
def test_k_outside_2_to_9_names_the_field(k, tmp_path):
    config = pipeline.get_config("tiny")
    config.compare.k = k
    with pytest.raises(ConfigError, match=rf"config\.compare\.k: must be in 2\.\.9, got {k}"):
        compare.run(pipeline_lib.context(config, str(tmp_path), "compare"))


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"temperatures": "0.7,x"}, r"config\.compare\.temperatures: a comma list of numbers"),
        ({"temperatures": "0.7,0"}, r"config\.compare\.temperatures: must be > 0"),
        ({"k": 2, "demonstration": True}, r"config\.compare\.demonstration: needs k >= 3"),
    ],
)
def test_bad_reply_sources_name_the_field(fields, match, tmp_path):
    config = pipeline.get_config("tiny")
    config.compare.update(fields)
    with pytest.raises(ConfigError, match=match):
        compare.run(pipeline_lib.context(config, str(tmp_path), "compare"))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("nocolon", r"config\.compare\.labeler: expected 'module:function'"),
        ("no_such_module_xyz:f", r"config\.compare\.labeler: cannot load"),
        ("tests.test_rm_stage:no_such_function", r"config\.compare\.labeler: cannot load"),
    ],
)
def test_bad_labeler_names_the_field(spec, match):
    with pytest.raises(ConfigError, match=match):
        compare.load_labeler(spec)


def test_labeler_output_is_checked():
    with pytest.raises(ConfigError, match=r"compare\.labeler: prompt 3: expected a list of 4"):
        compare.check_ranks([0, 1, 2], 4, "prompt 3")
    with pytest.raises(ConfigError, match=r"non-negative integer"):
        compare.check_ranks([0, 1, -1, 2], 4, "prompt 0")
    assert compare.check_ranks(np.array([1, 0, 1, 2]), 4, "p") == [1, 0, 1, 2]


def test_malformed_comparisons_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"prompt": "hi"}\n')
    config = pipeline.get_config("tiny")
    config.data.comparisons = f"comparisons:{path}"
    with pytest.raises(ConfigError, match=rf"config\.data\.comparisons: {path}:3: missing field"):
        sources.comparison_sources(config, str(tmp_path), str(tmp_path / "compare"))


def test_rm_without_compare_output_says_what_to_run(tmp_path):
    config = pipeline.get_config("tiny")
    with pytest.raises(FileNotFoundError, match=r"run --stages=compare first"):
        sources.comparison_sources(config, str(tmp_path), str(tmp_path / "compare"))
    config.data.comparisons = "/path/without/kind.jsonl"
    with pytest.raises(ConfigError, match=r"config\.data\.comparisons: expected 'compare'"):
        sources.comparison_sources(config, str(tmp_path), str(tmp_path / "compare"))


def test_the_rm_and_the_policy_train_on_disjoint_world_prompts(tmp_path):
    config = config_from_flags(SMALL_WORLD_CLI)
    compare_side = sources.world_prompts(config, str(tmp_path), "compare")
    rl_side = sources.prompt_source(config, str(tmp_path), config.ppo, "ppo")
    n = config.world.n_ppo_prompts
    assert len(compare_side) == round(n * config.data.rm_prompt_share)
    assert len(compare_side) + len(rl_side) == n
    key = lambda t: (t["prompt"], t["person"], str(t["operands"]))  # noqa: E731
    seen = {key(compare_side[i]) for i in range(len(compare_side))}
    assert seen and not seen & {key(rl_side[i]) for i in range(len(rl_side))}
    config.compare.n_prompts = len(compare_side) + 1
    with pytest.raises(ConfigError, match="compare.n_prompts: .* kept for comparisons"):
        compare.settings(pipeline_lib.context(config, str(tmp_path), "compare"))
