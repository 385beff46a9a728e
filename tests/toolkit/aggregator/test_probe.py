"""The link probe route: in process (FastAPI's TestClient) for its answers and limits, then the
real server on loopback measured by `fedkit profile`'s probe and planned with `fedkit plan`."""

from __future__ import annotations

import pytest
from aggregator_helpers import write_weights
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from android_harness import probe
from toolkit.aggregator.app import create_app
from toolkit.aggregator.probe import MAX_DOWN_BYTES, MAX_UP_BYTES, PROBE_BURST
from toolkit.aggregator.process import AggregatorProcess
from toolkit.cli import app as cli
from toolkit.errors import PlanError
from toolkit.planning import load_plan
from toolkit.profiling import DeviceProfile, measure_local

RUN_TOML = """\
name = "probe"
weights = "weights.bin"

[[stages]]
name = "head"
rounds = 1
lr = 0.01
"""


def _chunks(total: int, size: int = 1 << 16):
    """A body sent chunked, without Content-Length: the size is known only by reading it."""
    while total > 0:
        yield bytes(min(size, total))
        total -= size


@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20, MAX_DOWN_BYTES])
def test_get_answers_exactly_size_bytes_without_a_credential(client, size):
    r = client.get("/probe/echo", params={"size": size})

    assert r.status_code == 200
    assert len(r.content) == size and r.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("body", [b"", b"x" * 1000, bytes(MAX_UP_BYTES)])
def test_post_reads_the_whole_body(client, body):
    r = client.post("/probe/echo", content=body)

    assert r.status_code == 200 and r.json() == {"status": "ok", "bytes": len(body)}


def test_post_reads_a_chunked_body(client):
    r = client.post("/probe/echo", content=_chunks(300_000))

    assert r.status_code == 200 and r.json()["bytes"] == 300_000


def test_oversize_is_refused_with_a_reason(client):
    down = client.get("/probe/echo", params={"size": MAX_DOWN_BYTES + 1})
    negative = client.get("/probe/echo", params={"size": -1})
    up = client.post("/probe/echo", content=bytes(MAX_UP_BYTES + 1))
    chunked = client.post("/probe/echo", content=_chunks(MAX_UP_BYTES + 1))

    assert down.status_code == 422 and "8 MiB or less" in down.json()["reason"]
    assert down.json()["status"] == "rejected"
    assert negative.status_code == 422 and "size" in negative.json()["reason"]
    for r in (up, chunked):
        assert r.status_code == 413
        assert r.json()["status"] == "rejected" and "send 8 MiB or less" in r.json()["reason"]


def test_rate_limit_is_per_client_address(coordinator):
    # Prepare: two clients of one app, at different addresses
    app = create_app(coordinator)
    first = TestClient(app, client=("10.0.0.1", 5000))
    second = TestClient(app, client=("10.0.0.2", 5000))

    # Execute: the first spends its burst and one more
    answers = [first.get("/probe/echo", params={"size": 1}).status_code for _ in range(PROBE_BURST + 1)]
    refused = first.post("/probe/echo", content=b"x")
    other = second.get("/probe/echo", params={"size": 1})

    # Assert
    assert answers == [200] * PROBE_BURST + [429]
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["status"] == "rate_limited" and "10.0.0.1" in refused.json()["reason"]
    assert other.status_code == 200


@pytest.fixture
def server(tmp_path):
    """`fedkit serve` in a child process on loopback, with a one-stage run."""
    write_weights(tmp_path)
    (tmp_path / "run.toml").write_text(RUN_TOML)
    srv = AggregatorProcess(tmp_path / "run.toml", tmp_path / "agg.sqlite", tmp_path / "server.log")
    srv.start()
    yield srv
    srv.stop()


def test_profile_measures_the_link_to_a_real_server_and_plan_uses_it(server, tmp_path):
    # Prepare
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    edge = tmp_path / "edge.json"
    DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=200.0, memory_mb=8000).save(edge)

    # Execute: what `fedkit profile --local --aggregator URL` measures, then `fedkit plan --profiles`
    profile = measure_local(quick=True, aggregator=server.url, name="here")
    profile.save(profiles / "here.json")
    runner = CliRunner()
    planned = runner.invoke(
        cli,
        [
            "plan",
            "--profiles",
            str(profiles),
            "--model",
            "small_cnn",
            "--edge",
            str(edge),
            "--out",
            str(tmp_path / "own.json"),
        ],
    )
    on_3g = runner.invoke(
        cli,
        [
            "plan",
            "--profiles",
            str(profiles),
            "--model",
            "small_cnn",
            "--edge",
            str(edge),
            "--link",
            "3g",
            "--out",
            str(tmp_path / "3g.json"),
        ],
    )

    # Assert: a measured link, and the plan's transfers follow it unless --link replaces it
    link = profile.link
    assert link is not None and link.rtt_ms > 0 and link.uplink_mbps > 0 and link.downlink_mbps > 0
    assert planned.exit_code == 0 and on_3g.exit_code == 0, planned.output + on_3g.output
    [own] = load_plan(tmp_path / "own.json").phones
    [slow] = load_plan(tmp_path / "3g.json").phones
    assert own.plan.predicted["download"] < slow.plan.predicted["download"]
    assert own.plan.predicted["download"] >= link.rtt_ms / 2000  # half the measured RTT at least


def test_probe_says_when_the_server_refuses_it(server):
    # the real server's bucket holds PROBE_BURST requests; one probe run takes 9
    probe.network(server.url)

    with pytest.raises(RuntimeError, match=r"refused the probe.*too many probe requests.*HTTP 429.*wait \d+ s"):
        probe.network(server.url)
    with pytest.raises(PlanError, match=r"profiling this host failed: .*HTTP 429"):
        measure_local(quick=True, aggregator=server.url)
