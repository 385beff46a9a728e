"""End to end on loopback: the real server in a subprocess, phones pushing with
device_runtime.client from threads and processes, the server killed with SIGKILL mid-round
and restarted on the same database."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from aggregator_helpers import delta, initial_weights, payload, run_config
from serving import self_signed_certificate

from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import decode
from device_runtime.errors import ProtocolError
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.store import Store
from toolkit.errors import ConfigError

PATIENT = RetryPolicy(attempts=40, base_s=0.1, cap_s=1.0)


def write_toml(path: Path, data: dict) -> None:
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, (dict, list))]
    for k, v in data.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{kk} = {json.dumps(vv)}" for kk, vv in v.items()]
    for stage in data["stages"]:
        lines += ["[[stages]]"] + [f"{kk} = {json.dumps(vv)}" for kk, vv in stage.items()]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def server(tmp_path):
    made = []

    def make(extra_args=(), **config) -> AggregatorProcess:
        write_toml(tmp_path / "run.toml", run_config(tmp_path, **config))
        made.append(
            AggregatorProcess(
                tmp_path / "run.toml", tmp_path / "agg.sqlite", tmp_path / "server.log", extra_args=extra_args
            )
        )
        return made[-1]

    yield make
    for s in made:
        s.stop()


def raw_push(url: str, credential: str, body: bytes, key: str, send: int | None = None) -> socket.socket:
    """Sends a push on a bare socket and never reads the answer: a phone that dies (or loses its
    link) right after sending. ``send`` bytes of the body only: the push is still in flight."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    head = (
        f"POST /v1/updates HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {credential}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[: len(body) if send is None else send])
    return sock


def round_status(url: str, admin_token: str, round_: int) -> tuple[bool, list[str]]:
    """(open, devices with an accepted update) of a round, from the server's GET /v1/status."""
    r = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {admin_token}"}, timeout=5)
    r.raise_for_status()
    status = r.json()
    (row,) = [x for x in status["rounds"] if x["round"] == round_]
    accepted = sorted(p["device_id"] for p in status["phones"] if round_ in p["rounds"])
    assert row["reports"] == len(accepted)
    return row["open"], accepted


def test_sigkill_mid_round_loses_no_accepted_update(server, tmp_path):
    # Prepare: 8 phones, the round wants all 8; fp32 updates so the aggregate is exact
    n = 8
    srv = server(fedavg={"min_reports": n, "deadline_s": 600}, stages=[{"name": "head", "rounds": 2, "lr": 0.1}])
    tokens = srv.issue_tokens(n)
    (admin,) = srv.issue_tokens(1, role="admin")
    srv.start()
    phones = []
    for i, token in enumerate(tokens):
        c = SyncClient(srv.url, retry=PATIENT, timeout_s=5)
        c.enrol(token, f"phone-{i}")
        task = c.task()
        assert task.status == "task" and task.round == 1
        body = payload(f"phone-{i}", task.round, task.base_version, delta(0.1 * (i + 1)), num_samples=10 + i)
        phones.append((c, body, f"phone-{i}-r1"))
    answers: dict[int, list[str]] = {i: [] for i in range(n)}

    def push(i):
        c, body, key = phones[i]
        answers[i].append(c.push(body, key).status)

    # Execute, in a fixed order so that the kill is mid-round whatever the timing:
    # phones 0-3 push and see "accepted"
    for i in range(4):
        push(i)
    assert [answers[i] for i in range(4)] == [["accepted"]] * 4
    # phone 4's push reaches the server, which accepts it, but the phone never reads the answer
    lost = raw_push(srv.url, phones[4][0].token, phones[4][1], phones[4][2])
    deadline = time.monotonic() + 30
    while round_status(srv.url, admin, 1)[1] != [f"phone-{i}" for i in range(5)] and time.monotonic() < deadline:
        time.sleep(0.1)
    # phone 5's push is half sent when the server dies
    half = raw_push(srv.url, phones[5][0].token, phones[5][1], phones[5][2], send=len(phones[5][1]) // 2)
    # the server says: round 1 open, 5 of 8 accepted (phones 0-4): the kill is mid-round
    assert round_status(srv.url, admin, 1) == (True, [f"phone-{i}" for i in range(5)])
    srv.kill()
    lost.close()
    half.close()
    srv.start()

    # Assert: nothing accepted before the kill is lost, and the half-sent push was not taken
    assert round_status(srv.url, admin, 1) == (True, [f"phone-{i}" for i in range(5)])
    # the phones retry or push after the restart: phone 4 resends the same bytes and key
    for i in range(4, n):
        push(i)
    assert [answers[i] for i in range(4, n)] == [["duplicate"], ["accepted"], ["accepted"], ["accepted"]]
    # a phone that lost any answer pushes again: every one is counted exactly once
    for i in range(n):
        push(i)
    assert all(a[-1] == "duplicate" for a in answers.values()), answers
    # the round closed with all 8 updates, and the aggregate is their exact weighted mean
    assert round_status(srv.url, admin, 1) == (False, [f"phone-{i}" for i in range(n)])
    store = Store(srv.db)
    assert sorted(u.device_id for u in store.updates(version=1)) == [f"phone-{i}" for i in range(n)]
    samples = np.array([10 + i for i in range(n)], float)
    expected_step = float((samples * 0.1 * np.arange(1, n + 1)).sum() / samples.sum())
    new = decode(store.version_blob(1)).tensors
    for name, base in initial_weights().items():
        np.testing.assert_allclose(new[name], base + expected_step, rtol=1e-5)
    assert store.current_round().round == 2
    for c, _, _ in phones:
        assert c.task().base_version == 1
        c.close()


PHONE = """
import json, sys
from pathlib import Path
from device_runtime.client import RetryPolicy, SyncClient
url, token, body, key = sys.argv[1], sys.argv[2], Path(sys.argv[3]).read_bytes(), sys.argv[4]
with SyncClient(url, token, retry=RetryPolicy(attempts=40, base_s=0.1, cap_s=1.0)) as c:
    print(json.dumps({"status": c.push(body, key).status}))
"""


def test_a_phone_process_resumes_a_push_without_double_counting(server, tmp_path):
    srv = server(fedavg={"min_reports": 2}, stages=[{"name": "head", "rounds": 1, "lr": 0.1}])
    tokens = srv.issue_tokens(2)
    srv.start()
    with SyncClient(srv.url, retry=PATIENT) as c:
        credential = c.enrol(tokens[0], "phone-a")
        task = c.task()
        weights, etag = c.weights(task.base_version)
        assert decode(weights).header.kind == "weights"
        assert c.weights(task.base_version, etag) == (None, etag)  # not sent again
    # the trainer's checkpoint: the encoded update and its key, on disk
    checkpoint = tmp_path / "update.bin"
    checkpoint.write_bytes(payload("phone-a", task.round, task.base_version, delta(0.5)))
    run = [sys.executable, "-c", PHONE, srv.url, credential, str(checkpoint), "phone-a-r1"]
    first = json.loads(subprocess.run(run, capture_output=True, check=True, text=True).stdout)
    again = json.loads(subprocess.run(run, capture_output=True, check=True, text=True).stdout)
    assert (first["status"], again["status"]) == ("accepted", "duplicate")
    store = Store(srv.db)
    assert [u.device_id for u in store.updates(round_=1)] == ["phone-a"]


def test_the_server_logs_one_json_line_per_event(server, tmp_path):
    srv = server(stages=[{"name": "head", "rounds": 1, "lr": 0.1}])
    (token,) = srv.issue_tokens(1)
    srv.start()
    with SyncClient(srv.url, retry=PATIENT) as c:
        c.enrol(token, "phone-a")
        task = c.task()
        assert c.push(payload("phone-a", 1, 0, delta(0.1)), "k").status == "accepted"
        assert c.task().status == "done"
    srv.stop()
    events = [json.loads(line) for line in (tmp_path / "server.log").read_text().splitlines()]
    names = [e["event"] for e in events]
    for expected in ("serve", "round_opened", "enrol", "assign", "push", "round_closed", "run_done"):
        assert expected in names, names
    push = next(e for e in events if e["event"] == "push")
    assert (push["device"], push["status"], push["round"]) == ("phone-a", "accepted", task.round)
    # the server bound port 0 and said which port it got: the one the phone reached
    serve = next(e for e in events if e["event"] == "serve")
    assert serve["port"] == srv.port > 0 and srv.url.endswith(f":{srv.port}")


def test_tls_with_a_certificate_and_key(server, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    srv = server(
        extra_args=("--certfile", str(cert), "--keyfile", str(key)), stages=[{"name": "head", "rounds": 1, "lr": 0.1}]
    )
    (token,) = srv.issue_tokens(1)
    srv.start()
    with SyncClient(srv.url.replace("http://", "https://"), retry=PATIENT, verify=str(cert)) as c:
        c.enrol(token, "phone-a")
        assert c.task().status == "task"
    # plain HTTP gets no answer
    with SyncClient(srv.url, retry=RetryPolicy(attempts=1)) as plain, pytest.raises(ProtocolError):
        plain.enrol(token, "phone-a")


def test_a_port_another_server_holds_is_refused_in_one_line(tmp_path):
    write_toml(tmp_path / "run.toml", run_config(tmp_path, stages=[{"name": "head", "rounds": 1, "lr": 0.1}]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = AggregatorProcess(tmp_path / "run.toml", tmp_path / "agg.sqlite", tmp_path / "server.log", port=port)
        with pytest.raises(ConfigError, match="exited with code 1 at start"):
            srv.start()
    assert f"error: cannot listen on 127.0.0.1:{port}" in (tmp_path / "server.log").read_text()
    assert not (tmp_path / "agg.sqlite").exists()  # refused before the run's database was made
