"""Validation probes on the aggregator (toolkit.aggregator.probes): who may post, list, answer and
read them, what an answer must be, and that probes outlive the server process."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import httpx
import pytest
import tomli_w
from aggregator_helpers import enrol, run_config
from serving import serving

from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.app import create_app
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.store import Store


@pytest.fixture(scope="module")
def onnx_model(one_torch_thread) -> bytes:
    """small_cnn's ONNX inference model, as the host posts it."""
    import torch

    from toolkit.models import load_model
    from toolkit.nas.fleet import probe_model

    torch.manual_seed(0)
    blob, _ = probe_model(load_model("small_cnn"))
    return blob


@pytest.fixture
def admin(coordinator) -> dict:
    return {"Authorization": f"Bearer {issue_tokens(coordinator.store, 1, 'admin')[0]}"}


def _device(coordinator, device_id: str) -> dict:
    return {"Authorization": f"Bearer {enrol(coordinator, device_id)}"}


def _post(client, headers, blob, spec=None):
    extra = {} if spec is None else {"X-Fedkit-Input": json.dumps(spec)}
    return client.post("/v1/probes", content=blob, headers={**headers, **extra})


def test_a_probe_is_listed_downloaded_answered_once_per_device_and_summed(client, coordinator, admin, onnx_model):
    probe = _post(client, admin, onnx_model).json()["probe"]
    p1, p2 = _device(coordinator, "p1"), _device(coordinator, "p2")

    listed = client.get("/v1/probes", headers=p1).json()["probes"]
    model = client.get(f"/v1/probes/{probe}/model", headers=p1)
    first = client.post(f"/v1/probes/{probe}/answers", json={"correct": 3, "total": 10, "samples": 100}, headers=p1)
    again = client.post(f"/v1/probes/{probe}/answers", json={"correct": 9, "total": 10, "samples": 100}, headers=p1)
    client.post(f"/v1/probes/{probe}/answers", json={"correct": 20, "total": 30, "samples": 300}, headers=p2)

    assert probe == hashlib.sha256(onnx_model).hexdigest()
    assert listed == [{"probe": probe, "input": listed[0]["input"], "bytes": len(onnx_model)}]
    assert listed[0]["input"]["height"] == 32 and listed[0]["input"]["channels"] == 3
    assert model.status_code == 200 and model.content == onnx_model
    assert (first.json()["status"], again.json()["status"]) == ("recorded", "duplicate")
    assert client.get("/v1/probes", headers=p1).json()["probes"] == []  # answered: no longer listed for p1
    result = client.get(f"/v1/probes/{probe}", headers=admin).json()
    assert (result["answers"], result["correct"], result["total"]) == (2, 23, 40)  # p1 counted once, its first answer
    assert result["accuracy"] == pytest.approx(23 / 40) and result["open"]


def test_probe_routes_need_the_right_credential(client, coordinator, admin, onnx_model):
    device = _device(coordinator, "p1")
    probe = _post(client, admin, onnx_model).json()["probe"]

    wrong = _post(client, {"Authorization": "Bearer not-a-token"}, onnx_model)
    as_device = _post(client, device, onnx_model)
    read_as_device = client.get(f"/v1/probes/{probe}", headers=device)
    list_as_admin = client.get("/v1/probes", headers=admin)
    answer_as_admin = client.post(
        f"/v1/probes/{probe}/answers", json={"correct": 1, "total": 1, "samples": 1}, headers=admin
    )
    no_token = client.get(f"/v1/probes/{probe}")

    assert wrong.status_code == 401 and no_token.status_code == 401
    assert as_device.status_code == 403 and "admin" in as_device.json()["reason"]
    assert read_as_device.status_code == 403
    assert list_as_admin.status_code == 403 and answer_as_admin.status_code == 403


@pytest.mark.parametrize(
    "body, why",
    [
        ({"correct": 11, "total": 10, "samples": 100}, "more than total"),
        ({"correct": 1, "total": 101, "samples": 100}, "more than the device's samples"),
        ({"correct": -1, "total": 10, "samples": 100}, "correct"),
        ({"correct": 1, "total": 0, "samples": 100}, "total"),
        ({"correct": 1.0, "total": 10, "samples": 100}, "correct"),
        ({"correct": True, "total": 10, "samples": 100}, "correct"),
        ({"correct": "1", "total": 10, "samples": 100}, "correct"),
        ({"correct": 1, "total": 10}, "samples"),
        ({"correct": 1, "total": 10, "samples": 100, "images": []}, "images"),
    ],
)
def test_an_answer_outside_the_rules_is_refused_with_the_reason(client, coordinator, admin, onnx_model, body, why):
    probe = _post(client, admin, onnx_model).json()["probe"]

    r = client.post(f"/v1/probes/{probe}/answers", json=body, headers=_device(coordinator, "p1"))

    assert r.status_code == 422 and why in r.json()["reason"]
    assert client.get(f"/v1/probes/{probe}", headers=admin).json()["answers"] == 0


def test_a_file_that_is_no_runnable_probe_is_refused(client, coordinator, admin, onnx_model):
    corrupt = onnx_model[: len(onnx_model) // 2]

    answers = [
        _post(client, admin, corrupt),
        _post(client, admin, b"not onnx" * 200),
        _post(
            client, admin, onnx_model, {"height": 28, "width": 28, "channels": 3, "mean": [0, 0, 0], "std": [1, 1, 1]}
        ),
        _post(client, admin, onnx_model, {"height": 32, "width": 32, "channels": 3, "mean": [0], "std": [1]}),
        client.post("/v1/probes", content=b"x" * (coordinator.config.limits.max_probe_bytes + 1), headers=admin),
    ]

    assert [r.status_code for r in answers] == [422, 422, 422, 422, 413]
    assert "ONNX Runtime cannot load" in answers[0].json()["reason"]
    assert "input" in answers[2].json()["reason"] and "mean" in answers[3].json()["reason"]
    assert client.get("/v1/probes", headers=_device(coordinator, "p1")).json()["probes"] == []


def test_a_closed_probe_takes_no_answers_and_posting_it_again_reopens_it(client, coordinator, admin, onnx_model):
    probe = _post(client, admin, onnx_model).json()["probe"]
    p1, p2 = _device(coordinator, "p1"), _device(coordinator, "p2")
    client.post(f"/v1/probes/{probe}/answers", json={"correct": 5, "total": 10, "samples": 50}, headers=p1)

    closed = client.post(f"/v1/probes/{probe}/close", headers=admin).json()
    late = client.post(f"/v1/probes/{probe}/answers", json={"correct": 1, "total": 10, "samples": 50}, headers=p2)
    model = client.get(f"/v1/probes/{probe}/model", headers=p2)
    listed = client.get("/v1/probes", headers=p2).json()["probes"]
    again = _post(client, admin, onnx_model).json()

    assert (closed["open"], closed["answers"], closed["accuracy"]) == (False, 1, 0.5)
    assert late.status_code == 409 and "closed" in late.json()["reason"]
    assert model.status_code == 404 and listed == []
    assert again == {"status": "reopened", "probe": probe}
    assert client.get(f"/v1/probes/{probe}", headers=admin).json()["answers"] == 1  # the answer is kept
    assert [p["probe"] for p in client.get("/v1/probes", headers=p2).json()["probes"]] == [probe]


def test_a_phone_waiting_for_probes_gets_one_as_soon_as_it_is_posted(coordinator, admin, onnx_model):
    device = _device(coordinator, "p1")
    with serving(create_app(coordinator)) as url, httpx.Client(base_url=url, timeout=30) as http:
        t0 = time.monotonic()
        empty = http.get("/v1/probes", params={"wait": 0.5}, headers=device).json()
        waited = time.monotonic() - t0
        got: dict = {}
        phone = threading.Thread(
            target=lambda: got.update(http.get("/v1/probes", params={"wait": 20}, headers=device).json())
        )
        phone.start()
        time.sleep(0.5)
        t1 = time.monotonic()
        probe = http.post("/v1/probes", content=onnx_model, headers=admin).json()["probe"]
        phone.join(20)
        reached = time.monotonic() - t1

    assert empty == {"probes": []} and waited >= 0.5
    assert [p["probe"] for p in got["probes"]] == [probe]
    assert reached < 5  # woken by the post, not at the end of its 20 s


def test_unknown_and_malformed_probe_ids(client, coordinator, admin):
    device = _device(coordinator, "p1")
    unknown = "0" * 64

    assert client.get(f"/v1/probes/{unknown}", headers=admin).status_code == 404
    assert client.get(f"/v1/probes/{unknown}/model", headers=device).status_code == 404
    r = client.post(f"/v1/probes/{unknown}/answers", json={"correct": 1, "total": 1, "samples": 1}, headers=device)
    assert r.status_code == 404
    assert client.get("/v1/probes/not-a-sha/model", headers=device).status_code == 422


def test_probes_and_answers_survive_a_restart_of_the_server_process(tmp_path, onnx_model):
    (tmp_path / "run.toml").write_text(tomli_w.dumps(run_config(tmp_path)))
    db = tmp_path / "aggregator.sqlite"
    server = AggregatorProcess(tmp_path / "run.toml", db, tmp_path / "aggregator.log")
    store = Store(db)
    enrol_token, admin_token = issue_tokens(store, 1)[0], issue_tokens(store, 1, "admin")[0]
    store.close()
    admin = {"Authorization": f"Bearer {admin_token}"}
    server.start()
    try:
        with httpx.Client(base_url=server.url) as http:
            probe = http.post("/v1/probes", content=onnx_model, headers=admin).json()["probe"]
            token = http.post("/v1/enrol", json={"device_id": "p1"}, headers={"Authorization": f"Bearer {enrol_token}"})
            device = {"Authorization": f"Bearer {token.json()['token']}"}
            answer = {"correct": 7, "total": 9, "samples": 90}
            assert http.post(f"/v1/probes/{probe}/answers", json=answer, headers=device).json()["status"] == "recorded"
        server.kill()  # SIGKILL: nothing flushed on the way out
        server.start()
        with httpx.Client(base_url=server.url) as http:
            result = http.get(f"/v1/probes/{probe}", headers=admin).json()
            model = http.get(f"/v1/probes/{probe}/model", headers=device)
            again = http.post(f"/v1/probes/{probe}/answers", json=answer, headers=device).json()
    finally:
        server.stop()

    assert (result["answers"], result["correct"], result["total"], result["open"]) == (1, 7, 9, True)
    assert model.content == onnx_model
    assert again["status"] == "duplicate"
