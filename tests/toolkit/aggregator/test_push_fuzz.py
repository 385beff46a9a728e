"""Thousands of random, mutated and well-formed-but-wrong pushes, in process: never a 5xx,
never anything stored. Phone "a" holds round 1's task, so only validation stands between a
payload and the store."""

import asyncio
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from aggregator_helpers import SHAPES, delta, enrol, make_coordinator, payload
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from device_runtime.codec import UpdateHeader, encode
from toolkit.aggregator.app import create_app

ENCODINGS = ["fp32", "fp16", "int8", "int4", "sign1", "topk"]  # of the mutated payloads


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@contextmanager
def fuzz_target(folder):
    """The app on a new run in ``folder``, phone "a" enrolled and holding round 1's task."""
    co = make_coordinator(folder, limits={"requests_per_s": 1e6, "burst": 10**6, "max_update_bytes": 4096})
    headers = {"Authorization": f"Bearer {enrol(co, 'a')}"}
    assert co.task_for("a")["round"] == 1
    # The ASGI app called in this thread's event loop: TestClient's thread hop per request
    # would double the run time of the volume below.
    loop = asyncio.new_event_loop()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(co)), base_url="http://aggregator")
    yield loop, client, headers, co
    loop.run_until_complete(client.aclose())
    loop.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    with fuzz_target(tmp_path_factory.mktemp("fuzz")) as fuzzed:
        yield fuzzed
        assert fuzzed[3].store.updates() == []


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_control_a_target_like_the_fuzzed_one_accepts_the_unmutated_payload(tmp_path, encoding):
    # Without this, the tests below would pass on a target that refuses every push
    with fuzz_target(tmp_path) as (loop, client, headers, co):
        body = payload("a", 1, 0, delta(0.01), encoding=encoding)
        r = loop.run_until_complete(
            client.post("/v1/updates", content=body, headers={**headers, "Idempotency-Key": "k"})
        )
        assert r.json()["status"] == "accepted", r.json()
        assert [u.device_id for u in co.store.updates()] == ["a"]


def push(target, body, key="k", accuracy=None):
    loop, client, headers, co = target
    extra = {"Idempotency-Key": key}
    if accuracy is not None:
        extra["X-Fedkit-Accuracy"] = accuracy
    r = loop.run_until_complete(client.post("/v1/updates", content=body, headers={**headers, **extra}))
    assert r.status_code < 500, r.text
    assert r.json()["status"] == "rejected", r.json()
    assert co.store.count_pending() == 0


@fuzz(400)
@given(
    body=st.binary(max_size=5000),
    key=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=0, max_size=140),
)
def test_random_bytes_and_keys(target, body, key):
    push(target, body, key or "k")


@fuzz(800)
@given(
    data=st.data(),
    op=st.sampled_from(["flip", "truncate", "insert", "splice"]),
    encoding=st.sampled_from(ENCODINGS),
)
def test_mutated_valid_payloads(target, data, op, encoding):
    valid = payload("a", 1, 0, delta(0.01), encoding=encoding)
    good = bytearray(valid)
    i = data.draw(st.integers(0, len(good) - 1))
    if op == "flip":
        good[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        good = good[:i]
    elif op == "insert":
        good[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        good[i : i + data.draw(st.integers(1, 64))] = data.draw(st.binary(max_size=64))
    assume(bytes(good) != valid)  # a splice may put back the bytes it took out
    push(target, bytes(good))


WRONG = st.sampled_from(["round", "base", "device", "shape", "name", "norm", "kind", "samples", "accuracy"])


@fuzz(400)
@given(wrong=WRONG, seed=st.integers(0, 2**32 - 1), encoding=st.sampled_from(["fp32", "int8", "int4", "topk"]))
def test_well_formed_but_wrong_updates(target, wrong, seed, encoding):
    rng = np.random.default_rng(seed)
    names = [n for n in SHAPES if rng.random() < 0.7] or ["classifier.bias"]
    tensors = {n: (0.01 * rng.standard_normal(SHAPES[n])).astype(np.float32) for n in names}
    header = dict(device_id="a", round=1, base_version=0, num_samples=int(rng.integers(1, 500)), kind="delta")
    accuracy = None
    if wrong == "round":
        header["round"] = int(rng.integers(2, 2**31))
    elif wrong == "base":
        header["base_version"] = int(rng.integers(1, 2**31))
    elif wrong == "device":
        header["device_id"] = "b" + str(seed)
    elif wrong == "shape":
        n = names[0]
        tensors[n] = rng.standard_normal((*SHAPES[n][::-1], 1)).astype(np.float32)
    elif wrong == "name":
        tensors["extra." + str(seed)] = np.ones(3, np.float32)
    elif wrong == "norm":
        tensors[names[0]] = tensors[names[0]] + np.float32(1e5)
        encoding = "fp32"  # beyond fp16, and topk would drop most of it
    elif wrong == "kind":
        header["kind"] = str(rng.choice(["weights", "activation", "gradient"]))
    elif wrong == "samples":
        header["num_samples"] = 0
    else:
        accuracy = str(rng.choice(["1.5", "-0.1", "nan", "inf", "abc"]))
    push(target, encode(UpdateHeader(**header), tensors, encoding), accuracy=accuracy)
