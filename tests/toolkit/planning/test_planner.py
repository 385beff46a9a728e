"""The planner: memory budgets, infeasible phones, the rule, the oracle, plan files."""

from __future__ import annotations

import json
import math
import re

import pytest

from device_runtime.manifest import DevicePlan
from toolkit.errors import PlanError
from toolkit.models import load_model
from toolkit.planning import FleetPlan, Pin, PlanConfig, Planner, load_plan, plan_fleet
from toolkit.profiling import DeviceProfile, Link, catalog_profiles, links, load_profiles

MODEL = load_model("small_cnn")
N = len(MODEL.block_names)
EDGE = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000)


def _phone(name="p", gflops=20.0, memory_mb=900.0, link="4g", engines=("ort", "executorch")) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        source="catalog",
        cpu_cores=8,
        gflops=gflops,
        memory_mb=memory_mb,
        engines=engines,
        link=links()[link],
        cpu_power_w=3.0,
    )


def _planner(**config) -> Planner:
    return Planner(MODEL, EDGE, PlanConfig(**config))


@pytest.mark.parametrize("gflops", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("link", ["3g", "4g", "wifi"])
def test_planner_equals_the_brute_force_oracle(gflops, link):
    planner = _planner(edge_load=3)
    phone = _phone(gflops=gflops, link=link)

    assert planner.plan_phone(phone) == planner.oracle(phone)


def test_chosen_plan_fits_memory_and_tight_memory_shrinks_it():
    planner = _planner(slack=10.0)  # deepest anything: memory is what limits
    roomy = planner.plan_phone(_phone(memory_mb=5000))
    tight_mb = (roomy.memory_mb + 85.0) / 2  # between the runtime alone and the roomy choice
    tight = planner.plan_phone(_phone(memory_mb=tight_mb))

    assert roomy.memory_mb <= 5000 and tight.memory_mb <= tight_mb
    assert (tight.trainable_blocks, tight.plan.batch_size) < (roomy.trainable_blocks, roomy.plan.batch_size)


def test_nothing_fits_is_reported_not_dropped():
    fleet = _planner().plan([_phone("ok"), _phone("tiny", memory_mb=5)])

    assert [p.profile for p in fleet.phones] == ["ok", "tiny"]
    [tiny] = fleet.infeasible
    assert tiny.plan is None and "nothing fits memory" in tiny.reason and "5 MB" in tiny.reason


def test_no_engine_and_energy_budget_without_power_are_reported():
    fleet = _planner(energy_budget_j=1e9).plan(
        [
            _phone("no-engine", engines=()),
            DeviceProfile(name="no-power", source="local", cpu_cores=2, gflops=20, memory_mb=900, link=links()["4g"]),
        ]
    )

    assert "no engine" in fleet.phones[0].reason
    assert "cpu_power_w" in fleet.phones[1].reason


def test_energy_budget_is_respected():
    phone = _phone(gflops=5.0, link="4g")
    free = _planner(slack=10.0).plan_phone(phone)
    capped = _planner(slack=10.0, energy_budget_j=free.energy_j / 2).plan_phone(phone)

    assert free.energy_j > 0
    # half the energy still buys a plan for this phone, within that budget
    assert capped.plan is not None and capped.energy_j <= free.energy_j / 2
    assert _planner(energy_budget_j=1e-6).plan_phone(phone).reason.startswith("no choice within the energy budget")


def test_budget_rule_deeper_with_more_time():
    phone = _phone(gflops=5.0, link="wifi")
    fastest = _planner(slack=0.0).plan_phone(phone)
    loose = _planner(budget_s=fastest.plan.predicted["total"] * 100).plan_phone(phone)
    too_tight = _planner(budget_s=fastest.plan.predicted["total"] / 2).plan_phone(phone)

    assert loose.trainable_blocks > fastest.trainable_blocks
    assert loose.plan.predicted["total"] <= fastest.plan.predicted["total"] * 100
    assert too_tight.plan is None and "over the round budget" in too_tight.reason


def test_slack_rule_stays_within_slack_of_the_fastest():
    phone = _phone(gflops=5.0, link="4g")
    fastest = _planner(slack=0.0).plan_phone(phone).plan.predicted["total"]
    for slack in (0.05, 0.5, 2.0):
        chosen = _planner(slack=slack).plan_phone(phone).plan.predicted["total"]
        assert chosen <= fastest * (1 + slack) + 1e-4


def test_cut_zero_only_when_raw_upload_is_allowed():
    # a phone so slow that shipping raw images would be fastest
    phone = _phone(gflops=0.01, link="wifi")

    private = _planner(slack=0.0).plan_phone(phone)
    raw = _planner(slack=0.0, allow_raw_upload=True).plan_phone(phone)

    assert private.plan.cut >= 1
    assert raw.plan.cut == 0


def test_executorch_only_for_linear_heads_without_backward_from():
    planner = _planner()
    phone = _phone()
    on_executorch = [choice for choice in planner.candidates(phone) if choice.engine == "executorch"]
    assert on_executorch  # the phone has the engine: some choices use it
    for choice in on_executorch:
        trained = MODEL.block_names[choice.train_from : choice.cut]
        assert set(trained) <= {"pool", "classifier"}
        assert choice.cut == N or choice.train_from == choice.cut


def test_plan_file_round_trip(tmp_path):
    fleet = _planner().plan([_phone("a"), _phone("b"), _phone("x", memory_mb=5)])
    fleet.save(tmp_path / "plan.json")

    loaded = load_plan(tmp_path / "plan.json")

    assert loaded == fleet
    assert [p.profile for p in loaded.infeasible] == ["x"]
    assert isinstance(loaded.phones[0].plan, DevicePlan) and loaded.phones[0].plan == fleet.phones[0].plan


def test_pins_fix_a_phones_cut_or_depth_and_the_planner_picks_the_rest():
    n = len(_planner().model.block_names)
    fleet = _planner().plan([_phone("a"), _phone("b"), _phone("c")], {"a": Pin(cut=3), "b": Pin(depth=1)})
    by = {p.profile: p for p in fleet.phones}
    assert by["a"].plan.cut == 3  # SplitFed at the pinned cut
    assert by["b"].plan.cut == n and by["b"].trainable_blocks == 1  # the classifier alone
    assert by["c"].plan is not None
    impossible = _planner().plan([_phone("a")], {"a": Pin(cut=n, depth=99)}).phones[0]
    assert impossible.plan is None and "depth 99" in impossible.reason


def test_bad_plan_files_are_refused(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "none.json")
    (tmp_path / "v2.json").write_text(json.dumps({"schema_version": 2}))
    with pytest.raises(PlanError, match="schema version 2"):
        load_plan(tmp_path / "v2.json")
    fleet = _planner().plan([_phone("a")])
    data = json.loads(fleet.model_dump_json())
    data["phones"][0]["plan"]["train_from"] = 99
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PlanError, match=r"bad\.json is invalid"):
        load_plan(tmp_path / "bad.json")


def test_duplicate_names_and_bad_config_are_refused():
    with pytest.raises(PlanError, match="unique"):
        _planner().plan([_phone("a"), _phone("a")])
    with pytest.raises(PlanError, match="unknown or no update encodings"):
        PlanConfig(encodings=("int3",))


def test_plans_catalogue_phones_for_mobilenet_v2():
    phones = catalog_profiles(["entry-2018", "mid-2022", "flagship-2024"])
    fleet = Planner(load_model("mobilenet_v2"), EDGE, PlanConfig()).plan(phones)

    assert isinstance(fleet, FleetPlan) and not fleet.infeasible
    assert all(
        p.plan.cut >= 1 and p.memory_mb <= phone.memory_mb for p, phone in zip(fleet.phones, phones, strict=True)
    )


def test_catalogue_plan_picks_ort_for_every_class():
    # Prepare: every class assumes fedkit's Python phone runtime, which trains with ort only
    phones = catalog_profiles()

    # Execute
    fleet = Planner(load_model("mobilenet_v2"), EDGE, PlanConfig()).plan(phones)

    # Assert
    assert all(phone.engines == ("ort",) for phone in phones)
    assert not fleet.infeasible
    assert {p.plan.engine for p in fleet.phones} == {"ort"}


def test_ort_only_profile_never_gets_executorch():
    planner = _planner(slack=10.0)
    phone = _phone(engines=("ort",))

    assert {choice.engine for choice in planner.candidates(phone)} == {"ort"}
    assert planner.plan_phone(phone).plan.engine == "ort"
    assert planner.oracle(phone) == planner.plan_phone(phone)


def test_executorch_only_profile_gets_linear_heads_or_nothing():
    # Prepare: a phone whose runtime trains with executorch only (a native app), and an ort one
    planner = _planner(slack=10.0)  # deepest anything: only the engine limits the depth
    executorch_only = _phone(engines=("executorch",))

    # Execute
    choices = list(planner.candidates(executorch_only))
    chosen = planner.plan_phone(executorch_only)
    deeper = planner.plan_phone(_phone(engines=("ort",)))
    least_mb = min(e.memory_mb for e in planner.evaluate_all(executorch_only, choices))
    too_small = planner.plan_phone(_phone(engines=("executorch",), memory_mb=least_mb - 1))

    # Assert: every choice trains a linear head at the end of the model (no backward_from)
    assert choices and {c.engine for c in choices} == {"executorch"}
    for choice in choices:
        assert choice.cut == N and set(MODEL.block_names[choice.train_from :]) <= {"pool", "classifier"}
    assert chosen.plan.engine == "executorch" and chosen.plan.cut == N
    assert chosen == planner.oracle(executorch_only)
    assert chosen.trainable_blocks < deeper.trainable_blocks  # ort could train deeper: never planned here
    assert too_small.plan is None and "nothing fits memory" in too_small.reason


def test_profile_without_engine_is_infeasible_with_the_reason():
    planner = _planner()
    phone = _phone("bare", engines=())

    assert list(planner.candidates(phone)) == []
    planned = planner.plan_phone(phone)
    assert planned.plan is None and "no engine" in planned.reason and "none" in planned.reason
    assert planner.oracle(phone) == planned


def test_plan_uses_each_profiles_own_link_unless_one_is_named(tmp_path):
    # Prepare: what `fedkit plan --profiles DIR [--link NAME]` does: profiles from a folder,
    # identical but for their measured links
    slow = Link(uplink_mbps=0.5, downlink_mbps=2.0, rtt_ms=300.0)
    fast = Link(uplink_mbps=100.0, downlink_mbps=200.0, rtt_ms=5.0)
    _phone("slow", engines=("ort",)).with_link(slow).save(tmp_path / "slow.json")
    _phone("fast", engines=("ort",)).with_link(fast).save(tmp_path / "fast.json")
    phones = load_profiles(tmp_path)

    # Execute
    own = {p.profile: p.plan for p in plan_fleet("small_cnn", phones, edge=EDGE).phones}
    wifi = {p.profile: p.plan for p in plan_fleet("small_cnn", phones, edge=EDGE, link_name="wifi").phones}

    # Assert
    def transfer(plan: DevicePlan) -> float:
        return plan.predicted["upload"] + plan.predicted["download"]

    assert transfer(own["slow"]) > 10 * transfer(own["fast"])
    assert own["fast"].predicted["upload"] >= fast.rtt_ms / 2000
    assert wifi["slow"] == wifi["fast"]  # one link for both: the same phone
    assert transfer(wifi["slow"]) != transfer(own["slow"])


def test_a_phone_that_only_runs_the_numpy_engine_trains_its_head_and_nothing_deeper():
    # an arm64 phone: ONNX Runtime's inference build only, so a linear head trained in numpy
    phone = _phone(engines=("numpy",))
    planned = _planner(slack=10.0).plan_phone(phone)
    assert (
        planned.plan.engine == "numpy" and planned.plan.cut == len(MODEL.block_names) and planned.trainable_blocks == 1
    )
    assert _planner(slack=10.0).oracle(phone) == planned
    deeper = _planner(train_blocks=2).plan_phone(phone)
    assert deeper.plan is None
    assert _planner(mode="splitfed").plan_phone(phone).plan is None


# -- early exits ----------------------------------------------------------------------------

EXIT_MODEL = load_model("small_cnn+exits:1,2")  # exits 1, 2 and the final one, 5


def _exit_planner(**config) -> Planner:
    return Planner(EXIT_MODEL, EDGE, PlanConfig(**config))


@pytest.fixture(scope="module")
def mobilenet_exits() -> Planner:
    return Planner(load_model("mobilenet_v2+exits"), EDGE, PlanConfig(budget_s=3.0))


def test_a_weak_class_gets_a_shallower_exit_than_a_flagship_under_a_budget(mobilenet_exits):
    # Prepare: a weak class and a flagship under a 3 s round budget
    planner = mobilenet_exits
    phones = catalog_profiles(["low-2019", "flagship-2023"])

    # Execute
    weak, flagship = planner.plan(phones).phones

    # Assert: the flagship holds the final exit, the weak class stops earlier, each the deepest
    # exit whose round fits the budget: every deeper one of the weak class's takes longer
    assert flagship.plan.cut == len(planner.model.block_names) == flagship.plan.exits[-1]
    assert weak.plan.cut < flagship.plan.cut and weak.plan.predicted["total"] <= 3.0
    assert weak.reason.startswith("deepest exit within the round budget of 3 s")
    deeper = [
        e
        for e in planner.evaluate_all(phones[0], planner.candidates(phones[0]), planner.exit_from)
        if e.choice.cut > weak.plan.cut
    ]
    assert deeper and min(e.predicted["total"] for e in deeper) > 3.0


def test_without_a_budget_the_fleets_fastest_phone_at_the_final_exit_sets_it(mobilenet_exits):
    planner = Planner(mobilenet_exits.model, EDGE, PlanConfig(slack=0.5))
    phones = catalog_profiles(["entry-2018", "mid-2022", "flagship-2023"])

    entry, mid, flagship = planner.plan(phones).phones

    reference = flagship.plan.predicted["total"]
    assert flagship.plan.cut == len(planner.model.block_names)
    assert "1.50 × the round of flagship-2023 at the final exit" in mid.reason
    assert mid.plan.predicted["total"] <= 1.5 * reference
    # the weak class is over the budget at every exit: it still trains, at its fastest one
    assert entry.plan is not None and entry.plan.cut == 7
    assert (
        entry.reason.startswith("no exit within 1.50 × the round of flagship-2023") and "exit (7) takes" in entry.reason
    )
    assert entry.plan.predicted["total"] > 1.5 * reference


def test_exit_accuracy_stops_a_phone_where_deeper_exits_add_nothing():
    # Prepare: a budget every exit fits, and accuracies from an earlier run
    phone = _phone()
    flat = {1: 0.80, 2: 0.853, 5: 0.855}  # exit 2 within half a point of the final exit
    steep = {1: 0.80, 2: 0.84, 5: 0.855}

    # Execute
    deepest = _exit_planner(budget_s=1e6).plan_phone(phone)
    stopped = _exit_planner(budget_s=1e6, exit_accuracy=flat).plan_phone(phone)
    on = _exit_planner(budget_s=1e6, exit_accuracy=steep).plan_phone(phone)
    as_list = _exit_planner(budget_s=1e6, exit_accuracy=tuple(flat.values())).plan_phone(phone)

    # Assert
    assert deepest.plan.cut == on.plan.cut == 5
    assert stopped.plan.cut == as_list.plan.cut == 2
    assert (
        "shallowest exit within 0.5 point of the best" in stopped.reason and "exit 5, accuracy 85.5%" in stopped.reason
    )


def test_random_exits_are_reproducible_cover_every_exit_and_fit_memory():
    # Prepare: 30 phones, and one whose memory holds exit 1 alone
    phones = [_phone(f"phone-{i}") for i in range(30)]
    planner = _exit_planner()
    least_mb = {cut: math.inf for cut in EXIT_MODEL.exits}
    for e in planner.evaluate_all(_phone(), planner.candidates(_phone())):
        least_mb[e.choice.cut] = min(least_mb[e.choice.cut], e.memory_mb)
    assert least_mb[1] < least_mb[2] < least_mb[5]  # the premise
    small = _phone("small", memory_mb=(least_mb[1] + least_mb[2]) / 2)

    # Execute
    first = _exit_planner(exit_policy="random").plan([*phones, small])
    again = _exit_planner(exit_policy="random").plan([*phones, small])
    other_seed = _exit_planner(exit_policy="random", seed=1).plan([*phones, small])

    # Assert
    cuts = [p.plan.cut for p in first.phones]
    assert first == again
    assert set(cuts[:-1]) == set(EXIT_MODEL.exits)
    assert cuts != [p.plan.cut for p in other_seed.phones]
    assert cuts[-1] == 1 and "drawn at random (seed 0)" in first.phones[-1].reason


def test_exit_plans_carry_their_exits_weights_and_one_depth():
    # Prepare: a depth of 2 (T = features.2, the classifier's is the last parameterised block)
    planner = _exit_planner(budget_s=1e6, train_blocks=2, exit_weights={1: 0.5})
    pins = {"a": Pin(cut=1), "b": Pin(cut=2), "c": Pin(cut=5)}

    # Execute
    fleet = planner.plan([_phone(name) for name in pins], pins)

    # Assert: each phone holds the exits up to its own, trains from min(T, exit), on ort
    t = EXIT_MODEL.train_from(5, 2)
    assert t == 2 and planner.exit_from == t
    a, b, c = (p.plan for p in fleet.phones)
    assert (a.cut, a.train_from, a.exits, a.exit_weights) == (1, 1, (1,), (0.5,))
    assert (b.cut, b.train_from, b.exits, b.exit_weights) == (2, 2, (1, 2), (0.5, 1.0))
    assert (c.cut, c.train_from, c.exits, c.exit_weights) == (5, 2, (1, 2, 5), (0.5, 1.0, 1.0))
    assert {p.engine for p in (a, b, c)} == {"ort"}
    assert [p.trainable_blocks for p in fleet.phones] == [0, 0, 2]
    assert _exit_planner(exit_weights=(0.5, 2.0, 1.0)).plan([_phone("c")], {"c": Pin(cut=5)}).phones[
        0
    ].plan.exit_weights == (0.5, 2.0, 1.0)


def test_an_exit_that_would_train_on_no_loss_is_never_planned():
    planner = _exit_planner(exit_policy="random", exit_weights={1: 0.0})

    fleet = planner.plan([_phone(f"phone-{i}") for i in range(20)])

    assert {p.plan.cut for p in fleet.phones} == {2, 5}


def test_exit_plan_files_round_trip(tmp_path):
    fleet = _exit_planner(exit_weights={1: 0.5}, exit_accuracy=(0.8, 0.84, 0.855)).plan([_phone("a")])
    fleet.save(tmp_path / "plan.json")

    assert load_plan(tmp_path / "plan.json") == fleet


@pytest.mark.parametrize(
    "model, config, pins, says",
    [
        (EXIT_MODEL, {"mode": "splitfed"}, {}, "SplitFed + exits is not supported"),
        (EXIT_MODEL, {"max_train_blocks": 2}, {}, "one depth on every phone"),
        (EXIT_MODEL, {"exit_weights": {3: 1.0}}, {}, "exit weights for positions [3], which are no exits"),
        (EXIT_MODEL, {"exit_weights": (1.0, 1.0)}, {}, "2 exit weights for 3 exits"),
        (EXIT_MODEL, {"exit_weights": {1: 0, 2: 0, 5: 0}}, {}, "all 0"),
        (EXIT_MODEL, {"exit_accuracy": {1: 0.8, 5: 0.9}}, {}, "leave out exits [2]"),
        (EXIT_MODEL, {}, {"a": Pin(cut=3)}, "cut 3 is no exit of small_cnn+exits:1,2"),
        (EXIT_MODEL, {}, {"a": Pin(depth=1)}, "pin its exit (cut), not a depth"),
        (MODEL, {"exit_policy": "random"}, {}, "small_cnn has no early exits"),
        (MODEL, {"exit_weights": (1.0,)}, {}, "plan small_cnn+exits"),
    ],
)
def test_exit_configurations_that_cannot_work_are_refused(model, config, pins, says):
    with pytest.raises(PlanError, match=re.escape(says)):
        Planner(model, EDGE, PlanConfig(**config)).plan([_phone("a")], pins)


@pytest.mark.parametrize(
    "config, says",
    [
        ({"exit_weights": {1: -0.5}}, "every weight must be a number of 0 or more"),
        ({"exit_weights": (1.0, float("nan"))}, "every weight must be a number of 0 or more"),
        ({"exit_accuracy": {1: 85.0}}, "fractions between 0 and 1 (0.85, not 85)"),
    ],
)
def test_bad_exit_values_are_refused_by_the_config(config, says):
    with pytest.raises(PlanError, match=re.escape(says)):
        PlanConfig(**config)
