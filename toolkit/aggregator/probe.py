"""The link probe: what `fedkit profile --aggregator URL` (android_harness/probe.py) measures
RTT and bandwidth against.

| route                   | auth | answers |
|-------------------------|------|---------|
| GET  /probe/echo?size=N | none | 200 N zero bytes (0 ≤ N ≤ MAX_DOWN_BYTES); 422 beyond |
| POST /probe/echo        | none | 200 {"status": "ok", "bytes": n} once the whole body is read; |
|                         |      | 413 beyond MAX_UP_BYTES |

No credential: a phone is profiled before it is enrolled (profile → plan → export → enrol), so
it has no device token yet, and an admin token does not belong on a phone. The routes keep
nothing and store nothing; what bounds their cost is a token bucket per client address (429
with Retry-After) and the size caps. Behind a reverse proxy every phone shares the proxy's
address, and so its bucket: one probe run at a time there.
"""

from __future__ import annotations

import math
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.exceptions import HTTPException

from toolkit.aggregator.auth import RateLimiter

MAX_DOWN_BYTES = 8 << 20  # 8 MiB: 8× the probe's 1 MiB transfers, room for longer ones on fast links
MAX_UP_BYTES = 8 << 20
# One probe run is 3 × 3 requests (RTT, down, up); the bucket holds a run and a retry's start,
# and refills one run a minute, so a client cannot turn the route into a bandwidth sink.
PROBE_BURST = 12
PROBE_RATE = 9 / 60  # requests per second


def probe_router(limiter: RateLimiter | None = None) -> APIRouter:
    """The probe routes, rate-limited by ``limiter`` (default: PROBE_RATE, PROBE_BURST per client
    address); one router, and so one bucket table, per app."""
    limiter = limiter or RateLimiter(PROBE_RATE, PROBE_BURST)

    async def within_rate(request: Request) -> None:
        address = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(address, time.monotonic())
        if wait:
            seconds = max(1, math.ceil(wait))
            raise HTTPException(
                429, f"too many probe requests from {address}: retry after {seconds} s", {"Retry-After": str(seconds)}
            )

    router = APIRouter(tags=["probe"], dependencies=[Depends(within_rate)])

    @router.get("/probe/echo", responses={200: {"content": {"application/octet-stream": {}}}, 422: {}, 429: {}})
    async def get_echo(size: Annotated[int, Query(ge=0, description="bytes to answer")]) -> Response:
        """``size`` bytes, for the downlink: the client times the transfer."""
        if size > MAX_DOWN_BYTES:
            raise HTTPException(
                422, f"size {size} is over the probe's limit of {MAX_DOWN_BYTES} bytes: ask for 8 MiB or less"
            )
        return Response(bytes(size), media_type="application/octet-stream")

    @router.post("/probe/echo", responses={413: {}, 429: {}})
    async def post_echo(request: Request) -> dict:
        """Reads the whole body, for the uplink: the answer goes out only once it has arrived."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_UP_BYTES:
            raise HTTPException(
                413, f"probe body of {length} bytes is over the limit of {MAX_UP_BYTES}: send 8 MiB or less"
            )
        size = 0
        async for chunk in request.stream():  # counted, not kept: the probe needs no copy of it
            size += len(chunk)
            if size > MAX_UP_BYTES:
                raise HTTPException(413, f"probe body is over the limit of {MAX_UP_BYTES} bytes: send 8 MiB or less")
        return {"status": "ok", "bytes": size}

    return router
