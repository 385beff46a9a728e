"""End to end on loopback: the real server in a subprocess, phones pushing with
device_runtime.client from threads and processes, the server killed with SIGKILL mid-round
and restarted on the same database."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from aggregator_helpers import delta, initial_weights, payload, run_config

from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import decode
from device_runtime.errors import ProtocolError
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.store import Store

PATIENT = RetryPolicy(attempts=40, base_s=0.1, cap_s=1.0)


def write_toml(path: Path, data: dict) -> None:
    lines = [f'{k} = {json.dumps(v)}' for k, v in data.items() if not isinstance(v, (dict, list))]
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
        made.append(AggregatorProcess(tmp_path / "run.toml", tmp_path / "agg.sqlite", tmp_path / "server.log", extra_args=extra_args))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def test_sigkill_mid_round_loses_no_accepted_update(server, tmp_path):
    # Prepare: 8 phones, the round wants all 8; fp32 updates so the aggregate is exact
    n = 8
    srv = server(fedavg={"min_reports": n, "deadline_s": 600}, stages=[{"name": "head", "rounds": 2, "lr": 0.1}])
    tokens = srv.issue_tokens(n)
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

    # Execute: half push, then the rest push while the server is killed and restarted
    for i in range(n // 2):
        push(i)
    threads = [threading.Thread(target=push, args=(i,)) for i in range(n // 2, n)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    srv.kill()
    srv.start()
    for t in threads:
        t.join(120)
    # a phone killed before it saw its answer pushes the same bytes and key again
    for i in range(n):
        push(i)

    # Assert: every phone counted exactly once, the first answer definite, the repeat a duplicate
    assert all(a[0] in ("accepted", "duplicate") and a[-1] == "duplicate" for a in answers.values()), answers
    deadline = time.monotonic() + 30
    store = Store(srv.db)
    while store.latest_version().version < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    aggregated = store.updates(version=1)
    assert sorted(u.device_id for u in aggregated) == [f"phone-{i}" for i in range(n)]
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


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_a_certificate_and_key(server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    srv = server(extra_args=("--certfile", str(cert), "--keyfile", str(key)), stages=[{"name": "head", "rounds": 1, "lr": 0.1}])
    (token,) = srv.issue_tokens(1)
    srv.start()
    with SyncClient(srv.url.replace("http://", "https://"), retry=PATIENT, verify=str(cert)) as c:
        c.enrol(token, "phone-a")
        assert c.task().status == "task"
    with SyncClient(srv.url, retry=RetryPolicy(attempts=1)) as plain:  # plain HTTP gets no answer
        with pytest.raises(ProtocolError):
            plain.enrol(token, "phone-a")
