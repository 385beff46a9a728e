"""The edge over HTTP on the real server (uvicorn on loopback, in a thread of this process):
three phones with three cuts train small_cnn on Fashion-MNIST above chance; a phone vanishing
mid-batch and an overloaded edge leave it serving, and nothing trains twice; the routes take
the aggregator's credentials."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from splitfed_helpers import THREE_CUTS, activation_message, enrol, make_run, one_step_from, serving, shard, small_cnn

from device_runtime.bundle import Bundle
from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import decode
from device_runtime.local_round import Task
from device_runtime.split_trainer import SplitTrainer, edge_exchange
from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.app import create_app
from toolkit.data import transform
from toolkit.splitfed.edge import EdgeConfig

PATIENT = RetryPolicy(attempts=20, base_s=0.05, cap_s=2.0)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def run_phone(url: str, token: str, device_id: str, bundle: Bundle, shard_path) -> list[float]:
    """A phone's SplitFed loop until the run is done; its training loss per round."""
    losses = []
    with SyncClient(url, token, retry=PATIENT) as client:
        trainer = SplitTrainer(
            bundle, shard_path, edge_exchange(client), workdir=shard_path.parent / device_id, device_id=device_id
        )
        while (assignment := client.task()).status != "done":
            if assignment.status == "wait":
                time.sleep(0.02)
                continue
            task = Task(**assignment.task_fields(bundle.manifest.plan))
            blob, _ = client.weights(task.base_version)
            result = trainer.run_round(task, decode(blob).tensors)
            encoded = trainer.encode_update(task, result)
            assert client.push(encoded.payload, encoded.idempotency_key).counted
            losses.append(result.train_loss)
    return losses


def accuracy(tensors: dict[str, np.ndarray], test, n: int = 2000) -> float:
    model = small_cnn()
    model.root.load_state_dict(
        {**model.root.state_dict(), **{k: torch.from_numpy(v.copy()) for k, v in tensors.items()}}
    )
    with torch.no_grad():
        logits = model.forward(torch.from_numpy(transform(test.images[:n])))
    return float((logits.argmax(1).numpy() == test.labels[:n]).mean())


def test_three_phones_with_three_cuts_converge_above_chance(
    tmp_path, model, small_cnn_bundle, fashion_train, fashion_test
):
    # Prepare: cuts after features.0, features.2 and pool, all blocks before the cut training;
    # 600 real images each; 4 rounds of 2 epochs
    coordinator, edge = make_run(tmp_path, model, min_reports=3, rounds=4, lr=0.1, local_epochs=2)
    phones = [
        (f"p{cut}", enrol(coordinator, f"p{cut}"), Bundle.load(small_cnn_bundle(cut, tb))) for cut, tb in THREE_CUTS
    ]
    (admin,) = issue_tokens(coordinator.store, 1, "admin")
    before = accuracy(decode(coordinator.weights(0)[0]).tensors, fashion_test)

    # Execute: the phones in threads, concurrently, against the server
    with serving(create_app(coordinator, edge=edge)) as url, ThreadPoolExecutor(3) as pool:
        runs = [
            pool.submit(run_phone, url, token, device_id, bundle, shard(tmp_path, fashion_train, 600 * i, 600))
            for i, (device_id, token, bundle) in enumerate(phones)
        ]
        losses = [r.result(timeout=120) for r in runs]
        status = httpx.get(f"{url}/v1/splitfed/status", headers=bearer(admin)).json()
    edge.close()

    # Assert: four rounds aggregated, losses fell, the global model is well above chance (0.1)
    latest = coordinator.store.latest_version().version
    assert latest == 4 and all(len(run) == 4 for run in losses)
    assert all(run[-1] < run[0] for run in losses), losses
    after = accuracy(decode(coordinator.weights(latest)[0]).tensors, fashion_test)
    assert after > 0.45 and after > before + 0.3, (before, after)
    traffic = {p["device_id"]: p for p in status["phones"]}
    assert {d: t["cut"] for d, t in traffic.items()} == {"p1": 1, "p3": 3, "p4": 4}
    for t in traffic.values():
        assert t["batches"] == 4 * 2 * 19 and t["samples"] == 4 * 2 * 600  # 600 images in batches of 32
        assert t["activation_bytes"] > 0 and t["gradient_bytes"] > 0


@pytest.fixture
def gated(tmp_path, model):
    """A run whose edge has one worker, a queue of one, and a pool the test can hold up: a job
    waiting on ``gate`` occupies the only thread until the gate opens."""
    pool = ThreadPoolExecutor(1)
    gate = threading.Event()
    pool.submit(gate.wait)
    coordinator, edge = make_run(tmp_path, model, edge_config=EdgeConfig(workers=1, queue=1), executor=pool)
    yield coordinator, edge, gate
    gate.set()
    edge.close()


def test_the_edge_survives_a_phone_vanishing_mid_batch_and_trains_it_once(gated, model):
    # Prepare
    coordinator, edge, gate = gated
    token = enrol(coordinator, "a")
    coordinator.task_for("a")
    v0 = decode(coordinator.weights(0)[0]).tensors
    message = activation_message(model, "a", 1, 0, cut=3)

    with serving(create_app(coordinator, edge=edge)) as url:
        # Execute: the whole request goes out, the edge takes it, the phone is gone
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(
                f"PUT /v1/splitfed/batches/0 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/octet-stream\r\nContent-Length: {len(message)}\r\n\r\n".encode()
                + message
            )
            wait_for(lambda: edge.status().in_flight == 1, "the edge to take the batch")
        gate.set()
        wait_for(lambda: edge.status().in_flight == 0, "the batch to finish")
        # ... and comes back with the same batch
        with SyncClient(url, token, retry=PATIENT) as client:
            first = edge_exchange(client)(0, message)
            second = edge_exchange(client)(0, message)
        health = httpx.get(f"{url}/v1/health")

    # Assert: still serving; the retries got the cached answer; the copy took exactly one step
    assert health.status_code == 200 and first == second and decode(first).header.kind == "gradient"
    (traffic,) = edge.status().phones
    assert (traffic.batches, traffic.retries) == (1, 2)
    once = one_step_from(model, v0, 3, message, lr=0.05)
    for name, d in edge.delta("a", 1, set()).items():
        np.testing.assert_allclose(v0[name] + d, once[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_an_overloaded_edge_answers_503_with_retry_after_and_the_phone_gets_through(gated, model):
    # Prepare: three phones; the edge can hold two batches (one worker, held up, and a queue of one)
    coordinator, edge, gate = gated
    tokens = {d: enrol(coordinator, d) for d in ("a", "b", "c")}
    for d in tokens:
        coordinator.task_for(d)

    with serving(create_app(coordinator, edge=edge)) as url:

        def put(d: str) -> httpx.Response:
            body = activation_message(model, d, 1, 0, cut=3)
            return httpx.put(f"{url}/v1/splitfed/batches/0", content=body, headers=bearer(tokens[d]), timeout=60)

        with ThreadPoolExecutor(3) as pool:
            # Execute: two batches fill the edge, the third is turned away at once
            held = [pool.submit(put, d) for d in ("a", "b")]
            wait_for(lambda: edge.status().in_flight == 2, "two batches in the edge")
            refused = put("c")
            # ... and a phone that keeps trying gets through once the edge drains
            with SyncClient(url, tokens["c"], retry=PATIENT) as client:
                patient = pool.submit(edge_exchange(client), 0, activation_message(model, "c", 1, 0, cut=3))
                wait_for(lambda: edge.status().busy_answers >= 2, "the patient phone to be turned away")
                gate.set()
                answers = [h.result(timeout=30) for h in held]
                reply = patient.result(timeout=30)

    # Assert
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["status"] == "busy" and "capacity" in refused.json()["reason"]
    assert [a.status_code for a in answers] == [200, 200]
    assert decode(reply).header.kind == "gradient"
    status = edge.status()
    assert status.in_flight == 0 and sorted(p.batches for p in status.phones) == [1, 1, 1]


def test_the_routes_take_the_aggregators_credentials(tmp_path, model):
    coordinator, edge = make_run(tmp_path, model)
    token = enrol(coordinator, "a")
    coordinator.task_for("a")
    (admin,) = issue_tokens(coordinator.store, 1, "admin")
    body = activation_message(model, "a", 1, 0, cut=3)

    with serving(create_app(coordinator, edge=edge)) as url:
        anonymous = httpx.put(f"{url}/v1/splitfed/batches/0", content=body)
        as_admin = httpx.put(f"{url}/v1/splitfed/batches/0", content=body, headers=bearer(admin))
        negative = httpx.put(f"{url}/v1/splitfed/batches/-1", content=body, headers=bearer(token))
        as_phone = httpx.put(f"{url}/v1/splitfed/batches/0", content=body, headers=bearer(token))
        status_as_phone = httpx.get(f"{url}/v1/splitfed/status", headers=bearer(token))
        status = httpx.get(f"{url}/v1/splitfed/status", headers=bearer(admin))
    edge.close()

    assert (anonymous.status_code, as_admin.status_code, negative.status_code) == (401, 403, 422)
    assert as_phone.status_code == 200 and as_phone.headers["X-Fedkit-Batch"] == "trained"
    assert status_as_phone.status_code == 403
    (phone,) = status.json()["phones"]
    assert phone["activation_bytes"] == len(body) and phone["gradient_bytes"] == len(as_phone.content)


def test_an_aggregator_without_an_edge_has_no_splitfed_routes(tmp_path, model):
    coordinator, edge = make_run(tmp_path, model)
    edge.close()
    from fastapi.testclient import TestClient

    paths = TestClient(create_app(coordinator)).get("/openapi.json").json()["paths"]
    assert not [p for p in paths if "splitfed" in p]
