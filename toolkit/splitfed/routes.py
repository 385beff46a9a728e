"""The SplitFed edge's HTTP routes, mounted by ``toolkit.aggregator.app.create_app`` when it is
given an edge; same bearer credentials as the rest of the aggregator.

| route                            | auth   | answers |
|----------------------------------|--------|---------|
| PUT /v1/splitfed/batches/{batch} | device*| 200 codec "gradient" bytes (a retried batch id: the same bytes |
|                                  |        | again); 403 round not given to this device; 409 round closed, or |
|                                  |        | restart (below); 413; 422 bad message; 503 + Retry-After when the |
|                                  |        | edge is at capacity |
| GET /v1/splitfed/status          | admin  | 200 the edge's load and each phone's traffic (bytes per direction) |

(*) counted in the device's own batch bucket (``[splitfed] batches_per_s``, ``batch_burst``),
not in ``[limits]``: a phone sends one batch after another as fast as the edge answers.

``batch`` is the phone's step index in the round: PUT, because sending it again is harmless.
Every answer carries ``X-Fedkit-Batch``: the edge's status (``BatchReply``). ``restart`` (409)
is the one a phone acts on: the edge cannot continue its round from this batch (it restarted
and lost its copy, or the id does not follow its last), so the phone resets its weights and
optimizer to the round's base and sends batch 0.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response
from starlette.exceptions import HTTPException

from device_runtime.client import BATCH_HEADER
from toolkit.aggregator.auth import Principal, admin, batch_device, read_body
from toolkit.splitfed.edge import SplitFedEdge

splitfed = APIRouter(tags=["splitfed"])


async def get_edge(request: Request) -> SplitFedEdge:
    return request.app.state.edge


EdgeDep = Annotated[SplitFedEdge, Depends(get_edge)]


@splitfed.put("/v1/splitfed/batches/{batch}", responses={200: {"content": {"application/octet-stream": {}}}, 503: {}})
async def put_batch(
    batch: Annotated[int, Path(ge=0, lt=2**31, description="the phone's step index in the round")],
    request: Request,
    device_id: Annotated[str, Depends(batch_device)],
    edge: EdgeDep,
) -> Response:
    """Trains the edge's copy on one batch of activations and answers the gradient at the cut."""
    body = await read_body(request, edge.coordinator.config.limits.max_update_bytes)
    reply = await edge.submit(device_id, batch, body)
    headers = {BATCH_HEADER: reply.status}
    if reply.code != 200:
        if reply.retry_after is not None:
            headers["Retry-After"] = str(reply.retry_after)
        raise HTTPException(reply.code, reply.reason, headers)
    return Response(reply.body, media_type="application/octet-stream", headers=headers)


@splitfed.get("/v1/splitfed/status")
async def get_splitfed_status(_: Annotated[Principal, Depends(admin)], edge: EdgeDep) -> dict:
    return edge.status().model_dump(mode="json")
