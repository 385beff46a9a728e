"""The sync client's retry and answer handling, driven through httpx.MockTransport (the real
server on loopback is exercised in tests/toolkit/aggregator/test_recovery.py)."""

import json

import httpx
import pytest

from device_runtime.client import Assignment, PushResult, RetryPolicy, SyncClient
from device_runtime.errors import ProtocolError
from device_runtime.manifest import DevicePlan

TASK = {
    "status": "task",
    "round": 3,
    "base_version": 2,
    "lr": 0.01,
    "local_epochs": 1,
    "batch_size": 32,
    "encoding": "int8",
    "seed": 7,
    "momentum": 0.9,
    "stage": "head",
    "stage_index": 0,
    "trainable_blocks": 1,
    "deadline": 123.0,
    "new_field_from_a_newer_server": 1,
}


def scripted(*steps):
    """A transport answering each request with the next step: a Response, or an exception to raise."""
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        step = steps[min(len(seen), len(steps)) - 1]
        if isinstance(step, Exception):
            raise step
        return step

    return httpx.MockTransport(handler), seen


def client(transport, sleeps=None, attempts=5):
    return SyncClient(
        "http://edge",
        "cred",
        retry=RetryPolicy(attempts=attempts, base_s=1.0, cap_s=8.0),
        transport=transport,
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
    )


def test_push_retries_connection_errors_timeouts_and_5xx_then_returns_the_answer():
    transport, seen = scripted(
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.Response(500, json={"detail": "boom"}),
        httpx.Response(200, json={"status": "accepted", "reason": "", "round": 3, "update_id": 9}),
    )
    sleeps = []
    result = client(transport, sleeps).push(b"bytes", "key-1", accuracy=0.75)
    assert result == PushResult("accepted", "", 3, 9, 200) and result.counted
    assert len(seen) == 4 and len(sleeps) == 3
    # full jitter under the doubling cap
    assert all(0 <= s <= cap for s, cap in zip(sleeps, [1.0, 2.0, 4.0], strict=True))
    # every attempt sends the same bytes with the same key
    assert {(r.content, r.headers["Idempotency-Key"]) for r in seen} == {(b"bytes", "key-1")}
    assert seen[-1].headers["Authorization"] == "Bearer cred" and seen[-1].headers["X-Fedkit-Accuracy"] == "0.75"


def test_retry_after_is_honoured_on_429_and_503():
    transport, _seen = scripted(
        httpx.Response(429, headers={"Retry-After": "3"}, json={"status": "rate_limited", "reason": "slow down"}),
        httpx.Response(503, headers={"Retry-After": "100"}, json={"status": "rejected", "reason": "busy"}),
        httpx.Response(200, json=TASK),
    )
    sleeps = []
    assert client(transport, sleeps).task().round == 3
    assert sleeps[0] >= 3 and sleeps[1] == 8.0  # capped


@pytest.mark.parametrize(
    "code, body",
    [
        (409, {"status": "stale", "reason": "round 3 closed"}),
        (422, {"status": "rejected", "reason": "bad shape"}),
        (403, {"status": "rejected", "reason": "not your round"}),
        (413, {"status": "rejected", "reason": "too large"}),
        (200, {"status": "duplicate", "reason": "seen"}),
    ],
)
def test_a_definite_answer_is_returned_and_never_retried(code, body):
    transport, seen = scripted(httpx.Response(code, json=body))
    result = client(transport).push(b"x", "k")
    assert (result.status, result.reason, result.http_status) == (body["status"], body["reason"], code)
    assert len(seen) == 1


def test_a_refused_credential_raises_and_is_not_retried():
    transport, seen = scripted(httpx.Response(401, json={"status": "unauthorized", "reason": "unknown token"}))
    with pytest.raises(ProtocolError, match="enrol again"):
        client(transport).push(b"x", "k")
    with pytest.raises(ProtocolError, match="enrol again"):
        client(transport).task()
    assert len(seen) == 2


def test_no_definite_answer_after_every_attempt_raises():
    transport, seen = scripted(httpx.ConnectError("refused"))
    with pytest.raises(ProtocolError, match=r"after 3 attempts.*ConnectError"):
        client(transport, attempts=3).push(b"x", "k")
    assert len(seen) == 3


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>"),
        httpx.Response(200, json={"status": "maybe"}),
        httpx.Response(404, json={"status": "not_found", "reason": "?"}),
    ],
)
def test_answers_outside_the_protocol_raise(response):
    transport, _ = scripted(response)
    with pytest.raises(ProtocolError):
        client(transport).push(b"x", "k")


def test_task_answers_are_parsed_into_an_assignment_and_task_fields():
    transport, _ = scripted(httpx.Response(200, json=TASK))
    assignment = client(transport).task()
    assert assignment.stage == "head" and assignment.deadline == 123.0
    plan = DevicePlan(cut=5, train_from=4, encoding="fp16", local_epochs=2, batch_size=16)
    assert assignment.task_fields(plan) == {
        k: TASK[k]
        for k in ("round", "base_version", "lr", "local_epochs", "batch_size", "encoding", "seed", "momentum")
    }


def test_what_a_task_leaves_out_comes_from_the_phones_plan():
    # Prepare: a stage that names the learning rate but not the encoding, batch or epochs
    task = {**TASK, "local_epochs": None, "batch_size": None, "encoding": None, "trainable_blocks": None}
    plan = DevicePlan(cut=5, train_from=4, encoding="fp16", local_epochs=2, batch_size=16)

    # Execute
    fields = Assignment.from_json(task).task_fields(plan)

    # Assert: the plan decides what the stage leaves out, the stage what it names
    assert (fields["encoding"], fields["batch_size"], fields["local_epochs"]) == ("fp16", 16, 2)
    assert fields["lr"] == TASK["lr"] and fields["round"] == TASK["round"]
    named = Assignment.from_json({**task, "encoding": "int4"}).task_fields(plan)
    assert named["encoding"] == "int4" and named["batch_size"] == 16
    assert Assignment.from_json({"status": "wait", "retry_after": 2.0}).retry_after == 2.0
    with pytest.raises(ProtocolError, match="lacks"):
        Assignment.from_json({"status": "task", "round": 1})
    with pytest.raises(ProtocolError, match="no valid status"):
        Assignment.from_json(["task"])


def test_weights_are_not_sent_again_when_the_etag_matches():
    def handler(request):
        if request.headers.get("If-None-Match") == '"abc"':
            return httpx.Response(304, headers={"ETag": '"abc"'})
        return httpx.Response(200, content=b"weights", headers={"ETag": '"abc"'})

    c = client(httpx.MockTransport(handler))
    data, etag = c.weights(4)
    assert (data, etag) == (b"weights", '"abc"')
    assert c.weights(4, etag) == (None, '"abc"')


def test_enrol_keeps_the_credential_and_sends_the_enrolment_token():
    seen = []

    def handler(request):
        seen.append(request)
        return httpx.Response(200, json={"status": "enrolled", "device_id": "p1", "token": "new-cred"})

    c = SyncClient("http://edge", transport=httpx.MockTransport(handler))
    assert c.enrol("one-time", "p1") == "new-cred" and c.token == "new-cred"
    assert seen[0].headers["Authorization"] == "Bearer one-time" and json.loads(seen[0].content) == {"device_id": "p1"}
    refused = SyncClient(
        "http://edge", transport=httpx.MockTransport(lambda r: httpx.Response(401, json={"reason": "used"}))
    )
    with pytest.raises(ProtocolError, match="refused"):
        refused.enrol("one-time", "p1")
