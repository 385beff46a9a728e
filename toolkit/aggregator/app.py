"""The aggregator's FastAPI app: the routers of ``toolkit.aggregator.routes`` (the route table is
there), the validation probes, the link probe, and with a SplitFed edge its routes; one JSON
error body for every error, ``{"status": ..., "reason": ...}``; the ticker that checks round
deadlines; and, while served, the run's own evaluator (``toolkit.aggregator.evaluating``) when it
has one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from toolkit import __version__
from toolkit.aggregator.auth import RateLimiter
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.probe import probe_router
from toolkit.aggregator.probes import probes
from toolkit.aggregator.routes import ROUTERS
from toolkit.errors import describe

if TYPE_CHECKING:
    from toolkit.aggregator.evaluating import AggregatorEvaluator
    from toolkit.splitfed.edge import SplitFedEdge

TICK_SECONDS = 1.0  # how often round deadlines are checked

_STATUS_OF_CODE = {
    401: "unauthorized",
    404: "not_found",
    409: "conflict",
    413: "rejected",
    429: "rate_limited",
    503: "busy",
}


def _error(status_code: int, reason: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"status": _STATUS_OF_CODE.get(status_code, "rejected"), "reason": reason}, status_code, headers
    )


def create_app(
    coordinator: Coordinator,
    *,
    tick_seconds: float = TICK_SECONDS,
    edge: SplitFedEdge | None = None,
    evaluator: AggregatorEvaluator | None = None,
) -> FastAPI:
    """The app around a started coordinator; while served, deadlines are checked every tick.
    With ``edge`` (a SplitFed run) it also serves the edge's routes; with ``evaluator`` it
    evaluates every model version in the evaluator's thread from startup to shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def ticker():
            while True:
                await asyncio.sleep(tick_seconds)
                coordinator.tick()

        task = asyncio.create_task(ticker())
        if evaluator is not None:
            evaluator.start()
        try:
            yield
        finally:
            task.cancel()
            if evaluator is not None:
                await asyncio.to_thread(evaluator.stop)  # an evaluation under way ends off the event loop

    app = FastAPI(title="fedkit aggregator", version=__version__, lifespan=lifespan)
    app.state.coordinator = coordinator
    limits = coordinator.config.limits
    app.state.limiter = RateLimiter(limits.requests_per_s, limits.burst)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(probes)
    app.include_router(probe_router())
    if edge is not None:
        from toolkit.splitfed.routes import splitfed  # imported here: only a SplitFed aggregator loads the edge (torch)

        app.state.edge = edge
        app.state.batch_limiter = RateLimiter(edge.config.batches_per_s, edge.config.batch_burst)
        app.include_router(splitfed)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"invalid request ({describe(exc)})")

    return app
