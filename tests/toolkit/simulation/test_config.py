from __future__ import annotations

import re

import pytest

from toolkit.errors import ConfigError
from toolkit.simulation import demo_config, load_simulation, parse_simulation
from toolkit.simulation.run import plan_config

BASE = {"name": "x", "phones": [{"class": "mid-2022", "count": 2}], "stages": [{"name": "s", "rounds": 1, "lr": 0.01}]}


def test_demo_is_eight_phones_of_four_classes_two_stages_and_a_crash():
    c = demo_config()
    assert c.num_phones == 8 and len({g.phone_class for g in c.phones}) == 4
    assert c.model == "mobilenet_v2" and c.depth == "plan" and c.encoding == "int8"
    assert [s.trainable_blocks for s in c.stages] == [1, None] and c.max_train_blocks == 3  # then the planned depth
    assert [f.kind for f in c.faults] == ["kill_phone"]


def test_fault_naming_an_unknown_phone_is_refused():
    with pytest.raises(ConfigError, match="phone-9"):
        parse_simulation({**BASE, "faults": [{"kind": "kill_phone", "phone": "phone-9"}]})


def test_kill_phone_without_a_phone_is_refused():
    with pytest.raises(ConfigError, match="names its 'phone'"):
        parse_simulation({**BASE, "faults": [{"kind": "kill_phone"}]})


def test_group_needs_exactly_one_of_class_and_profile():
    with pytest.raises(ConfigError, match="exactly one"):
        parse_simulation({**BASE, "phones": [{"count": 2}]})


def test_unknown_field_is_named(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text(
        'name = "x"\nroundz = 3\n[[phones]]\nclass = "mid-2022"\n[[stages]]\nname = "s"\nrounds = 1\nlr = 0.01\n'
    )
    with pytest.raises(ConfigError, match="roundz"):
        load_simulation(path)


def test_profile_paths_are_taken_from_the_config_folder(tmp_path):
    path = tmp_path / "sim.toml"
    path.write_text('name = "x"\n[[phones]]\nprofile = "p.json"\n[[stages]]\nname = "s"\nrounds = 1\nlr = 0.01\n')
    assert load_simulation(path).phones[0].profile == tmp_path / "p.json"


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_simulation(tmp_path / "nope.toml")


def test_a_pinned_cut_needs_a_splitfed_run():
    with pytest.raises(ConfigError, match='mode = "splitfed"'):
        parse_simulation({**BASE, "phones": [{"class": "mid-2022", "cut": 3}]})
    assert (
        parse_simulation({**BASE, "mode": "splitfed", "phones": [{"class": "mid-2022", "cut": 3}]}).phones[0].cut == 3
    )


def test_splitfed_phones_cannot_run_executorch():
    with pytest.raises(ConfigError, match="only the ort engine"):
        parse_simulation({**BASE, "mode": "splitfed", "phones": [{"class": "mid-2022", "engine": "executorch"}]})


def test_an_exit_model_with_its_policy_weights_and_accuracies_is_planned_as_given(tmp_path):
    # Prepare: the knobs as a TOML file writes them (a table's keys are strings)
    path = tmp_path / "sim.toml"
    path.write_text(
        'name = "x"\nmodel = "small_cnn+exits:1,2"\ndepth = "plan"\ntrain_blocks = 2\nexit_policy = "random"\n'
        "exit_weights = {1 = 0.5}\nexit_accuracy = [0.8, 0.84, 0.85]\nseed = 7\n"
        '[[phones]]\nclass = "mid-2022"\n[[stages]]\nname = "s"\nrounds = 1\nlr = 0.01\n'
    )

    # Execute
    config = load_simulation(path)
    planned = plan_config(config, num_phones=2)

    # Assert: one depth for every phone (no stage depths), the exit knobs passed on
    assert config.has_exits and config.exit_weights == {1: 0.5}
    assert (planned.train_blocks, planned.max_train_blocks, planned.stage_depths) == (2, None, ())
    assert (planned.exit_policy, planned.exit_weights, planned.exit_accuracy, planned.seed) == (
        "random",
        {1: 0.5},
        (0.8, 0.84, 0.85),
        7,
    )
    assert parse_simulation({**BASE, "model": "mobilenet_v2+exits"}).has_exits
    assert not parse_simulation(BASE).has_exits


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"model": "resnet18"}, "unknown model 'resnet18'"),
        ({"model": "small_cnn+exits:a"}, "exit positions must be integers"),
        ({"model": "small_cnn+exitz"}, "unknown model 'small_cnn+exitz'"),
        ({"model": "small_cnn+exits", "mode": "splitfed"}, "SplitFed + exits is not supported"),
        ({"model": "small_cnn+exits", "mode": "auto"}, "the edge would need the blocks and branches past"),
        ({"exit_weights": [1, 1]}, 'set model = "mobilenet_v2+exits"'),
        ({"exit_policy": "random"}, "are for a model with exits"),
        ({"model": "small_cnn+exits", "exit_policy": "best"}, "exit_policy"),
    ],
)
def test_exit_settings_that_cannot_run_are_refused(changes, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_simulation({**BASE, **changes})


@pytest.mark.parametrize(
    ("phones", "extra", "says"),
    [
        ([{"class": "mid-2022", "count": 2, "left_out": True}], {}, "every phone group is left_out"),
        (
            [{"class": "mid-2022", "count": 2}, {"class": "low-2022", "count": 2, "left_out": True}],
            {"min_reports": 3},
            "min_reports = 3, but only 2 phones take part",
        ),
        (
            [{"class": "mid-2022", "count": 2}, {"class": "low-2022", "count": 1, "left_out": True}],
            {"faults": [{"kind": "kill_phone", "phone": "phone-3"}]},
            "names phone-3, which is in a left_out group",
        ),
    ],
)
def test_left_out_groups_that_leave_nothing_to_run_are_refused(phones, extra, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_simulation({**BASE, "phones": phones, **extra})


def test_left_out_phones_keep_their_numbers_and_are_flagged():
    from toolkit.simulation.phones import fleet_phones

    config = parse_simulation(
        {**BASE, "phones": [{"class": "low-2022", "count": 1, "left_out": True}, {"class": "mid-2022", "count": 2}]}
    )

    phones = fleet_phones(config)

    assert [(p.device_id, p.left_out) for p in phones] == [("phone-1", True), ("phone-2", False), ("phone-3", False)]
    assert config.num_phones == 3  # the data is split three ways whoever takes part
