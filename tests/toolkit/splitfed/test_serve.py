"""``fedkit serve`` of a SplitFed run: a ``[splitfed]`` section builds the edge and mounts its
routes; batches count in their own per-device bucket, not in the aggregator's request limit."""

from __future__ import annotations

from fastapi.testclient import TestClient
from splitfed_helpers import activation_message

from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.app import create_app
from toolkit.aggregator.server import open_coordinator, open_edge
from toolkit.splitfed import initial_weights

RUN = """
name = "split"
weights = "weights.bin"
model = "small_cnn"

[limits]
requests_per_s = 0.01   # two requests, then 429 for a long while
burst = 2

[splitfed]
workers = 1
queue = 2

[[stages]]
name = "all"
rounds = 1
lr = 0.05
"""


def start(tmp_path, model, text: str = RUN):
    (tmp_path / "weights.bin").write_bytes(initial_weights(model, 0))
    (tmp_path / "run.toml").write_text(text)
    coordinator = open_coordinator(tmp_path / "run.toml")
    return coordinator, open_edge(coordinator)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_a_splitfed_section_serves_the_edge_with_its_capacity(tmp_path, model):
    coordinator, edge = start(tmp_path, model)
    (admin,) = issue_tokens(coordinator.store, 1, "admin")
    try:
        status = TestClient(create_app(coordinator, edge=edge)).get("/v1/splitfed/status", headers=bearer(admin))
    finally:
        edge.close()
    assert status.status_code == 200
    assert status.json()["model"] == "small_cnn" and status.json()["workers"] == 1 and status.json()["capacity"] == 3


def test_a_run_without_the_section_has_no_edge(tmp_path, model):
    _, edge = start(tmp_path, model, RUN[: RUN.index("[splitfed]")] + RUN[RUN.index("[[stages]]") :])
    assert edge is None


def test_batches_are_not_throttled_by_the_request_limit(tmp_path, model):
    coordinator, edge = start(tmp_path, model)
    (enrol_token,) = issue_tokens(coordinator.store, 1)
    token = coordinator.enrol(enrol_token, "a").credential
    try:
        with TestClient(create_app(coordinator, edge=edge)) as client:
            task = client.get("/v1/task", headers=bearer(token)).json()  # the bucket's first request
            batches = [
                client.put(
                    f"/v1/splitfed/batches/{i}",
                    content=activation_message(model, "a", task["round"], task["base_version"], 3, seed=i),
                    headers=bearer(token),
                ).status_code
                for i in range(6)
            ]
            pulls = [client.get("/v1/task", headers=bearer(token)).status_code for _ in range(2)]
    finally:
        edge.close()
    assert batches == [200] * 6  # three times the request burst
    assert pulls == [200, 429]  # the request bucket was untouched by them: one token left
