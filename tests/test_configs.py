"""Every preset loads and validates; bad values fail naming the field."""

import ml_collections
import pytest

from configs import model as model_configs
from gptjax.config import parse_lm
from gptjax.errors import ConfigError
from gptjax.model import Model


@pytest.mark.parametrize("name", sorted(model_configs.MODELS))
def test_every_model_preset_loads_and_validates(name):
    config = model_configs.get_config(name)
    setup = parse_lm(config)
    # Shapes only: even llama_7b builds its abstract params without allocating anything.
    assert Model(setup.model).param_count() > 0


@pytest.mark.parametrize("mesh", sorted(model_configs.MESHES))
def test_every_mesh_preset_validates_for_8_devices(mesh):
    config = model_configs.get_config(f"tiny,mesh={mesh}")
    config.model.n_kv_heads = 4
    parse_lm(config, n_devices=8)


def test_five_heads_for_width_64_names_the_field():
    config = model_configs.get_config("tiny")
    config.model.d_model, config.model.n_heads = 64, 5
    with pytest.raises(ConfigError, match=r"config\.model\.n_heads.*5.*64"):
        parse_lm(config)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("model.positions", "alibi", r"model\.positions"),
        ("model.d_model", "128", r"model\.d_model: expected int"),
        ("optim.lr", -1.0, r"optim\.lr"),
        ("optim.schedule", "step", r"optim\.schedule"),
        ("train.seq_len", 65, r"train\.seq_len.*max_len=64"),
        ("mesh.data", 3, r"mesh"),
    ],
)
def test_bad_field_is_named(field, value, match):
    config = model_configs.get_config("tiny")
    section, key = field.split(".")
    with config.unlocked():
        # A fresh section, so ConfigDict's own type-safety does not pre-empt ours.
        config[section] = {**config[section].to_dict(), key: value}
    with pytest.raises(ConfigError, match=match):
        parse_lm(config, n_devices=8)


def test_unknown_key_is_named():
    config = model_configs.get_config("tiny")
    with config.unlocked():
        config.model.n_head = 4
    with pytest.raises(ConfigError, match=r"config\.model\.n_head: unknown field"):
        parse_lm(config)


def test_batch_must_divide_data_parallel_size():
    config = model_configs.get_config("tiny,mesh=cpu8")
    config.train.batch_size = 6
    with pytest.raises(ConfigError, match=r"train\.batch_size.*6"):
        parse_lm(config, n_devices=8)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2_124m"):
        model_configs.get_config("gpt5")
    assert isinstance(model_configs.get_config(), ml_collections.ConfigDict)
