from __future__ import annotations

import tomllib

import pytest

from toolkit.errors import ConfigError
from toolkit.nas.config import default_config, default_config_path, load_nas, parse_nas


def test_the_default_config_parses_and_sizes_a_short_search():
    config = default_config()

    assert config.name == "fashion" and config.strategy == "controller" and config.reward_source == "server"
    assert config.families == ("mobilenet_v2", "efficientnet_lite0")
    assert config.reward.beta == 7
    assert config.sampled_networks == config.controller.steps * config.controller.samples_per_step
    # every key of the shipped file is a field (extra = forbid), and the file is what it documents
    assert parse_nas(tomllib.loads(default_config_path().read_text())) == config


def test_a_minimal_config_takes_the_defaults():
    config = parse_nas({"name": "x"})

    assert config.controller.hidden == 64 and config.controller.baseline_decay == 0.9
    assert config.fingerprint() == parse_nas({"name": "x"}).fingerprint()
    assert config.fingerprint() != parse_nas({"name": "x", "seed": 1}).fingerprint()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({}, "name: Field required"),
        ({"name": "a b"}, "name: String should match"),
        ({"name": "x", "bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"name": "x", "controller": {"stepz": 3}}, "controller.stepz: Extra inputs"),
        ({"name": "x", "controller": {"steps": 0}}, "controller.steps: Input should be greater than or equal to 1"),
        ({"name": "x", "reward": {"beta": 0}}, "reward.beta"),
        ({"name": "x", "reward": {"beta": 7.5}}, "reward.beta"),
        ({"name": "x", "strategy": "greedy"}, "strategy"),
        ({"name": "x", "families": ["mobilenet_v2"]}, "two or more distinct"),
        ({"name": "x", "families": ["mobilenet_v2", "resnet18"]}, "unknown 'resnet18'"),
        ({"name": "x", "data": {"train_images": 59000, "val_images": 1000, "test_images": 1000}}, "disjoint"),
        ({"name": "x", "data": {"val_images": 100}}, "eval_images 250 is more than data.val_images 100"),
        ({"name": "x", "reward_source": "federated"}, "needs a [fleet] section"),
        ({"name": "x", "fleet": {}}, 'for reward_source = "federated"'),
        ({"name": "x", "reward_source": "federated", "fleet": {"phones": 0}}, "fleet.phones"),
    ],
)
def test_a_bad_config_names_the_field(data, says):
    with pytest.raises(ConfigError, match="search config") as info:
        parse_nas(data)

    assert says in str(info.value)


def test_a_federated_config_takes_the_fleet_section():
    config = parse_nas({"name": "x", "reward_source": "federated", "fleet": {"phones": 4, "deadline_s": 60}})

    assert config.fleet_config().phones == 4 and config.fleet_config().url is None


def test_files_missing_or_not_toml_fail_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.toml does not exist"):
        load_nas(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("name = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml is not valid TOML"):
        load_nas(tmp_path / "bad.toml")
    (tmp_path / "typo.toml").write_text('name = "x"\n[supernet]\nwarmup = 3\n')
    with pytest.raises(ConfigError, match=r"typo\.toml: supernet\.warmup: Extra inputs"):
        load_nas(tmp_path / "typo.toml")
