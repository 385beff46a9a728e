from __future__ import annotations

import pytest

from toolkit.errors import ConfigError
from toolkit.simulation import demo_config, load_simulation, parse_simulation

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
