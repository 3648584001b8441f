"""Every preset loads and validates through the pipeline's one config route; bad values
fail naming the field."""

import jax
import ml_collections
import pytest

from configs import model as model_configs
from configs import pipeline as pipeline_configs
from experiments import pipeline
from gptjax import ppo, sharding
from gptjax.config import from_dict
from gptjax.errors import ConfigError
from gptjax.model import Model, from_pipeline
from gptjax.rollout import rollout_config
from gptjax.trainer import section_configs


@pytest.mark.parametrize("name", sorted(model_configs.MODELS))
def test_every_model_preset_loads_and_validates(name):
    config = pipeline_configs.get_config(name)
    for stage in ("pretrain", "sft", "rm"):
        section_configs(config[stage], stage)
    for stage in ("ppo", "ppo_ptx"):
        ppo.from_section(config[stage], stage)
        rollout_config(config[stage], stage)
    # Shapes only: even gpt3_175b builds its abstract params without allocating anything.
    assert Model(from_pipeline(config)).param_count() > 0


@pytest.mark.parametrize("mesh", sorted(model_configs.MESHES))
def test_every_mesh_preset_validates_for_8_devices(mesh, tmp_path):
    config = pipeline_configs.get_config(f"tiny,mesh={mesh}")
    config.model.n_kv_heads = 4
    with config.unlocked():
        config.mesh.multihost = False  # one process here; the pod presets' axes still apply
    pipeline.validate(config, str(tmp_path), ["pretrain", "sft", "rm", "ppo", "ppo_ptx"])
    cfg = from_dict(sharding.MeshConfig, config.mesh, "mesh")
    model = Model(from_pipeline(config))
    # Every sharded dim of every param divides its mesh axes.
    sharding.param_shardings(sharding.make_mesh(cfg, jax.devices()), model.logical_axes,
                             model.abstract_params)  # fmt: skip


def test_five_heads_for_width_64_names_the_field():
    config = pipeline_configs.get_config("tiny")
    config.model.d_model, config.model.n_heads = 64, 5
    with pytest.raises(ConfigError, match=r"config\.model\.n_heads.*5.*64"):
        from_pipeline(config)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model.positions", "alibi", r"model\.positions"),
        ("model.d_model", "128", r"model\.d_model: expected int"),
        ("pretrain.optim.lr", -1.0, r"pretrain\.optim\.lr"),
        ("pretrain.optim.schedule", "step", r"pretrain\.optim\.schedule"),
        ("pretrain.seq_len", 65, r"pretrain\.seq_len.*max_len=64"),
        ("mesh.data", 3, r"mesh"),
    ],
)
def test_bad_field_is_named(field, value, match, tmp_path):
    config = pipeline_configs.get_config("tiny")
    *path, key = field.split(".")
    parent = config
    for part in path[:-1]:
        parent = parent[part]
    with config.unlocked():
        # A fresh section, so ConfigDict's own type-safety does not pre-empt ours.
        parent[path[-1]] = {**parent[path[-1]].to_dict(), key: value}
    with pytest.raises(ConfigError, match=match):
        pipeline.validate(config, str(tmp_path), ["pretrain"])


def test_unknown_key_is_named(tmp_path):
    config = pipeline_configs.get_config("tiny")
    with config.unlocked():
        config.model.n_head = 4
    with pytest.raises(ConfigError, match=r"config\.model\.n_head: unknown field"):
        pipeline.validate(config, str(tmp_path), ["pretrain"])


def test_batch_must_divide_data_parallel_size(tmp_path):
    config = pipeline_configs.get_config("tiny,mesh=cpu8")
    config.pretrain.batch_size = 6
    with pytest.raises(ConfigError, match=r"pretrain\.batch_size.*6"):
        pipeline.validate(config, str(tmp_path), ["pretrain"])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2_124m"):
        pipeline_configs.get_config("gpt5")
    assert isinstance(pipeline_configs.get_config(), ml_collections.ConfigDict)


def test_a_second_round_config_declares_its_instances_in_order(tmp_path):
    """tiny,rounds=2: compare_2 (from the PPO policy, keeping round 1), rm_2, ppo_2 and
    eval_2, each after what it reads, each section validated like its runner's."""
    config = pipeline_configs.get_config("tiny,rounds=2")
    names = ["eval_2", "ppo_2", "rm_2", "compare_2"]
    assert pipeline.order(config, names) == names[::-1]
    rows = pipeline.table(config)
    assert rows["compare_2"].reads == {"init": "ppo", "previous": "compare"}
    assert rows["ppo_2"].reads["rm"] == "rm_2" and rows["eval_2"].reads["ppo"] == "ppo_2"
    pipeline.validate(config, str(tmp_path), names)
    config.ppo_2.kl_coef = -1.0
    with pytest.raises(ConfigError, match="ppo_2.kl_coef"):
        pipeline.validate(config, str(tmp_path), names)
    with pytest.raises(ValueError, match="rounds=3"):
        pipeline_configs.get_config("tiny,rounds=3")


def test_an_evaluator_instance_runs_with_its_own_section(tmp_path):
    """eval_2's fields (not eval's) are what its run reads as config.eval."""
    from experiments.stages import evaluate as evaluate_stage

    config = pipeline_configs.get_config("tiny,rounds=2")
    config.eval_2.variants = "SFT,PPO"
    config.eval_2.max_prompts = 7
    own = evaluate_stage.own_section(pipeline.context(config, str(tmp_path), "eval_2"))
    assert own.config.eval.variants == "SFT,PPO" and own.config.eval.max_prompts == 7
    assert config.eval.variants == "" and config.eval.max_prompts == 0  # not modified
    default = pipeline.context(config, str(tmp_path), "eval")
    assert evaluate_stage.own_section(default).config.eval.variants == ""
    config.eval_2.reward = "tests.reward_fns:exact_sum"  # on the world: refused
    with pytest.raises(ConfigError, match="judged by its gold labeler"):
        pipeline.validate(config, str(tmp_path), ["eval_2"])
