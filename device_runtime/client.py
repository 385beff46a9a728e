"""The phone's side of the sync protocol (httpx): enrol, pull a task, pull weights, push an update,
exchange SplitFed batches with the edge, and answer validation probes.

Connection errors, timeouts, 5xx, and 429/503 are retried with exponential backoff and full
jitter (a Retry-After header is honoured); a definite answer is never retried. A push returns
its definite answer (accepted, duplicate, stale, rejected); pushing the same bytes with the
same idempotency key again is harmless, which is how a phone killed mid-push resumes: the
trainer checkpoints the encoded update and its key before pushing, and after a restart the
same pair is pushed again and answered "duplicate" if the first push had landed.

    ProtocolError  the credential is refused (enrol again), the aggregator answered something
                   outside the protocol, or it stayed unreachable through every retry
    RestartRound   (SplitFed) a batch answered 409 with ``X-Fedkit-Batch: restart``: the edge
                   lost the phone's round (it restarted); send batch 0 to train it again
"""

from __future__ import annotations

import hashlib
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, overload

import httpx

from device_runtime.errors import ProtocolError, RestartRound
from device_runtime.manifest import DevicePlan
from device_runtime.preprocess import InputSpec

API = "/v1"
BATCH_HEADER = "X-Fedkit-Batch"  # the edge's status of a SplitFed batch; "restart" on a 409: send batch 0
TASK_FIELDS = ("round", "base_version", "lr", "seed", "momentum")  # every task names these
PLAN_FIELDS = ("local_epochs", "batch_size", "encoding")  # a task names these only to override the plan


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8  # requests in all, the first included
    base_s: float = 0.5  # backoff before the 2nd attempt, doubling after
    cap_s: float = 30.0  # longest single wait (also caps Retry-After)


@dataclass(frozen=True)
class Assignment:
    """The answer to a task pull. ``status``: "task" (train), "wait" (ask again after
    ``retry_after`` s: the round is full or this phone already reported) or "done"."""

    status: str
    round: int | None = None
    base_version: int | None = None
    lr: float | None = None
    local_epochs: int | None = None
    batch_size: int | None = None
    encoding: str | None = None
    seed: int | None = None
    momentum: float | None = None
    stage: str | None = None
    stage_index: int | None = None
    trainable_blocks: int | None = None
    deadline: float | None = None  # unix time the round closes if it has enough reports
    retry_after: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> Assignment:
        if not isinstance(data, dict) or data.get("status") not in ("task", "wait", "done"):
            raise ProtocolError(f"task answer {data!r} has no valid status; the aggregator may be a different version")
        known = {f.name for f in fields(cls)}
        assignment = cls(**{k: v for k, v in data.items() if k in known})
        if assignment.status == "task" and any(getattr(assignment, k) is None for k in TASK_FIELDS):
            raise ProtocolError(f"task answer {data!r} lacks one of {', '.join(TASK_FIELDS)}")
        return assignment

    def task_fields(self, plan: DevicePlan) -> dict[str, Any]:
        """The fields of ``device_runtime.local_round.Task`` for a phone running ``plan`` (its
        bundle's): ``Task(**assignment.task_fields(plan))``. What the task leaves out (its
        stage does not name it) comes from the plan."""
        own = {k: getattr(self, k) for k in PLAN_FIELDS}
        return {
            **{k: getattr(self, k) for k in TASK_FIELDS},
            **{k: getattr(plan, k) if v is None else v for k, v in own.items()},
        }


@dataclass(frozen=True)
class ProbeTask:
    """An open validation probe: its id (the model file's sha256), the model's input and size."""

    probe: str
    input: InputSpec
    bytes: int


@dataclass(frozen=True)
class PushResult:
    """The aggregator's definite answer to a push: accepted, duplicate (an earlier push of it
    was accepted), stale (its round closed, or its base is too old), rejected (``reason``) or,
    for a SplitFed update, restart (the edge lost its part of the round: train it again)."""

    status: str
    reason: str = ""
    round: int | None = None
    update_id: int | None = None
    http_status: int = 200

    @property
    def counted(self) -> bool:
        """The update is (or already was) in the aggregator's hands."""
        return self.status in ("accepted", "duplicate")


class SyncClient:
    """One phone's connection to the aggregator at ``base_url`` (e.g. "https://edge:8443")."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: float = 30.0,
        verify: bool | str = True,  # TLS: True, False, or a CA bundle path
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.token = token
        self.retry = retry
        self._sleep = sleep
        self._rng = rng or random.Random()
        # a CA bundle, e.g. the edge's self-signed certificate, is read into a context
        tls = ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        self._http = httpx.Client(base_url=base_url, timeout=timeout_s, verify=tls, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the protocol -----------------------------------------------------------------------
    def enrol(self, enrol_token: str, device_id: str) -> str:
        """Trades a one-time enrolment token for this device's credential (kept in
        ``self.token``). Safe to repeat with the same token and id if the answer was lost."""
        r = self._request("POST", "/enrol", json={"device_id": device_id}, token=enrol_token)
        if r.status_code != 200:
            raise ProtocolError(f"enrolment of {device_id!r} refused ({r.status_code}): {_reason(r)}")
        self.token = _json(r)["token"]
        return self.token

    def task(self) -> Assignment:
        r = self._request("GET", "/task")
        self._expect(r, 200, "task pull")
        return Assignment.from_json(_json(r))

    @overload
    def weights(self, version: int, etag: None = None) -> tuple[bytes, str]: ...
    @overload
    def weights(self, version: int, etag: str) -> tuple[bytes | None, str]: ...
    def weights(self, version: int, etag: str | None = None) -> tuple[bytes | None, str]:
        """(codec bytes, ETag) of a model version, or (None, etag) if ``etag`` says the phone
        already has it: then nothing is sent again."""
        headers = {"If-None-Match": etag} if etag else {}
        r = self._request("GET", f"/weights/{version}", headers=headers)
        if r.status_code == 304 and etag:  # not modified since etag; unasked, a 304 is outside the protocol
            return None, etag
        self._expect(r, 200, f"weights pull of version {version}")
        return r.content, r.headers.get("ETag", "")

    def push(self, payload: bytes, idempotency_key: str, accuracy: float | None = None) -> PushResult:
        """Pushes a codec-encoded update; ``accuracy`` is the phone's local validation accuracy."""
        headers = {"Idempotency-Key": idempotency_key, "Content-Type": "application/octet-stream"}
        if accuracy is not None:
            headers["X-Fedkit-Accuracy"] = repr(float(accuracy))
        r = self._request("POST", "/updates", content=payload, headers=headers)
        if r.status_code == 401:
            raise ProtocolError(f"the aggregator refused this device's credential: {_reason(r)}; enrol again")
        body = _json(r)
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("accepted", "duplicate", "stale", "rejected", "restart"):
            raise ProtocolError(f"push answered {r.status_code} with {body!r}, which is not a push outcome")
        return PushResult(status, str(body.get("reason", "")), body.get("round"), body.get("update_id"), r.status_code)

    # -- validation probes (toolkit.aggregator.probes) --------------------------------------
    def probes(self, wait_s: float = 0.0) -> list[ProbeTask]:
        """The open validation probes this phone has not answered, oldest first; with none open,
        the aggregator waits up to ``wait_s`` (keep it under the client's timeout) for one."""
        r = self._request("GET", "/probes", params={"wait": wait_s} if wait_s else None)
        if r.status_code == 404:  # an aggregator older than probes: there are none
            return []
        self._expect(r, 200, "probe list")
        body = _json(r)
        try:
            return [
                ProbeTask(str(p["probe"]), InputSpec.from_dict(p["input"]), int(p["bytes"])) for p in body["probes"]
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"probe list {str(body)[:200]} is not a list of probes: {exc}") from exc

    def probe_model(self, probe: str) -> bytes:
        """The probe's ONNX file, checked against its id (the file's sha256)."""
        r = self._request("GET", f"/probes/{probe}/model")
        self._expect(r, 200, f"probe {probe} download")
        if hashlib.sha256(r.content).hexdigest() != probe:
            raise ProtocolError(f"probe {probe}: the downloaded file is not the probe's (sha256 differs)")
        return r.content

    def answer_probe(self, probe: str, counts: dict[str, int]) -> str:
        """Posts the phone's counts for a probe: "recorded", "duplicate" (it had answered: the
        first answer counts), "closed" or "rejected" (the reason is raised)."""
        r = self._request("POST", f"/probes/{probe}/answers", json=counts)
        if r.status_code == 409:
            return "closed"
        self._expect(r, 200, f"answer to probe {probe}")
        status = _json(r).get("status")
        if status not in ("recorded", "duplicate"):
            raise ProtocolError(f"answer to probe {probe} answered {status!r}, which is not an answer's outcome")
        return str(status)

    def splitfed_batch(self, batch: int, payload: bytes) -> bytes:
        """Sends one SplitFed batch (a codec "activation" message) to the edge and returns its
        codec "gradient" answer. ``batch`` is the step's index in the round: a retry whose first
        answer was lost gets the same bytes again, and never trains twice. Raises RestartRound
        when the edge answers that it cannot continue the round from this batch."""
        headers = {"Content-Type": "application/octet-stream"}
        r = self._request("PUT", f"/splitfed/batches/{batch}", content=payload, headers=headers)
        if r.status_code == 409 and r.headers.get(BATCH_HEADER) == "restart":
            raise RestartRound(f"SplitFed batch {batch}: {_reason(r)}")
        self._expect(r, 200, f"SplitFed batch {batch}")
        return r.content

    # -- transport --------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, token: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        bearer = token or self.token
        if bearer:
            headers["Authorization"] = f"Bearer {bearer}"
        last, wait = "", 0.0
        for attempt in range(self.retry.attempts):
            if attempt:
                self._sleep(wait)
            try:
                r = self._http.request(method, API + path, headers=headers, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the request may be retried
                last = f"{type(exc).__name__}: {exc}"
                wait = self._backoff(attempt)
                continue
            if r.status_code in (429, 503) or r.status_code >= 500:
                last = f"HTTP {r.status_code}: {_reason(r)}"
                wait = self._backoff(attempt)
                retry_after = r.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(self.retry.cap_s, max(wait, float(retry_after)))
                continue
            return r
        raise ProtocolError(
            f"{method} {path}: no definite answer from {self._http.base_url} after {self.retry.attempts} attempts "
            f"(last: {last}); keep the checkpointed update and try again later"
        )

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.retry.cap_s, self.retry.base_s * 2**attempt))

    @staticmethod
    def _expect(r: httpx.Response, code: int, what: str) -> None:
        if r.status_code == 401:
            raise ProtocolError(f"{what}: the aggregator refused this device's credential ({_reason(r)}); enrol again")
        if r.status_code != code:
            raise ProtocolError(f"{what} answered {r.status_code}: {_reason(r)}")


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError as exc:
        raise ProtocolError(f"the aggregator answered {r.status_code} with a body that is not JSON") from exc


def _reason(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:200]
    return str(body.get("reason", body)) if isinstance(body, dict) else str(body)[:200]
