"""Who is calling the aggregator, and how much they may send: bearer-token authentication,
principals (device or admin), per-device token-bucket rate limits, and body reading with a size
limit. Every router (tasks, weights, updates, evaluations, status, SplitFed, probe) takes these
through FastAPI's ``Depends``, so tests can swap the coordinator and every route answers 401,
403, 413 and 429 the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Header, Request
from starlette.exceptions import HTTPException

from toolkit.aggregator.coordinator import Coordinator


@dataclass(frozen=True)
class Principal:
    role: str  # "device" or "admin"
    device_id: str | None


@dataclass
class RateLimiter:
    """Token bucket per device, in memory (a restart forgets it, harmlessly)."""

    rate: float  # requests per second
    burst: int
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def retry_after(self, key: str, now: float) -> float:
        """0 if the request may go ahead (and counts it), else seconds to wait."""
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self.rate
        self._buckets[key] = (tokens - 1, now)
        return 0.0


async def get_coordinator(request: Request) -> Coordinator:
    return request.app.state.coordinator


def bearer(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(
            401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"}
        )
    return token.strip()


def _authenticated(coordinator: Coordinator, authorization: str | None, limiter: RateLimiter) -> Principal:
    found = coordinator.authenticate(bearer(authorization))
    if found is None:
        raise HTTPException(401, "unknown or revoked token: enrol again for a new one", {"WWW-Authenticate": "Bearer"})
    who = Principal(*found)
    wait = limiter.retry_after(who.device_id or "admin", time.monotonic())
    if wait:
        raise HTTPException(
            429, f"too many requests: retry after {wait:.1f} s", {"Retry-After": str(max(1, round(wait)))}
        )
    return who


async def principal(
    request: Request,
    coordinator: Annotated[Coordinator, Depends(get_coordinator)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    return _authenticated(coordinator, authorization, request.app.state.limiter)


async def device(who: Annotated[Principal, Depends(principal)]) -> str:
    if who.role != "device" or who.device_id is None:  # a device credential always names its device
        raise HTTPException(403, "this route is for enrolled devices; use a device credential")
    return who.device_id


async def batch_device(
    request: Request,
    coordinator: Annotated[Coordinator, Depends(get_coordinator)],
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """A device sending SplitFed batches: counted in its own, larger bucket (``[splitfed]``)."""
    who = _authenticated(coordinator, authorization, request.app.state.batch_limiter)
    return await device(who)


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if who.role != "admin":
        raise HTTPException(403, "this route needs an admin token (fedkit enrol-token --admin)")
    return who


CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise HTTPException(413, f"update is {length} bytes, the limit is {limit}: use a smaller encoding")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"update exceeds the limit of {limit} bytes: use a smaller encoding")
        chunks.append(chunk)
    return b"".join(chunks)
