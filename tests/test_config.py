"""PixelflyConfig: defaults, serialisation round trips, validation with errors that name the bad value."""
import json

import pytest

from pixelfly_hf import PixelflyAttentionConfig, PixelflyConfig
from pixelfly_hf.config import CONFIG_NAME


def test_defaults_are_a_density_budget_on_attention_and_mlp():
    config = PixelflyConfig()
    assert config.target_modules == ["attn", "mlp"]
    assert config.density == 0.25 and config.butterfly_size is None and config.n_factors is None
    assert (config.low_rank, config.block_size, config.gate, config.init) == (None, 32, False, "project")


def test_explicit_layout_leaves_density_unset():
    config = PixelflyConfig(butterfly_size=8, n_factors=2)
    assert config.density is None and (config.butterfly_size, config.n_factors) == (8, 2)


def test_dict_and_file_round_trip(tmp_path):
    config = PixelflyConfig(
        target_modules=("mlp", r"h\.0\.attn\.c_attn"), exclude_modules=["h.1.mlp.c_fc"], density=0.4, low_rank=16,
        gate=True, block_size=16, overrides={"attn": {"butterfly_size": 4, "n_factors": 1}}, init="random",
    )
    assert PixelflyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    path = config.save_pretrained(tmp_path / "cfg")
    assert path.endswith(CONFIG_NAME) and json.load(open(path))["density"] == 0.4
    assert PixelflyConfig.from_pretrained(tmp_path / "cfg") == config


def test_attention_config_is_converted_checked_and_round_trips(tmp_path):
    config = PixelflyConfig(attention="pixelfly", attention_config={"block_size": 64, "n_global_tokens": 64})
    assert config.attention_config == PixelflyAttentionConfig(block_size=64, n_global_tokens=64)
    assert json.loads(config.to_json_string())["attention_config"]["n_global_tokens"] == 64
    config.save_pretrained(tmp_path)
    assert PixelflyConfig.from_pretrained(tmp_path) == config
    assert PixelflyConfig(attention="pixelfly").attention_config == PixelflyAttentionConfig()
    assert PixelflyConfig().attention_config is None


@pytest.mark.parametrize(
    "attention_config, message",
    [
        ({"blok_size": 64}, r"unknown pixelfly_attention option\(s\) \['blok_size'\]; known options: .*'block_size'"),
        ({"block_size": 100}, "attention_config.block_size=100 must be a power of 2"),
        ({"n_factors": 0}, r"attention_config.n_factors=0 must be an integer >= 1"),
        ({"butterfly_size": 4, "n_factors": 3}, r"attention_config.n_factors=3 must be an integer in \[1, log2"),
        ("dense", "must be a PixelflyAttentionConfig, a dict of its fields, or None"),
    ],
)
def test_attention_config_errors_at_construction(attention_config, message):
    with pytest.raises(ValueError, match=message):
        PixelflyConfig(attention="pixelfly", attention_config=attention_config)


def test_from_pretrained_on_a_folder_without_the_file_says_which_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        PixelflyConfig.from_pretrained(tmp_path)


def test_unknown_keys_are_rejected_by_name():
    with pytest.raises(ValueError, match=r"unknown PixelflyConfig key\(s\) \['densty'\]"):
        PixelflyConfig.from_dict({"densty": 0.3})
    with pytest.raises(TypeError, match="densty"):
        PixelflyConfig(densty=0.3)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        PixelflyConfig(overrides={"mlp": {"rank": 8}})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"density=0.0 must be a fraction in \(0, 1\]"),
        ({"density": 1.5}, r"density=1.5"),
        ({"density": 0.5, "butterfly_size": 4, "n_factors": 1}, "give either a density budget"),
        ({"butterfly_size": 4}, "an explicit layout needs both"),
        ({"butterfly_size": 6, "n_factors": 1}, "butterfly_size=6 must be a power of 2"),
        ({"butterfly_size": 4, "n_factors": 3}, r"n_factors=3 must be an integer in \[0, log2\(butterfly_size=4\)\]"),
        ({"low_rank": -1}, "low_rank=-1"),
        ({"block_size": 8}, "block_size=8 must be a power of 2 and at least 16"),
        ({"gate": "yes"}, "gate='yes' must be True or False"),
        ({"init": "svd"}, "init='svd' must be 'project'"),
        ({"projection_iters": 0}, "projection_iters=0"),
        ({"attention": "flash"}, "attention='flash' must be one of"),
        ({"attention_config": {"n_factors": 2}}, "set attention='pixelfly'"),
        ({"target_modules": []}, r"target_modules=\[\] must be a non-empty list"),
        ({"target_modules": ["attn", 3]}, "target_modules="),
        ({"exclude_modules": ""}, "exclude_modules='' is empty"),
        ({"overrides": {"mlp": {}}}, r"overrides\['mlp'\]=\{\} must be a non-empty dict"),
        ({"overrides": {"mlp": {"density": 2}}}, r"overrides\['mlp'\]: density=2"),
    ],
)
def test_invalid_values_raise_naming_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PixelflyConfig(**kwargs)
