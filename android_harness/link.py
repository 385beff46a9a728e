"""In-process link shaping: an httpx transport that makes a loopback connection behave like a
phone's link.

Each request waits half the RTT plus its body's bytes over the uplink before it is sent, and
each response half the RTT plus its body's bytes over the downlink after it arrives. With
probability ``loss`` a request is lost: half the time before it reaches the aggregator (a
connect error), half the time after, its answer lost on the way back (a read timeout), so the
client's retries and the aggregator's idempotency both get exercised. ``windows`` add extra
delay or loss for a while (a fault on demand). ``duplicate_posts`` sends every POST twice and
returns the second answer (a duplicated push).

Bandwidth is modelled per request (no congestion between phones); headers are not counted.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import httpx


@dataclass(frozen=True)
class LinkWindow:
    """From ``start`` to ``end`` (unix seconds) the link adds ``delay_ms`` and drops ``loss``."""

    start: float
    end: float
    delay_ms: float = 0.0
    loss: float = 0.0


@dataclass(frozen=True)
class LinkShape:
    uplink_mbps: float = 1e6
    downlink_mbps: float = 1e6
    rtt_ms: float = 0.0
    loss: float = 0.0  # probability that a request or its answer is lost
    windows: tuple[LinkWindow, ...] = field(default_factory=tuple)

    def at(self, now: float) -> tuple[float, float]:
        """(extra delay in s, loss probability) at time ``now``."""
        delay, loss = 0.0, self.loss
        for w in self.windows:
            if w.start <= now < w.end:
                delay += w.delay_ms / 1000
                loss = 1 - (1 - loss) * (1 - w.loss)
        return delay, loss


class ShapedTransport(httpx.BaseTransport):
    def __init__(
        self,
        shape: LinkShape,
        inner: httpx.BaseTransport | None = None,
        *,
        duplicate_posts: bool = False,
        rng: random.Random | None = None,
        sleep=time.sleep,
        clock=time.time,
    ):
        self.shape = shape
        self.inner = inner or httpx.HTTPTransport()
        self.duplicate_posts = duplicate_posts
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.clock = clock
        self.bytes_up = 0
        self.bytes_down = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        extra, loss = self.shape.at(self.clock())
        self.sleep(self.shape.rtt_ms / 2000 + extra / 2 + len(body) * 8 / (self.shape.uplink_mbps * 1e6))
        self.bytes_up += len(body)
        lost = self.rng.random() < loss
        if lost and self.rng.random() < 0.5:
            raise httpx.ConnectError("emulated link: request lost", request=request)
        if self.duplicate_posts and request.method == "POST":
            self.inner.handle_request(request).close()
        response = self.inner.handle_request(request)
        content = response.read()
        response.close()
        if lost:
            raise httpx.ReadTimeout("emulated link: answer lost", request=request)
        self.sleep(self.shape.rtt_ms / 2000 + extra / 2 + len(content) * 8 / (self.shape.downlink_mbps * 1e6))
        self.bytes_down += len(content)
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)

    def close(self) -> None:
        self.inner.close()
