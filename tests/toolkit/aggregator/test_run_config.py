import pytest

from toolkit.aggregator.config import load_config, parse_config
from toolkit.errors import ConfigError

GOOD = """
name = "fashion"
weights = "weights.bin"
mode = "fedbuff"

[fedbuff]
buffer_size = 5

[[stages]]
name = "head"
rounds = 10
lr = 0.01
encoding = "layered:4"

[[stages]]
name = "deeper"
rounds = 5
lr = 0.005
trainable_blocks = 3
participation = 0.5
plateau_patience = 2
"""


def test_a_good_config_loads_with_paths_from_its_folder(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(GOOD)
    config = load_config(path)
    assert config.mode == "fedbuff" and config.fedbuff.buffer_size == 5
    assert [s.name for s in config.stages] == ["head", "deeper"]
    assert config.stages[1].trainable_blocks == 3 and config.stages[0].local_epochs is None  # None: the plan decides
    assert config.weights_path() == tmp_path / "weights.bin"
    assert config.default_db() == tmp_path / "runs" / "fashion" / "aggregator.sqlite"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"stages": [{"name": "a", "rounds": 1, "lr": -1}]}, "stages.0.lr"),
        ({"stages": [{"name": "a", "rounds": 1, "lr": 0.1, "participation": 1.5}]}, "stages.0.participation"),
        ({"stages": [{"name": "a", "rounds": 1, "lr": 0.1, "encoding": "int3"}]}, "stages.0"),
        ({"stages": [{"name": "a", "rounds": 1, "lr": 0.1, "encoding": "layered:lots"}]}, "stages.0"),
        ({"stages": []}, "stages"),
        ({"mode": "fedsgd"}, "mode"),
        ({"fedbuff": {"buffer_size": 0}}, "fedbuff.buffer_size"),
        ({"robust": {"aggregator": "krum"}}, "robust.aggregator"),
        ({"limits": {"burst": 0}}, "limits.burst"),
        ({"stages": [{"name": "a", "rounds": 1, "lr": 0.1, "lr_decay": 0.5}]}, "stages.0.lr_decay"),
    ],
)
def test_a_bad_field_is_named(change, field):
    data = {"name": "x", "weights": "w.bin", "stages": [{"name": "a", "rounds": 1, "lr": 0.1}], **change}
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert f"{field}:" in str(err.value)


def test_weights_come_from_exactly_one_source():
    with pytest.raises(ConfigError, match="exactly one of 'weights'"):
        parse_config({"name": "x", "stages": [{"name": "a", "rounds": 1, "lr": 0.1}]})
    with pytest.raises(ConfigError, match="exactly one of 'weights'"):
        parse_config({"name": "x", "weights": "a", "bundle": "b", "stages": [{"name": "a", "rounds": 1, "lr": 0.1}]})


def test_missing_and_broken_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


SPLITFED = {
    "name": "s",
    "weights": "w.bin",
    "model": "small_cnn",
    "splitfed": {"workers": 3},
    "stages": [{"name": "a", "rounds": 1, "lr": 0.1}],
}


def test_a_splitfed_section_is_read_with_defaults():
    edge = parse_config(SPLITFED).splitfed
    assert (edge.workers, edge.queue, edge.max_copies) == (3, 16, 64)
    assert parse_config({k: v for k, v in SPLITFED.items() if k != "splitfed"}).splitfed is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "fedbuff"}, "synchronous rounds"),
        ({"model": None}, "name the run's 'model'"),
        ({"splitfed": {"workers": 0}}, "splitfed.workers"),
        ({"splitfed": {"threads": 2}}, "splitfed.threads"),
    ],
)
def test_a_bad_splitfed_section_says_what_to_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**SPLITFED, **change})
