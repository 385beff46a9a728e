"""The aggregator's HTTP routes (FastAPI): one router per resource, the coordinator and auth
through Depends; ``toolkit.aggregator.app`` assembles them.

| route                | auth            | answers |
|----------------------|-----------------|---------|
| GET  /v1/health      | none            | 200 {"status": "ok"} |
| POST /v1/enrol       | enrol           | 200 {"device_id", "token"}; 401 bad/used token; 409 device id taken |
| GET  /v1/task        | device          | 200 {"status": "task", round, base_version, lr, ...} |
|                      |                 | / {"status": "wait", retry_after} / {"status": "done"} |
| GET  /v1/weights/{v} | device or admin | 200 codec bytes + ETag (a device's download is counted); |
|                      |                 | 304 if If-None-Match has that ETag; 404 unknown version |
| POST /v1/updates     | device          | 200 accepted / duplicate; 409 stale, or restart |
|                      |                 | (SplitFed: the edge lost its part); 400, 403, 422 rejected; 413 too large |
| POST /v1/evaluations | admin           | 200 {"status": "recorded"}; 404 unknown version; 422 invalid |
| GET  /v1/status      | admin           | 200 the run's status |
| /v1/probes...        | admin / device  | validation probes (a model's accuracy on the phones' |
|                      |                 | held-out slices): toolkit/aggregator/probes.py |
| /v1/splitfed/...     |                 | with a SplitFed edge only: toolkit/splitfed/routes.py |
| GET/POST /probe/echo | none            | `fedkit profile --aggregator`'s link probe: toolkit/aggregator/probe.py |
|                      |                 | (422/413 over 8 MiB, 429 per address) |

Every error body is JSON ``{"status": ..., "reason": ...}``; 401 on a missing or wrong bearer
token (nothing is stored), 429 with Retry-After when a device exceeds its request rate
(``[limits]``; SplitFed batches count in a separate bucket per device, ``[splitfed]``).
Authentication, principals, rate limits and body reading: ``toolkit.aggregator.auth``.
"""

from __future__ import annotations

from typing import Annotated, Self

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from toolkit import __version__
from toolkit.aggregator.auth import CoordinatorDep, Principal, admin, bearer, device, principal, read_body
from toolkit.aggregator.coordinator import DEVICE_ID
from toolkit.aggregator.status import run_status
from toolkit.aggregator.store import ExitScore

health = APIRouter(tags=["health"])


@health.get("/v1/health")
def get_health() -> dict:
    return {"status": "ok", "version": __version__}


enrolment = APIRouter(tags=["enrolment"])


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=DEVICE_ID.pattern)


@enrolment.post("/v1/enrol")
async def post_enrol(
    req: EnrolRequest, coordinator: CoordinatorDep, authorization: Annotated[str | None, Header()] = None
) -> dict:
    """Trades a one-time enrolment token (as the bearer token) for a device credential.
    Repeating it with the same token and device id issues a fresh credential."""
    outcome = coordinator.enrol(bearer(authorization), req.device_id)
    if outcome.status == "invalid_token":
        raise HTTPException(401, "enrolment token unknown, or already used by another device: ask for a new one")
    if outcome.status == "id_taken":
        raise HTTPException(409, f"device id {req.device_id!r} is enrolled with another token: choose another id")
    return {"status": "enrolled", "device_id": req.device_id, "token": outcome.credential}


tasks = APIRouter(tags=["tasks"])


@tasks.get("/v1/task")
async def get_task(device_id: Annotated[str, Depends(device)], coordinator: CoordinatorDep) -> dict:
    """The device's task for the current round (the same one again until it pushes), or wait/done."""
    return coordinator.task_for(device_id)


weights = APIRouter(tags=["weights"])


@weights.get("/v1/weights/{version}", responses={200: {"content": {"application/octet-stream": {}}}, 304: {}})
async def get_weights(
    version: int,
    who: Annotated[Principal, Depends(principal)],
    coordinator: CoordinatorDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The model version, codec-encoded; 304 when the caller already has it (If-None-Match).
    Devices and admins (an evaluator) may read it; a device's downloads are counted."""
    found = coordinator.weights(version)
    if found is None:
        raise HTTPException(404, f"model version {version} does not exist; pull a task for the current one")
    blob, sha = found
    etag = f'"{sha}"'
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers={"ETag": etag})
    if who.role == "device" and who.device_id is not None:  # a device credential always names its device
        coordinator.store.record_download(who.device_id, version, len(blob), coordinator.clock())
    return Response(blob, media_type="application/octet-stream", headers={"ETag": etag})


updates = APIRouter(tags=["updates"])


@updates.post("/v1/updates", responses={409: {}, 400: {}, 403: {}, 413: {}, 422: {}})
async def post_update(
    request: Request,
    device_id: Annotated[str, Depends(device)],
    coordinator: CoordinatorDep,
    idempotency_key: Annotated[str | None, Header()] = None,
    x_fedkit_accuracy: Annotated[float | None, Header(description="local validation accuracy, in [0, 1]")] = None,
) -> JSONResponse:
    """Pushes a codec-encoded delta. The body's status is accepted, duplicate, stale, restart
    (SplitFed: train the round again, the edge lost its part) or rejected."""
    body = await read_body(request, coordinator.config.limits.max_update_bytes)
    outcome = coordinator.push(device_id, idempotency_key, body, x_fedkit_accuracy)
    return JSONResponse(outcome.body(), status_code=outcome.code)


evaluations = APIRouter(tags=["evaluations"])


def _position(key: object) -> object:
    # JSON object keys are strings: "7" is exit position 7; " 7", "+7" or "7.0" stay strings
    # and are refused (the models are strict), as lax int parsing would not.
    return int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() else key


Position = Annotated[int, BeforeValidator(_position), Field(ge=1)]


class ExitResult(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    accuracy: float = Field(ge=0, le=1)
    loss: float = Field(ge=0, allow_inf_nan=False)  # mean cross-entropy


class EvaluationRequest(BaseModel):
    """Strict: a bool or a string where a number belongs is refused, not converted."""

    model_config = ConfigDict(extra="forbid", strict=True)
    version: int = Field(ge=0)
    accuracy: float = Field(ge=0, le=1)  # an exit model's: its final exit's
    source: str = Field(default="evaluator", max_length=64)
    # an exit model's figures: per exit position, and the weighted total loss over the exits
    exits: dict[Position, ExitResult] | None = Field(default=None, min_length=1, max_length=1000)
    loss: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _exits_with_their_loss(self) -> Self:
        if (self.exits is None) != (self.loss is None):
            raise ValueError("send 'exits' and 'loss' (the total over the exits) together, or neither")
        return self

    def exit_scores(self) -> tuple[ExitScore, ...]:
        return tuple(ExitScore(p, e.accuracy, e.loss) for p, e in sorted((self.exits or {}).items()))


@evaluations.post("/v1/evaluations")
async def post_evaluation(
    req: EvaluationRequest, _: Annotated[Principal, Depends(admin)], coordinator: CoordinatorDep
) -> dict:
    """Records a validation accuracy for a model version (the evaluator hook); for an exit
    model also its accuracy and loss per exit and the total loss, from which the run's best
    exit-point model is chosen (GET /v1/status's ``best``)."""
    if not coordinator.record_evaluation(req.version, req.accuracy, req.source, req.loss, req.exit_scores()):
        raise HTTPException(404, f"model version {req.version} does not exist")
    return {"status": "recorded"}


status = APIRouter(tags=["status"])


@status.get("/v1/status")
async def get_status(
    _: Annotated[Principal, Depends(admin)],
    coordinator: CoordinatorDep,
    last_rounds: Annotated[int, Query(ge=1, le=100_000, description="how many of the last rounds to list")] = 10,
) -> dict:
    return run_status(coordinator.store, last_rounds).model_dump(mode="json")


ROUTERS = (health, enrolment, tasks, weights, updates, evaluations, status)
