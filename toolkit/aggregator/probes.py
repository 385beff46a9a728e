"""Validation probes: a model's accuracy measured on the phones' held-out slices, no image
leaving a phone. (Not the link probe of ``toolkit.aggregator.probe``.)

An admin posts an inference model (the ONNX file the exporter writes: images → logits); phones
list the open probes they have not answered, download the model, run it on their held-out slice
(the trainer's rule, ``device_runtime.trainer.holdout_index``) and post two counts once; the
admin reads the sums. ``toolkit.nas.fleet`` is the host's side.

| route                              | auth            | answers |
|------------------------------------|-----------------|---------|
| POST /v1/probes                    | admin           | body: the ONNX file; header X-Fedkit-Input: the input spec |
|                                    |                 | as a bundle's manifest has it (default 32×32×3, ImageNet |
|                                    |                 | normalisation) → 200 {"status": created / reopened / open, |
|                                    |                 | "probe": sha256 of the file}; 413 too large; 422 not a model |
|                                    |                 | ONNX Runtime runs on that input, with (N, classes) logits |
| GET  /v1/probes?wait=S             | device          | 200 {"probes": [{"probe", "input", "bytes"}]}: open, not yet |
|                                    |                 | answered by this device, oldest first; with none, waits up |
|                                    |                 | to S ≤ 60 s (default 0) for one to be posted (long poll) |
| GET  /v1/probes/{probe}/model      | device or admin | 200 the ONNX bytes + ETag; 404 unknown or closed |
| POST /v1/probes/{probe}/answers    | device          | {"correct", "total", "samples"}: strict ints, 0 ≤ correct ≤ |
|                                    |                 | total ≤ samples (the device's shard size), total ≥ 1 → 200 |
|                                    |                 | {"status": recorded / duplicate} (a device counts once |
|                                    |                 | per probe: its first answer); 404 unknown; 409 closed; |
|                                    |                 | 422 invalid |
| GET  /v1/probes/{probe}            | admin           | 200 the result: answers, correct, total, accuracy (null |
|                                    |                 | before any answer), open; 404 unknown |
| POST /v1/probes/{probe}/close      | admin           | 200 the result; phones no longer see it, its model bytes |
|                                    |                 | are dropped (posting the file again reopens it) |

A probes-only phone long-polls the list (``wait``), so an idle fleet costs one request per phone
every ``wait`` seconds, and a probe reaches it as soon as it is posted. Probes and answers are in
the Store (SQLite): a restarted server has them all. Posting the
same file again answers with the same id and keeps the answers: the same bytes are the same
model, so their accuracy is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException

from toolkit.aggregator.auth import CoordinatorDep, Principal, admin, device, principal, read_body
from toolkit.aggregator.coordinator import Coordinator, log_event
from toolkit.aggregator.store import ProbeRow
from toolkit.errors import describe

PROBE_ID = re.compile(r"^[0-9a-f]{64}$")
MAX_SAMPLES = 1_000_000_000  # as an update's num_samples
MAX_WAIT_S = 60.0  # longest long poll of the probe list
WAIT_SLICE_S = 1.0  # how often a long poll checks that its phone is still there

ProbeId = Annotated[str, Path(pattern=PROBE_ID.pattern, description="the probe's id: its file's sha256")]


class ProbeInput(BaseModel):
    """The model's input, as ``device_runtime.preprocess.InputSpec`` (a bundle's manifest) has it."""

    model_config = ConfigDict(extra="forbid", strict=True)
    height: int = Field(default=32, ge=1, le=4096)
    width: int = Field(default=32, ge=1, le=4096)
    channels: int = Field(default=3, ge=1, le=4)
    mean: list[float] = Field(default=[0.485, 0.456, 0.406], max_length=4)
    std: list[float] = Field(default=[0.229, 0.224, 0.225], max_length=4)

    @model_validator(mode="after")
    def _per_channel(self) -> ProbeInput:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"give one mean and one std per channel ({self.channels})")
        if not all(s > 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class ProbeAnswer(BaseModel):
    """Strict: a bool, float or string where a count belongs is refused, not converted."""

    model_config = ConfigDict(extra="forbid", strict=True)
    correct: int = Field(ge=0, le=MAX_SAMPLES)
    total: int = Field(ge=1, le=MAX_SAMPLES)  # held-out images the model ran on
    samples: int = Field(ge=1, le=MAX_SAMPLES)  # the device's shard size

    @model_validator(mode="after")
    def _ordered(self) -> ProbeAnswer:
        if self.correct > self.total:
            raise ValueError(f"correct ({self.correct}) is more than total ({self.total})")
        if self.total > self.samples:
            raise ValueError(f"total ({self.total}) is more than the device's samples ({self.samples})")
        return self


class ProbeResult(BaseModel):
    probe: str
    open: bool
    created: float
    closed: float | None
    input: dict[str, Any]
    bytes: int
    answers: int
    correct: int
    total: int
    accuracy: float | None  # correct / total over every answer: sample-weighted

    @classmethod
    def of(cls, row: ProbeRow) -> ProbeResult:
        return cls(
            probe=row.probe,
            open=row.closed is None,
            created=row.created,
            closed=row.closed,
            input=json.loads(row.input),
            bytes=row.nbytes,
            answers=row.answers,
            correct=row.correct,
            total=row.total,
            accuracy=row.correct / row.total if row.total else None,
        )


def check_model(blob: bytes, spec: ProbeInput) -> str:
    """Why ONNX Runtime cannot run ``blob`` as a probe on ``spec``'s input, or "" if it can:
    one input (N, channels, height, width), one output (N, classes) with classes fixed. Checked
    here, once, so that no phone downloads a model it cannot run."""
    from device_runtime.engines.inference import ORT_ERRORS, inference_options, load_onnxruntime

    try:
        session = load_onnxruntime().InferenceSession(blob, inference_options(), providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        return f"ONNX Runtime cannot load the probe's model ({str(exc)[:300]}); post the exporter's ONNX file"
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) < 1:
        return f"the model has {len(inputs)} inputs and {len(outputs)} outputs: a probe takes images, gives logits"
    shape, want = list(inputs[0].shape), [spec.channels, spec.height, spec.width]
    if len(shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(shape[1:], want, strict=True)):
        return f"the model's input is {shape}, the input spec's (N, {', '.join(map(str, want))})"
    out = list(outputs[0].shape)
    if len(out) != 2 or not isinstance(out[1], int) or out[1] < 1:
        return f"the model's output is {out}: a probe's is logits (N, classes), classes fixed"
    return ""


def _input_spec(header: str | None) -> ProbeInput:
    if header is None:
        return ProbeInput()
    try:
        return ProbeInput.model_validate_json(header)
    except ValidationError as exc:
        raise HTTPException(422, f"X-Fedkit-Input is not an input spec ({describe(exc)})") from exc


def _found(coordinator: Coordinator, probe: str) -> ProbeRow:
    row = coordinator.store.get_probe(probe)
    if row is None:
        raise HTTPException(404, f"probe {probe} does not exist: post its model first")
    return row


def _opened(request: Request) -> asyncio.Event:
    """Set when a probe opens (then replaced by a fresh one): what waiting phones wait for."""
    state = request.app.state
    if getattr(state, "probe_opened", None) is None:
        state.probe_opened = asyncio.Event()
    return state.probe_opened


probes = APIRouter(tags=["probes"])


@probes.post("/v1/probes", responses={413: {}, 422: {}})
async def post_probe(
    request: Request,
    _: Annotated[Principal, Depends(admin)],
    coordinator: CoordinatorDep,
    x_fedkit_input: Annotated[str | None, Header(description="the input spec, JSON")] = None,
) -> dict:
    """Opens a probe of the ONNX model in the body; its id is the file's sha256."""
    spec = _input_spec(x_fedkit_input)
    blob = await read_body(request, coordinator.config.limits.max_probe_bytes)
    problem = await asyncio.to_thread(check_model, blob, spec)  # loading a model takes a while: off the loop
    if problem:
        raise HTTPException(422, problem)
    probe = hashlib.sha256(blob).hexdigest()
    status = coordinator.store.add_probe(probe, spec.model_dump_json(), blob, coordinator.clock())
    if status != "open":  # wake the phones waiting for one
        _opened(request).set()
        request.app.state.probe_opened = asyncio.Event()
    log_event("probe_opened", probe=probe, status=status, bytes=len(blob))
    return {"status": status, "probe": probe}


@probes.get("/v1/probes")
async def get_probes(
    request: Request,
    device_id: Annotated[str, Depends(device)],
    coordinator: CoordinatorDep,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a probe if none is open")] = 0,
) -> dict:
    """The open probes this device has not answered, oldest first; with none, waits up to
    ``wait`` seconds for one to be posted."""
    rows = coordinator.store.open_probes(device_id)
    deadline = time.monotonic() + wait
    while not rows and time.monotonic() < deadline:
        opened = _opened(request)
        # in slices: a phone that went away (killed, or the fleet stopped) ends its wait within one
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(opened.wait(), min(WAIT_SLICE_S, max(0.0, deadline - time.monotonic())))
        if await request.is_disconnected():
            break
        rows = coordinator.store.open_probes(device_id)
    return {"probes": [{"probe": r.probe, "input": json.loads(r.input), "bytes": r.nbytes} for r in rows]}


@probes.get("/v1/probes/{probe}/model", responses={200: {"content": {"application/octet-stream": {}}}, 404: {}})
async def get_probe_model(
    probe: ProbeId, _: Annotated[Principal, Depends(principal)], coordinator: CoordinatorDep
) -> Response:
    blob = coordinator.store.probe_blob(probe)
    if blob is None:
        raise HTTPException(404, f"probe {probe} does not exist or is closed: list the open ones (GET /v1/probes)")
    return Response(blob, media_type="application/octet-stream", headers={"ETag": f'"{probe}"'})


@probes.post("/v1/probes/{probe}/answers", responses={404: {}, 409: {}, 422: {}})
async def post_probe_answer(
    probe: ProbeId, answer: ProbeAnswer, device_id: Annotated[str, Depends(device)], coordinator: CoordinatorDep
) -> dict:
    """Records the device's counts on its held-out slice; a second answer is a duplicate."""
    with coordinator.store.transaction():
        row = _found(coordinator, probe)
        if row.closed is not None:
            raise HTTPException(409, f"probe {probe} is closed: answers are no longer counted")
        new = coordinator.store.add_probe_answer(
            probe, device_id, answer.correct, answer.total, answer.samples, coordinator.clock()
        )
    log_event("probe_answer", probe=probe, device=device_id, correct=answer.correct, total=answer.total, new=new)
    return {"status": "recorded" if new else "duplicate"}


@probes.get("/v1/probes/{probe}")
async def get_probe(probe: ProbeId, _: Annotated[Principal, Depends(admin)], coordinator: CoordinatorDep) -> dict:
    return ProbeResult.of(_found(coordinator, probe)).model_dump(mode="json")


@probes.post("/v1/probes/{probe}/close")
async def close_probe(probe: ProbeId, _: Annotated[Principal, Depends(admin)], coordinator: CoordinatorDep) -> dict:
    with coordinator.store.transaction():
        _found(coordinator, probe)
        coordinator.store.close_probe(probe, coordinator.clock())
        row = _found(coordinator, probe)
    log_event("probe_closed", probe=probe, answers=row.answers, total=row.total)
    return ProbeResult.of(row).model_dump(mode="json")
