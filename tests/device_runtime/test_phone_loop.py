"""The phone's sync loop against the real aggregator (uvicorn in a thread, on loopback)."""

from __future__ import annotations

import json
import re
from itertools import pairwise

import numpy as np
import pytest

from android_harness.deploy import LocalTarget
from device_runtime.bundle import Bundle
from device_runtime.errors import FedkitError
from device_runtime.phone_loop import PhoneLoop, _pick, bundle_depth, main
from toolkit.aggregator.admin import issue_tokens
from toolkit.data import write_shard


@pytest.fixture
def server(serve_run, small_cnn_bundle):
    return serve_run(small_cnn_bundle())


def test_phone_enrols_trains_every_round_and_stops_when_done(server, small_cnn_bundle, fashion_train, tmp_path):
    _, coordinator = server
    phone = _deployed_phone(server, small_cnn_bundle(), fashion_train, tmp_path)

    assert PhoneLoop(phone, max_wait_s=0.2).run() == 2

    saved = json.loads((phone / "credential.json").read_text())
    assert saved["token"] and "enrol_token" not in saved  # the spent enrolment token is replaced
    events = [json.loads(line) for line in (phone / "events.jsonl").read_text().splitlines()]
    uploads = [e for e in events if e["event"] == "upload"]
    assert [(e["round"], e["status"]) for e in uploads] == [(1, "accepted"), (2, "accepted")]
    assert events[-1]["event"] == "done" and events[-1]["peak_rss_mb"] > 0
    assert coordinator.store.get_meta("done") == "1"


def test_a_phone_without_bundles_or_credential_says_what_to_deploy(tmp_path):
    with pytest.raises(FedkitError, match="credential"):
        PhoneLoop(tmp_path)
    (tmp_path / "credential.json").write_text(json.dumps({"url": "http://x", "device_id": "p", "token": "t"}))
    with pytest.raises(FedkitError, match="no bundle"):
        PhoneLoop(tmp_path)


def test_the_deepest_bundle_not_deeper_than_the_task_is_trained(small_cnn_bundle):
    shallow, deep = Bundle.load(small_cnn_bundle(train_blocks=1)), Bundle.load(small_cnn_bundle(train_blocks=2))
    assert (bundle_depth(shallow), bundle_depth(deep)) == (1, 2)
    bundles = {"a": shallow, "b": deep}
    assert _pick(bundles, 1) == "a"
    assert _pick(bundles, 5) == "b"
    assert _pick(bundles, None) == "b"
    assert _pick({"b": deep}, 1) == "b"  # nothing shallow enough: the shallowest there is


def _deployed_phone(server, bundle, fashion_train, tmp_path, images: int = 200):
    """A phone folder with ``bundle``, a shard of ``images`` images and an enrolment credential."""
    url, coordinator = server
    (token,) = issue_tokens(coordinator.store, 1)
    cred = tmp_path / "cred.json"
    cred.write_text(json.dumps({"url": url, "device_id": "p1", "enrol_token": token}))
    shard = write_shard(tmp_path / "s.npz", fashion_train.images[:images], fashion_train.labels[:images])
    phone = tmp_path / "phone"
    LocalTarget(phone).install([bundle], shard, cred)
    return phone


def test_main_prints_one_line_per_round(server, small_cnn_bundle, fashion_train, tmp_path, capsys):
    # Prepare
    phone = _deployed_phone(server, small_cnn_bundle(), fashion_train, tmp_path)

    # Execute
    code = main([str(phone)])

    # Assert
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    rounds = [line for line in lines if line.startswith("round ")]
    assert len(rounds) == 2, lines
    line = (
        r"round {} \(s, [\w.-]+\): \d+ samples, loss \d+\.\d{{4}}, local accuracy \d+\.\d%, \d+\.\d s, "
        r"[\d,.]+ KB up, [\d,.]+ KB down, push accepted"
    )
    assert re.fullmatch(line.format(1), rounds[0]) and re.fullmatch(line.format(2), rounds[1]), rounds
    assert lines[-1] == "done: the run is over, 2 update(s) pushed"


def test_main_with_json_prints_every_event_as_logged(server, small_cnn_bundle, fashion_train, tmp_path, capsys):
    phone = _deployed_phone(server, small_cnn_bundle(), fashion_train, tmp_path)

    code = main([str(phone), "--json"])

    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    logged = [json.loads(line) for line in (phone / "events.jsonl").read_text().splitlines()]
    assert code == 0
    assert printed == logged and printed[-1]["event"] == "done"


def test_a_bundle_the_run_does_not_fit_fails_with_the_reason_after_backing_off(
    server, small_cnn_bundle, fashion_train, tmp_path
):
    # Prepare: the run's version 0 holds the classifier only; the phone's bundle trains two blocks
    from device_runtime.client import RetryPolicy
    from device_runtime.errors import ProtocolError

    phone = _deployed_phone(server, small_cnn_bundle(train_blocks=2), fashion_train, tmp_path, images=100)

    # Execute
    with pytest.raises(ProtocolError, match="lacks"):
        PhoneLoop(phone, retry=RetryPolicy(base_s=0.05)).run()

    # Assert: five tries, each after a longer wait than the one before, not five at once
    errors = [json.loads(line) for line in (phone / "events.jsonl").read_text().splitlines() if '"error"' in line]
    assert [e["failures"] for e in errors] == [1, 2, 3, 4, 5]
    gaps = [b["t"] - a["t"] for a, b in pairwise(errors)]
    assert all(g >= 0.05 * 2 ** (i + 1) * 0.9 for i, g in enumerate(gaps)), gaps


def test_an_early_exit_phone_trains_and_pushes_every_round(serve_run, fashion_train, tmp_path):
    # Prepare: a bundle stopping at small_cnn+exits:1,2's exit after block 1, training both branches and block 1
    from device_runtime.codec import decode
    from device_runtime.manifest import DevicePlan
    from exporters.bundle import export_bundle
    from toolkit.data import LABEL_NAMES
    from toolkit.models import load_model

    out = tmp_path / "exit-bundle"
    plan = DevicePlan(cut=2, train_from=1, batch_size=16, exits=(1, 2), exit_weights=(1.0, 1.0))
    export_bundle(load_model("small_cnn+exits:1,2"), plan, out, ("ort",), label_names=LABEL_NAMES)
    server = serve_run(out)
    phone = _deployed_phone(server, out, fashion_train, tmp_path)

    # Execute
    pushed = PhoneLoop(phone, max_wait_s=0.2).run()

    # Assert: both rounds pushed, each an update of the branches and the block the bundle trains
    _, coordinator = server
    assert pushed == 2 and coordinator.store.get_meta("done") == "1"
    events = [json.loads(line) for line in (phone / "events.jsonl").read_text().splitlines()]
    trains = [e for e in events if e["event"] == "train"]
    assert len(trains) == 2 and all(0 <= e["accuracy"] <= 1 for e in trains)
    latest_version = coordinator.store.latest_version()
    assert latest_version is not None and latest_version.version == 2
    latest = decode(coordinator.store.version_blob(latest_version.version)).tensors
    initial = decode((out / "weights.bin").read_bytes()).tensors
    assert set(initial) == {t.name for t in Bundle.load(out).manifest.trainable} == set(latest)
    assert {n.rsplit(".", 2)[0] for n in initial if n.startswith("exits.")} == {"exits.1", "exits.2"}
    assert all(not np.array_equal(latest[n], initial[n]) for n in initial)
