"""The declared pipeline: stage order, inputs by role, instances declared in a config, and
the stage keys that decide what a sweep shares."""

import pytest

from configs import pipeline as pipeline_configs
from experiments import pipeline
from gptjax.errors import ConfigError


def tiny():
    return pipeline_configs.get_config("tiny")


def test_stages_run_after_the_stages_they_read():
    assert pipeline.order(tiny(), ["eval", "sft", "pretrain"]) == ["pretrain", "sft", "eval"]
    assert pipeline.order(tiny(), ["ppo_ptx", "rm", "ppo"]) == ["rm", "ppo", "ppo_ptx"]
    with pytest.raises(ConfigError, match=r"config\.stages: unknown stage\(s\) \['sfft'\]"):
        pipeline.order(tiny(), ["sfft"])


def test_each_stage_reads_its_inputs_by_role():
    ctx = pipeline.context(tiny(), "/w", "ppo_ptx")
    assert dict(ctx.inputs) == {"policy": "sft", "rm": "rm"}
    assert ctx.input_dir("rm") == "/w/rm" and ctx.checkpoints("policy") == "/w/sft/checkpoints"
    config = tiny()
    config.ppo_ptx.policy_from = "/elsewhere/sft/checkpoints"
    ctx = pipeline.context(config, "/w", "ppo_ptx")
    assert ctx.checkpoints("policy") == "/elsewhere/sft/checkpoints"
    assert pipeline.context(tiny(), "/w", "sft").section is not None


def second_round(config):
    """A second comparison / RM round: comparisons sampled from the PPO policy."""
    with config.unlocked():
        config.compare_2 = config.compare.copy_and_resolve_references()
        config.rm_2 = config.rm.copy_and_resolve_references()
        config.instances = {
            "compare_2": {"like": "compare", "reads": {"init": "ppo"}},
            "rm_2": {"like": "rm", "reads": {"comparisons": "compare_2"}},
        }
    return config


def test_a_config_declares_more_instances_of_a_runner():
    config = second_round(tiny())
    rows = pipeline.table(config)
    assert rows["compare_2"].run is rows["compare"].run and rows["rm_2"].run is rows["rm"].run
    assert dict(rows["rm_2"].reads) == {"init": "sft", "comparisons": "compare_2"}
    assert pipeline.order(config, ["rm_2", "compare_2", "ppo"]) == ["ppo", "compare_2", "rm_2"]
    assert pipeline.context(config, "/w", "compare_2").section.k == config.compare.k
    with config.unlocked():
        config.instances = {"ppo_3": {"like": "ppo"}}  # no ppo_3 section
    with pytest.raises(ConfigError, match=r"instances\.ppo_3.*no section 'ppo_3'"):
        pipeline.table(config)


def test_a_stage_key_changes_with_what_it_reads_and_only_that():
    base = {s: pipeline.stage_key(tiny(), s) for s in ("pretrain", "sft", "rm", "ppo", "eval")}
    assert base == {s: pipeline.stage_key(tiny(), s) for s in base}  # deterministic
    config = tiny()
    config.ppo.kl_coef = 0.1
    changed = {s for s in base if pipeline.stage_key(config, s) != base[s]}
    assert changed == {"ppo", "eval"}
    config = tiny()
    config.sft.steps = 3
    changed = {s for s in base if pipeline.stage_key(config, s) != base[s]}
    assert changed == {"sft", "rm", "ppo", "eval"}
    for field, value in (("label_noise", 0.4), ("length_weight", 0.1)):
        config = tiny()
        config.world[field] = value  # the labeler's: the base and SFT models are shared
        changed = {s for s in base if pipeline.stage_key(config, s) != base[s]}
        assert changed == {"rm", "ppo", "eval"}, field
    config = tiny()
    config.world.n_known = 300  # any other world field: every stage
    assert {s for s in base if pipeline.stage_key(config, s) != base[s]} == set(base)
    config = tiny()
    config.eval.max_prompts = 7  # the evaluator's settings: eval and the PPO stages' check
    changed = {s for s in base if pipeline.stage_key(config, s) != base[s]}
    assert changed == {"ppo", "eval"}
    # Another seed for PPO only (as a sweep seeds its cells' PPO stages).
    seeded = tiny()
    seeded.seeds.init = 1
    keys = {
        s: pipeline.stage_key(tiny(), s, lambda stage: seeded if stage == "ppo" else tiny())
        for s in base
    }
    assert {s for s in base if keys[s] != base[s]} == {"ppo", "eval"}
