"""The HTTP mapping, in process (FastAPI's TestClient); test_recovery runs the real server."""

import pytest
from aggregator_helpers import delta, make_coordinator, payload
from fastapi.testclient import TestClient

from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.app import create_app


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def enrolled(client, coordinator, device_id="a"):
    (token,) = issue_tokens(coordinator.store, 1)
    r = client.post("/v1/enrol", json={"device_id": device_id}, headers=bearer(token))
    assert r.status_code == 200, r.text
    return bearer(r.json()["token"])


ROUTES = [
    ("GET", "/v1/task", {}),
    ("GET", "/v1/weights/0", {}),
    ("POST", "/v1/updates", {"content": b"x", "headers": {"Idempotency-Key": "k"}}),
    ("POST", "/v1/evaluations", {"json": {"version": 0, "accuracy": 0.5}}),
    ("GET", "/v1/status", {}),
    ("POST", "/v1/enrol", {"json": {"device_id": "z"}}),
]


@pytest.mark.parametrize("method, path, kwargs", ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc", "Bearer "])
def test_every_route_but_health_needs_a_valid_bearer_token(client, coordinator, method, path, kwargs, auth):
    headers = dict(kwargs.get("headers", {}))
    if auth:
        headers["Authorization"] = auth
    r = client.request(method, path, **{**kwargs, "headers": headers})
    assert r.status_code == 401
    assert r.json()["status"] == "unauthorized" and r.json()["reason"]
    assert coordinator.store.updates() == [] and coordinator.store.count_devices() == 0


def test_health_is_open_and_the_openapi_docs_are_on(client):
    assert client.get("/v1/health").json()["status"] == "ok"
    spec = client.get("/openapi.json").json()
    assert {"/v1/task", "/v1/updates", "/v1/weights/{version}", "/v1/enrol"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_the_whole_exchange_over_http(client, coordinator):
    a, b = enrolled(client, coordinator, "a"), enrolled(client, coordinator, "b")
    task = client.get("/v1/task", headers=a).json()
    assert task["status"] == "task" and task["round"] == 1
    w = client.get("/v1/weights/0", headers=a)
    assert w.status_code == 200 and w.headers["content-type"] == "application/octet-stream"
    again = client.get("/v1/weights/0", headers={**a, "If-None-Match": w.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/v1/weights/7", headers=a).status_code == 404
    body = payload("a", 1, 0, delta(1.0))
    push = dict(content=body, headers={**a, "Idempotency-Key": "a-1", "X-Fedkit-Accuracy": "0.8"})
    r = client.post("/v1/updates", **push)
    assert (r.status_code, r.json()["status"]) == (200, "accepted")
    r = client.post("/v1/updates", **push)
    assert (r.status_code, r.json()["status"]) == (200, "duplicate")
    client.get("/v1/task", headers=b)
    client.post("/v1/updates", content=payload("b", 1, 0, delta(1.0)), headers={**b, "Idempotency-Key": "b-1"})
    assert client.get("/v1/task", headers=a).json()["base_version"] == 1


def test_status_and_evaluations_need_an_admin_token(client, coordinator):
    device = enrolled(client, coordinator)
    (admin_token,) = issue_tokens(coordinator.store, 1, "admin")
    admin = bearer(admin_token)
    assert client.get("/v1/status", headers=device).status_code == 403
    assert client.get("/v1/task", headers=admin).status_code == 403
    status = client.get("/v1/status", headers=admin).json()
    assert (status["round"], status["stage"], status["devices"]) == (1, "head", 1)
    assert client.post("/v1/evaluations", json={"version": 0, "accuracy": 0.4}, headers=admin).json() == {
        "status": "recorded"
    }
    assert client.post("/v1/evaluations", json={"version": 9, "accuracy": 0.4}, headers=admin).status_code == 404
    bad = client.post("/v1/evaluations", json={"version": 0, "accuracy": 4}, headers=admin)
    assert bad.status_code == 422 and bad.json()["status"] == "rejected" and "accuracy" in bad.json()["reason"]


def test_enrolment_tokens_are_one_time_and_ids_unique(client, coordinator):
    (token,) = issue_tokens(coordinator.store, 1)
    first = client.post("/v1/enrol", json={"device_id": "a"}, headers=bearer(token))
    retry = client.post("/v1/enrol", json={"device_id": "a"}, headers=bearer(token))
    assert first.status_code == retry.status_code == 200
    assert client.get("/v1/task", headers=bearer(first.json()["token"])).status_code == 401  # revoked by the retry
    assert client.get("/v1/task", headers=bearer(retry.json()["token"])).status_code == 200
    assert client.post("/v1/enrol", json={"device_id": "b"}, headers=bearer(token)).status_code == 401
    (other,) = issue_tokens(coordinator.store, 1)
    assert client.post("/v1/enrol", json={"device_id": "a"}, headers=bearer(other)).status_code == 409
    assert client.post("/v1/enrol", json={"device_id": "bad id/"}, headers=bearer(other)).status_code == 422


def test_oversized_pushes_get_413_before_anything_is_decoded(tmp_path, clock):
    co = make_coordinator(tmp_path, clock, limits={"max_update_bytes": 2048})
    client = TestClient(create_app(co))
    a = enrolled(client, co)
    client.get("/v1/task", headers=a)
    r = client.post("/v1/updates", content=b"\0" * 4096, headers={**a, "Idempotency-Key": "k"})
    assert r.status_code == 413 and r.json()["status"] == "rejected"

    def chunks():  # no Content-Length: the streamed body is cut off at the limit
        for _ in range(4):
            yield b"\0" * 1024

    r = client.post("/v1/updates", content=chunks(), headers={**a, "Idempotency-Key": "k"})
    assert r.status_code == 413
    assert co.store.updates() == []


def test_a_device_over_its_rate_gets_429_with_retry_after(tmp_path, clock):
    co = make_coordinator(tmp_path, clock, limits={"requests_per_s": 0.5, "burst": 3})
    client = TestClient(create_app(co))
    a = enrolled(client, co)
    codes = [client.get("/v1/task", headers=a).status_code for _ in range(5)]
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    r = client.get("/v1/task", headers=a)
    assert int(r.headers["Retry-After"]) >= 1 and r.json()["status"] == "rate_limited"


EXITS = {"7": {"accuracy": 0.5, "loss": 1.25}, "19": {"accuracy": 0.75, "loss": 0.5}}


def admin_headers(coordinator):
    (token,) = issue_tokens(coordinator.store, 1, "admin")
    return bearer(token)


def test_an_exit_models_evaluation_is_recorded_per_exit_and_its_best_shown(client, coordinator):
    admin = admin_headers(coordinator)
    body = {"version": 0, "accuracy": 0.75, "exits": EXITS, "loss": 1.75}
    assert client.post("/v1/evaluations", json=body, headers=admin).json() == {"status": "recorded"}
    (evaluation,) = coordinator.store.exit_evaluations()
    assert [(e.position, e.accuracy, e.loss) for e in evaluation.exits] == [(7, 0.5, 1.25), (19, 0.75, 0.5)]
    assert (evaluation.accuracy, evaluation.loss) == (0.75, 1.75)
    best = client.get("/v1/status", headers=admin).json()["best"]
    assert best == {
        "version": 0,
        "round": None,
        "mean_accuracy": 0.625,
        "loss": 1.75,
        "exits": [{"position": 7, "accuracy": 0.5, "loss": 1.25}, {"position": 19, "accuracy": 0.75, "loss": 0.5}],
        "evaluated": 1,
    }
    unknown = client.post("/v1/evaluations", json={**body, "version": 9}, headers=admin)
    assert unknown.status_code == 404 and "version 9 does not exist" in unknown.json()["reason"]


def test_the_status_has_no_best_without_figures_per_exit(client, coordinator):
    admin = admin_headers(coordinator)
    client.post("/v1/evaluations", json={"version": 0, "accuracy": 0.5}, headers=admin)
    assert client.get("/v1/status", headers=admin).json()["best"] is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"accuracy": True}, "accuracy"),  # a bool is no number
        ({"accuracy": "0.5"}, "accuracy"),  # nor is a string
        ({"version": "0"}, "version"),
        ({"loss": -1.0}, "loss"),
        ({"loss": "1"}, "loss"),
        ({"exits": {"x": {"accuracy": 0.5, "loss": 1.0}}}, "exits"),  # positions are integers
        ({"exits": {"7.0": {"accuracy": 0.5, "loss": 1.0}}}, "exits"),
        ({"exits": {" 7": {"accuracy": 0.5, "loss": 1.0}}}, "exits"),
        ({"exits": {"0": {"accuracy": 0.5, "loss": 1.0}}}, "exits"),  # position 0 is the input: no exit
        ({"exits": {"7": {"accuracy": 1.5, "loss": 1.0}}}, "accuracy"),
        ({"exits": {"7": {"accuracy": False, "loss": 1.0}}}, "accuracy"),
        ({"exits": {"7": {"accuracy": 0.5, "loss": "1"}}}, "loss"),
        ({"exits": {"7": {"accuracy": 0.5}}}, "loss"),
        ({"exits": {"7": {"accuracy": 0.5, "loss": 1.0, "extra": 1}}}, "extra"),
        ({"exits": {}}, "exits"),
        ({"exits": None}, "together"),  # a total loss without its exits
        ({"loss": None}, "together"),  # exits without their total
    ],
)
def test_an_invalid_exit_evaluation_is_422_and_stores_nothing(client, coordinator, change, field):
    body = {"version": 0, "accuracy": 0.75, "exits": EXITS, "loss": 1.75, **change}
    body = {k: v for k, v in body.items() if v is not None}
    r = client.post("/v1/evaluations", json=body, headers=admin_headers(coordinator))
    assert r.status_code == 422 and r.json()["status"] == "rejected" and field in r.json()["reason"], r.text
    assert coordinator.store.evaluation(0) is None


@pytest.mark.parametrize("loss", ["NaN", "Infinity", "-Infinity"])
def test_a_loss_that_is_not_finite_is_422(client, coordinator, loss):
    # json.dumps writes NaN and Infinity as these bare words, which Python's JSON parser reads back
    headers = {**admin_headers(coordinator), "Content-Type": "application/json"}
    for exit_loss, total in ((loss, "1.0"), ("1.0", loss)):
        exits = f'{{"7": {{"accuracy": 0.5, "loss": {exit_loss}}}}}'
        content = f'{{"version": 0, "accuracy": 0.5, "exits": {exits}, "loss": {total}}}'
        r = client.post("/v1/evaluations", content=content, headers=headers)
        assert r.status_code == 422 and "loss" in r.json()["reason"], r.text
    assert coordinator.store.evaluation(0) is None
