from __future__ import annotations

import random

import httpx
import pytest

from android_harness.link import LinkShape, LinkWindow, ShapedTransport
from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.errors import ProtocolError


def echo_server(seen: list):
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path, request.content))
        return httpx.Response(200, json={"status": "wait", "retry_after": 1}, headers={"X-Size": "1"})

    return httpx.MockTransport(handle)


def test_delay_is_rtt_plus_bytes_over_each_direction():
    slept, seen = [], []
    shape = LinkShape(uplink_mbps=8.0, downlink_mbps=80.0, rtt_ms=100.0)
    t = ShapedTransport(shape, echo_server(seen), sleep=slept.append)
    with httpx.Client(transport=t, base_url="http://agg") as c:
        r = c.post("/v1/updates", content=b"x" * 100_000)
    assert r.status_code == 200 and len(seen) == 1
    up, down = slept
    assert up == pytest.approx(0.05 + 100_000 * 8 / 8e6)  # half the RTT + 0.1 s of uplink
    assert down == pytest.approx(0.05 + len(r.content) * 8 / 80e6)
    assert t.bytes_up == 100_000 and t.bytes_down == len(r.content)


def test_lost_requests_are_retried_by_the_client_until_one_gets_through():
    seen, retries = [], []
    # seed 8: this link loses two answers and one request before a request gets through
    t = ShapedTransport(LinkShape(loss=0.6), echo_server(seen), rng=random.Random(8), sleep=lambda s: None)
    client = SyncClient("http://agg", "tok", transport=t, sleep=retries.append, retry=RetryPolicy(attempts=20))
    assert client.task().status == "wait"
    attempts = len(retries) + 1  # the client sleeps once before each retry
    # both losses happened and were retried: a request that never reached the server (fewer
    # seen than sent), and answers lost after the server had seen their request (seen more than once)
    assert attempts > len(seen) > 1


def test_a_link_that_loses_everything_ends_in_a_protocol_error():
    t = ShapedTransport(LinkShape(loss=0.999), echo_server([]), rng=random.Random(0), sleep=lambda s: None)
    client = SyncClient("http://agg", "tok", transport=t, sleep=lambda s: None, retry=RetryPolicy(attempts=3))
    with pytest.raises(ProtocolError, match="no definite answer"):
        client.task()


def test_a_window_adds_delay_and_loss_only_while_it_lasts():
    shape = LinkShape(rtt_ms=10, windows=(LinkWindow(100.0, 110.0, delay_ms=500, loss=0.5),))
    assert shape.at(99.0) == (0.0, 0.0)
    assert shape.at(105.0) == (0.5, 0.5)
    assert shape.at(110.0) == (0.0, 0.0)


def test_duplicate_posts_reach_the_server_twice_gets_do_not():
    seen = []
    t = ShapedTransport(LinkShape(), echo_server(seen), duplicate_posts=True, sleep=lambda s: None)
    with httpx.Client(transport=t, base_url="http://agg") as c:
        c.post("/v1/updates", content=b"abc")
        c.get("/v1/task")
    assert [m for m, _, _ in seen] == ["POST", "POST", "GET"]
