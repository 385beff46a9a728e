"""The round state machine, driven directly (the HTTP mapping is tested in test_http_api)."""

import logging

import numpy as np
import pytest
from aggregator_helpers import SHAPES, delta, enrol, initial_weights, make_coordinator, payload

from device_runtime.codec import UpdateHeader, decode, encode
from toolkit.aggregator.status import run_status
from toolkit.aggregator.store import ExitScore
from toolkit.errors import ConfigError, StoreError


def weights_of(coordinator, version):
    return decode(coordinator.store.version_blob(version)).tensors


def pull_and_push(co, device, value, samples=10, key=None, names=tuple(SHAPES), accuracy=None):
    task = co.task_for(device)
    assert task["status"] == "task", task
    body = payload(device, task["round"], task["base_version"], delta(value, names), samples)
    return co.push(device, key or f"{device}-{task['round']}", body, accuracy)


def test_a_fedavg_round_closes_at_its_target_with_the_sample_weighted_mean(coordinator):
    # Prepare: two phones available, so the round wants two reports
    for d in ("a", "b"):
        enrol(coordinator, d)
    # Execute
    first = pull_and_push(coordinator, "a", 1.0, samples=10)
    assert coordinator.store.latest_version().version == 0  # one report is not enough
    second = pull_and_push(coordinator, "b", 3.0, samples=30)
    # Assert
    assert (first.status, first.code, second.status) == ("accepted", 200, "accepted")
    assert coordinator.store.latest_version().version == 1
    base, new = initial_weights(), weights_of(coordinator, 1)
    for name in SHAPES:
        np.testing.assert_allclose(new[name], base[name] + (10 * 1 + 30 * 3) / 40, rtol=1e-6)
    assert coordinator.task_for("a")["base_version"] == 1  # round 2 trains from version 1
    assert {u.version for u in coordinator.store.updates(round_=1)} == {1}


def test_tensors_are_averaged_over_the_phones_that_train_them(coordinator):
    for d in ("a", "b"):
        enrol(coordinator, d)
    pull_and_push(coordinator, "a", 1.0, names=("classifier.weight", "classifier.bias"))
    pull_and_push(coordinator, "b", 3.0)
    base, new = initial_weights(), weights_of(coordinator, 1)
    np.testing.assert_allclose(new["classifier.bias"], base["classifier.bias"] + 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["features.2.weight"], base["features.2.weight"] + 3.0, rtol=1e-6)


def test_over_selection_hands_out_extra_tasks_and_a_late_straggler_is_stale(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 1, "over_selection": 1.5},
        stages=[{"name": "s", "rounds": 5, "lr": 0.1, "participation": 0.5}],
    )
    for d in "abcd":
        enrol(co, d)
    # 4 available, participation 0.5: 2 reports wanted, 3 tasks handed out
    answers = [co.task_for(d)["status"] for d in "abcd"]
    assert answers == ["task", "task", "task", "wait"]
    for d in "ab":
        co.push(d, f"{d}-1", payload(d, 1, 0, delta(1.0)), None)
    late = co.push("c", "c-1", payload("c", 1, 0, delta(1.0)), None)
    assert (late.status, late.code) == ("stale", 409)
    assert len(co.store.updates(round_=1)) == 2


def test_at_the_deadline_a_round_closes_with_min_reports(coordinator, clock):
    for d in "abc":
        enrol(coordinator, d)
    pull_and_push(coordinator, "a", 1.0)
    pull_and_push(coordinator, "b", 1.0)
    assert coordinator.store.latest_version().version == 0  # 3 available: it wants 3
    clock.now += 61
    coordinator.tick()
    assert coordinator.store.latest_version().version == 1


def test_past_the_deadline_without_min_reports_the_round_waits_for_any_phone(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 2, "deadline_s": 10, "over_selection": 1.0},
        stages=[{"name": "s", "rounds": 5, "lr": 0.1, "participation": 0.3}],
    )
    for d in "abc":
        enrol(co, d)
    assert co.task_for("a")["status"] == "task"
    assert co.task_for("b")["status"] == "wait"  # one task for one report wanted
    co.push("a", "a-1", payload("a", 1, 0, delta(1.0)), None)
    clock.now += 11
    co.tick()
    assert co.store.latest_version().version == 0  # deadline passed with 1 of min 2 reports: still open
    assert co.task_for("b")["status"] == "task"  # now anyone available may take it
    co.push("b", "b-1", payload("b", 1, 0, delta(1.0)), None)
    assert co.store.latest_version().version == 1
    assert len(co.store.updates(version=1)) == 2  # the early report was kept


def test_participation_counts_only_phones_seen_recently(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 1, "over_selection": 1.0},
        limits={"seen_window_s": 100},
        stages=[{"name": "s", "rounds": 5, "lr": 0.1}],
    )
    credential = enrol(co, "a")
    for d in "bcd":
        enrol(co, d)
    clock.now += 200  # everyone left
    co.authenticate(credential)  # a comes back
    assert co.task_for("a")["status"] == "task"
    co.push("a", "a-1", payload("a", 1, 0, delta(1.0)), None)
    assert co.store.latest_version().version == 1  # 1 of 1 available reported


@pytest.mark.parametrize(
    "make, code, reason",
    [
        (lambda: payload("a", 2, 0, delta(1.0)), 403, "not given"),
        (lambda: payload("a", 1, 5, delta(1.0)), 422, "trains from version 0"),
        (lambda: payload("b", 1, 0, delta(1.0)), 403, "signed for device"),
        (lambda: payload("a", 1, 0, {"classifier.weight": np.ones((8, 10), np.float32)}), 422, "shape"),
        (lambda: payload("a", 1, 0, {"nope": np.ones(3, np.float32)}), 422, "not a trainable tensor"),
        (lambda: payload("a", 1, 0, delta(1e6)), 422, "L2 norm"),
        (lambda: payload("a", 1, 0, delta(1.0), num_samples=0), 422, "num_samples"),
        (lambda: encode(UpdateHeader("a", 1, 0, 10, kind="weights"), delta(1.0), "fp32"), 422, "kind"),
        (lambda: payload("a", 1, 0, delta(1.0))[:-3], 422, "does not decode"),
        (lambda: b"", 422, "does not decode"),
    ],
)
def test_bad_pushes_are_rejected_with_a_reason_and_nothing_is_stored(coordinator, make, code, reason):
    enrol(coordinator, "a")
    assert coordinator.task_for("a")["status"] == "task"
    outcome = coordinator.push("a", "key-1", make(), None)
    assert (outcome.status, outcome.code) == ("rejected", code)
    assert reason in outcome.reason
    assert coordinator.store.updates() == []


def test_a_key_and_a_reported_accuracy_are_checked(coordinator):
    enrol(coordinator, "a")
    coordinator.task_for("a")
    body = payload("a", 1, 0, delta(1.0))
    assert coordinator.push("a", None, body, None).code == 400
    assert coordinator.push("a", "bad key!", body, None).code == 400
    assert coordinator.push("a", "k", body, 1.5).code == 422
    assert coordinator.push("a", "k", body, float("nan")).code == 422
    assert coordinator.store.updates() == []


def test_a_repeated_push_is_a_duplicate_never_counted_twice(coordinator):
    for d in ("a", "b"):
        enrol(coordinator, d)
    coordinator.task_for("a")
    body = payload("a", 1, 0, delta(1.0))
    first = coordinator.push("a", "k1", body, None)
    again = coordinator.push("a", "k1", body, None)
    other_key = coordinator.push("a", "k2", body, None)
    assert (first.status, again.status, other_key.status) == ("accepted", "duplicate", "duplicate")
    assert again.update_id == first.update_id
    assert len(coordinator.store.updates()) == 1
    pull_and_push(coordinator, "b", 1.0)
    assert coordinator.push("a", "k1", body, None).status == "duplicate"  # even once the round closed


def test_a_reporter_waits_and_a_task_is_repeated_until_pushed(coordinator):
    for d in ("a", "b"):
        enrol(coordinator, d)
    assert coordinator.task_for("a") == coordinator.task_for("a")
    coordinator.push("a", "k", payload("a", 1, 0, delta(1.0)), None)
    assert coordinator.task_for("a")["status"] == "wait"


def test_stages_advance_and_the_run_finishes(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 1},
        stages=[
            {"name": "head", "rounds": 1, "lr": 0.1, "encoding": "int8"},
            {"name": "deep", "rounds": 1, "lr": 0.01, "encoding": "int4", "trainable_blocks": 3, "local_epochs": 2},
        ],
    )
    enrol(co, "a")
    task = co.task_for("a")
    assert (task["stage"], task["lr"], task["encoding"]) == ("head", 0.1, "int8")
    co.push("a", "k1", payload("a", 1, 0, delta(1.0)), None)
    task = co.task_for("a")
    assert (
        task["stage"],
        task["stage_index"],
        task["lr"],
        task["encoding"],
        task["trainable_blocks"],
        task["local_epochs"],
    ) == ("deep", 1, 0.01, "int4", 3, 2)
    co.push("a", "k2", payload("a", 2, 1, delta(1.0)), None)
    assert co.task_for("a") == {"status": "done"}
    assert co.store.get_meta("done") == "1"


def test_a_stage_ends_on_a_plateau_of_evaluated_accuracy(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 1},
        stages=[
            {"name": "head", "rounds": 50, "lr": 0.1, "plateau_patience": 1, "plateau_min_delta": 0.01},
            {"name": "deep", "rounds": 1, "lr": 0.01},
        ],
    )
    enrol(co, "a")
    stages = []
    for i, accuracy in enumerate([0.5, 0.7, 0.7, 0.7]):
        task = co.task_for("a")
        stages.append(task["stage"])
        co.push("a", f"k{i}", payload("a", task["round"], task["base_version"], delta(0.1)), accuracy=0.0)
        assert co.record_evaluation(task["base_version"] + 1, accuracy)  # evaluator beats phone reports
    # after round 4 closes, the evaluations of rounds 1-3 are known: 0.7 did not improve on 0.7
    assert stages == ["head", "head", "head", "head"]
    assert co.task_for("a")["stage"] == "deep"
    assert not co.record_evaluation(99, 0.5)


def test_fedbuff_makes_a_version_every_k_updates_and_refuses_too_stale_ones(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        mode="fedbuff",
        fedbuff={"buffer_size": 2, "max_staleness": 1},
        stages=[{"name": "s", "rounds": 10, "lr": 0.1}],
    )
    for d in "abcd":
        enrol(co, d)
    old = {d: co.task_for(d) for d in "abcd"}  # everyone trains from version 0, round 1
    assert all(t["status"] == "task" and t["base_version"] == 0 for t in old.values())
    for d in "ab":
        assert co.push(d, f"{d}1", payload(d, 1, 0, delta(1.0)), None).status == "accepted"
    assert co.store.latest_version().version == 1
    # c's update is 1 version old: accepted, discounted by 1/sqrt(2)
    assert co.push("c", "c1", payload("c", 1, 0, delta(1.0)), None).status == "accepted"
    task = co.task_for("a")
    assert (task["round"], task["base_version"]) == (2, 1)
    co.push("a", "a2", payload("a", 2, 1, delta(1.0)), None)
    assert co.store.latest_version().version == 2
    new, prev = weights_of(co, 2), weights_of(co, 1)
    np.testing.assert_allclose(new["classifier.bias"], prev["classifier.bias"] + (1 / np.sqrt(2) + 1) / 2, rtol=1e-5)
    # d's update is now 2 versions old: stale
    late = co.push("d", "d1", payload("d", 1, 0, delta(1.0)), None)
    assert (late.status, late.code) == ("stale", 409)


def test_a_restart_on_the_same_database_continues_the_round(tmp_path, clock):
    co = make_coordinator(tmp_path, clock, fedavg={"min_reports": 2})
    for d in ("a", "b"):
        enrol(co, d)
    pull_and_push(co, "a", 1.0)
    co.store.close()
    again = make_coordinator(tmp_path, clock, fedavg={"min_reports": 2})
    assert again.task_for("a")["status"] == "wait"  # it remembers a reported
    pull_and_push(again, "b", 3.0)
    assert again.store.latest_version().version == 1
    assert {u.device_id for u in again.store.updates(version=1)} == {"a", "b"}


def test_a_database_from_other_initial_weights_is_refused(tmp_path, clock):
    co = make_coordinator(tmp_path, clock)
    co.store.close()
    (tmp_path / "weights.bin").write_bytes(encode(UpdateHeader("x", 0, 0, 1, kind="weights"), delta(5.0), "fp32"))
    from toolkit.aggregator.config import parse_config
    from toolkit.aggregator.coordinator import Coordinator
    from toolkit.aggregator.store import Store

    config = parse_config(
        {"name": "test", "weights": "weights.bin", "stages": [{"name": "h", "rounds": 1, "lr": 0.1}]}, tmp_path
    )
    with pytest.raises(StoreError, match="other initial weights"):
        Coordinator(config, Store(config.default_db()), clock).start()


def test_initial_weights_must_be_a_weights_file(tmp_path, clock):
    from toolkit.aggregator.config import parse_config
    from toolkit.aggregator.coordinator import Coordinator
    from toolkit.aggregator.store import Store

    (tmp_path / "w.bin").write_bytes(b"not a codec file at all")
    config = parse_config(
        {"name": "t", "weights": "w.bin", "stages": [{"name": "h", "rounds": 1, "lr": 0.1}]}, tmp_path
    )
    with pytest.raises(ConfigError, match="not a codec weights file"):
        Coordinator(config, Store(config.default_db()), clock).start()
    config = parse_config(
        {"name": "t", "weights": "missing.bin", "stages": [{"name": "h", "rounds": 1, "lr": 0.1}]}, tmp_path
    )
    with pytest.raises(ConfigError, match="cannot be read"):
        Coordinator(config, Store(config.default_db()), clock).start()


def test_a_robust_round_ignores_one_poisoned_update(tmp_path, clock):
    co = make_coordinator(
        tmp_path,
        clock,
        fedavg={"min_reports": 5},
        robust={"aggregator": "median"},
        stages=[{"name": "s", "rounds": 2, "lr": 0.1}],
    )
    for i, value in enumerate([1.0, 1.0, 1.0, 1.0, 500.0]):
        enrol(co, f"p{i}")
        pull_and_push(co, f"p{i}", value)
    new, base = weights_of(co, 1), initial_weights()
    for name in SHAPES:
        np.testing.assert_allclose(new[name], base[name] + 1.0, rtol=1e-6)


def test_the_best_exit_point_model_follows_the_evaluations_and_is_logged(tmp_path, clock, caplog):
    co = make_coordinator(tmp_path, clock, fedavg={"min_reports": 1})
    enrol(co, "a")
    for i in range(3):
        task = co.task_for("a")
        co.push("a", f"k{i}", payload("a", task["round"], task["base_version"], delta(0.1)), None)
    figures = {1: (0.60, 0.70, 2.0), 2: (0.70, 0.80, 3.0), 3: (0.70, 0.7995, 2.5)}  # v3: 0.05 point below v2
    best = []
    with caplog.at_level(logging.INFO, logger="fedkit.aggregator"):
        for version, (early, final, loss) in figures.items():
            exits = (ExitScore(2, early, 1.0), ExitScore(5, final, 1.0))
            assert co.record_evaluation(version, final, "test", loss, exits)
            best.append(run_status(co.store).best.version)
    assert best == [1, 2, 3]  # v3 is within 0.1 point of v2 with a lower total loss
    logged = [r.fields["version"] for r in caplog.records if r.getMessage() == "best_exit_model"]
    assert logged == [1, 2, 3]
    assert not co.record_evaluation(99, 0.5, "test", 1.0, exits)
