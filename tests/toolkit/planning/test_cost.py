"""The cost model: monotonic in what it should be, and a calibration that recovers a known truth."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_runtime.codec import UpdateHeader, decode, encode
from device_runtime.split_trainer import LABELS, LOSS, SplitTrainer
from toolkit.aggregator.coordinator import AGGREGATOR_ID
from toolkit.errors import PlanError
from toolkit.models import load_model
from toolkit.planning import (
    Calibration,
    Choice,
    CostModel,
    Pin,
    PlanConfig,
    Planner,
    fit_calibration,
    shipped_calibration,
)
from toolkit.planning.cost import ACTIVATION_ENCODING, KINDS, PartTiming, block_costs, predict_block, predict_part
from toolkit.profiling import BlockTiming, DeviceProfile, Link, links
from toolkit.splitfed import initial_weights
from toolkit.splitfed.edge import EDGE_ID

MODEL = load_model("small_cnn")
COST = CostModel(MODEL)
N = len(MODEL.block_names)


def _phone(gflops=20.0, up=9.0, down=30.0, rtt=40.0, **changes) -> DeviceProfile:
    return DeviceProfile(
        name="p",
        source="catalog",
        cpu_cores=8,
        gflops=gflops,
        memory_mb=900,
        link=Link(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt),
        **changes,
    )


EDGE = _phone(gflops=200.0)


def _time(choice, phone=None, edge=EDGE, **kw):
    return COST.round_time(choice, phone or _phone(), edge, samples=1000, **kw)


SPLIT = Choice(cut=2, train_from=1, engine="ort", encoding="int8", batch=32)


@settings(max_examples=25, deadline=None)
@given(up=st.floats(0.1, 1000), factor=st.floats(1.01, 100))
def test_more_uplink_means_less_upload_time(up, factor):
    slow = _time(SPLIT, _phone(up=up))
    fast = _time(SPLIT, _phone(up=up * factor))

    assert fast["upload"] < slow["upload"]
    assert fast["download"] == slow["download"] and fast["compute"] == slow["compute"]


@settings(max_examples=25, deadline=None)
@given(gflops=st.floats(0.5, 500), factor=st.floats(1.01, 100))
def test_faster_phone_means_less_compute(gflops, factor):
    assert _time(SPLIT, _phone(gflops=gflops * factor))["compute"] < _time(SPLIT, _phone(gflops=gflops))["compute"]


def test_rtt_down_bandwidth_edge_load_and_bits_move_their_own_terms():
    base = _time(SPLIT)

    assert _time(SPLIT, _phone(rtt=5))["upload"] < base["upload"]
    assert _time(SPLIT, _phone(down=300))["download"] < base["download"]
    assert _time(SPLIT, edge_load=4)["edge"] == pytest.approx(4 * base["edge"])
    fp32 = Choice(**{**SPLIT.__dict__, "encoding": "fp32"})
    assert _time(fp32)["upload"] > base["upload"]
    assert base["total"] == pytest.approx(sum(base[k] for k in ("compute", "upload", "download", "edge")))


def test_training_deeper_costs_compute_and_memory():
    head = Choice(cut=N, train_from=N - 1, engine="ort", encoding="int8", batch=32)
    deep = Choice(cut=N, train_from=0, engine="ort", encoding="int8", batch=32)

    assert _time(deep)["compute"] > _time(head)["compute"]
    assert COST.memory_mb(deep) > COST.memory_mb(head)
    bigger = Choice(**{**deep.__dict__, "batch": 64})
    assert COST.memory_mb(bigger) > COST.memory_mb(deep)
    # all on the phone: no activations travel and the edge does nothing
    assert _time(head)["edge"] == 0


def test_split_moves_work_to_the_edge():
    all_phone = _time(Choice(cut=N, train_from=0, engine="ort", encoding="int8", batch=32))
    split = _time(Choice(cut=1, train_from=0, engine="ort", encoding="int8", batch=32))

    assert split["compute"] < all_phone["compute"]
    assert split["edge"] > 0 and split["upload"] > all_phone["upload"]


def test_measured_block_timings_take_precedence():
    costs = block_costs(MODEL)
    cal = shipped_calibration()
    modelled = [predict_block(c, cal, 20.0, 32) for c in costs]
    measured = BlockTiming(
        model_id="small_cnn", batch=32, seconds={c.name: 3 * m for c, m in zip(costs, modelled, strict=True)}
    )

    fwd = COST.forward_seconds(_phone(block_timings=(measured,)), 32)

    # each block 3x the model's, its own run (the probe's, not the part's) taken out
    assert fwd == pytest.approx(3 * COST.forward_seconds(_phone(), 32))
    stale = BlockTiming(model_id="small_cnn", batch=32, seconds={"features.0": 1.0})
    with pytest.raises(PlanError, match="do not match the model's: re-run `fedkit profile --model small_cnn`"):
        COST.forward_seconds(_phone(block_timings=(stale,)), 32)


def test_calibration_recovers_known_costs():
    truth = Calibration(
        model_id="small_cnn",
        host_gflops=100.0,
        op_overhead=2e6,
        run_overhead=5e5,
        run_byte_cost=3.0,
        cost={"conv": 1.0, "pointwise": 1.3, "depthwise": 8.0, "linear": 1.1, "elementwise": 0.5, "weight_reads": 2.0},
    )
    costs = block_costs(MODEL)
    profiles = [
        DeviceProfile(
            name="host",
            source="local",
            cpu_cores=2,
            gflops=100.0,
            memory_mb=1000,
            kernel_gflops={"conv": 100.0, "depthwise": 100 / 8, "pointwise": 100 / 1.3, "matmul": 100 / 1.1},
            block_timings=(
                BlockTiming(
                    model_id="small_cnn", batch=b, seconds={c.name: predict_block(c, truth, 100.0, b) for c in costs}
                ),
            ),
        )
        for b in (1, 32)
    ]
    spans = [(0, N, 1), (0, N, 32), (0, 2, 32), (2, N, 1)]
    parts = [PartTiming(a, z, b, predict_part(costs[a:z], truth, 100.0, b), 100.0) for a, z, b in spans]

    fitted = fit_calibration(MODEL, profiles, parts)

    for c in costs:
        for b in (1, 32):
            assert predict_block(c, fitted, 100.0, b) == pytest.approx(predict_block(c, truth, 100.0, b), rel=1e-3)
    assert predict_part(costs, fitted, 100.0, 32) == pytest.approx(predict_part(costs, truth, 100.0, 32), rel=1e-3)
    assert fitted.run_overhead == pytest.approx(5e5, rel=1e-2)
    assert fitted.error["block_max_b32"] < 1e-3 and abs(fitted.error["part_0_5_b32"]) < 1e-3
    assert fit_calibration(MODEL, profiles).run_overhead == 0  # without parts it cannot be told apart
    assert fitted.efficiency["depthwise"] == pytest.approx(1 / 8, rel=1e-3)
    with pytest.raises(PlanError, match="no block timings of small_cnn"):
        fit_calibration(MODEL, [_phone()])


def test_shipped_calibration_says_depthwise_is_less_efficient():
    cal = shipped_calibration()

    assert set(cal.cost) == set(KINDS)
    assert cal.efficiency["depthwise"] < cal.efficiency["pointwise"] / 2
    assert cal.error  # the fit's error travels with it


# -- every byte a round moves ------------------------------------------------------------------


def _header_bytes(header: UpdateHeader) -> int:
    """The container's JSON header, which encoded_size leaves out (it depends on the sender)."""
    return len(json.dumps(dataclasses.asdict(header), sort_keys=True, separators=(",", ":")).encode())


def _weights_blob(model, fed_from: int) -> bytes:
    """A global model version as the aggregator serves it: every tensor from fed_from on, fp32
    (the SplitFed initial weights, and what Coordinator._close re-encodes each round)."""
    tensors = decode(initial_weights(model, fed_from)).tensors
    return encode(UpdateHeader(AGGREGATOR_ID, 7, 6, 3000, kind="weights"), tensors, "fp32")


@pytest.mark.parametrize("model_id, fed_from", [("small_cnn", 1), ("mobilenet_v2", 4)])
def test_a_head_phone_downloads_the_fleets_whole_global_blob(model_id, fed_from):
    # Prepare: a head-only phone in a fleet where another phone trains from fed_from
    model = MODEL if model_id == "small_cnn" else load_model(model_id)
    cost = COST if model_id == "small_cnn" else CostModel(model)
    n = len(model.block_names)
    head = Choice(cut=n, train_from=n - 1, engine="ort", encoding="int8", batch=32)
    blob = _weights_blob(model, fed_from)

    # Execute
    alone = cost.transfer_bytes(head, samples=1000)
    in_fleet = cost.transfer_bytes(head, samples=1000, fed_from=fed_from)

    # Assert: the blob's bytes exactly, but for its JSON header; alone, only the head's
    header = decode(blob).header
    assert in_fleet["down_bytes"] == len(blob) - _header_bytes(header)
    assert alone["down_bytes"] == len(_weights_blob(model, n - 1)) - _header_bytes(header)
    assert in_fleet["up_bytes"] == alone["up_bytes"] < alone["down_bytes"] < in_fleet["down_bytes"]
    if model_id == "mobilenet_v2":  # issue 13: planned at 51 KB, the phone pulled 8.9 MB
        assert in_fleet["down_bytes"] / 1e6 == pytest.approx(8.9, abs=0.05)
    # and the round's download time prices those bytes
    slow = _phone(down=1.0)
    assert cost.round_time(head, slow, EDGE, 1000, fed_from=fed_from)["download"] == pytest.approx(
        slow.link.rtt_ms / 2000 + in_fleet["down_bytes"] * 8 / 1e6
    )


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8", "int4", "sign1", "topk"])
def test_upload_is_the_real_encoded_update(encoding):
    choice = Choice(cut=N, train_from=1, engine="ort", encoding=encoding, batch=32)
    rng = np.random.default_rng(0)
    shapes = {name: shape for c in COST.costs[1:] for name, shape in c.param_shapes.items()}
    header = UpdateHeader("phone-7", 3, 2, 1000)

    payload = encode(
        header, {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}, encoding, rng=rng
    )

    assert COST.transfer_bytes(choice, samples=1000)["up_bytes"] == len(payload) - _header_bytes(header)


def test_splitfed_moves_int8_activations_up_and_gradients_down_every_batch():
    # Prepare: cut 2 of small_cnn, 70 samples of batch 32 (the last batch holds 6), 2 epochs
    cut, batch, samples = 2, 32, 70
    choice = Choice(cut=cut, train_from=1, engine="ort", encoding="fp32", batch=batch)
    name, shape = MODEL.block_names[cut - 1], COST.activation_shape(cut)
    rng = np.random.default_rng(0)
    up = down = 0
    for size in (32, 32, 6):  # messages as SplitTrainer and the edge write them
        header = UpdateHeader("phone-7", 3, 2, size, kind="activation")
        act = encode(
            header,
            {name: rng.standard_normal((size, *shape)).astype(np.float32), LABELS: np.zeros(size, np.float32)},
            {name: "int8", LABELS: "fp32"},
            rng=rng,
        )
        grad = encode(
            UpdateHeader(EDGE_ID, 3, 2, size, kind="gradient"),
            {name: rng.standard_normal((size, *shape)).astype(np.float32), LOSS: np.float32(0.5)},
            {name: "int8", LOSS: "fp32"},
            rng=rng,
        )
        up += len(act) - _header_bytes(header)
        down += len(grad) - _header_bytes(UpdateHeader(EDGE_ID, 3, 2, size, kind="gradient"))

    # Execute
    sizes = COST.transfer_bytes(choice, samples=samples, local_epochs=2)

    # Assert: the plan's encoding is the update's, not the activations' (SplitTrainer's default)
    assert inspect.signature(SplitTrainer).parameters["encoding"].default == ACTIVATION_ENCODING == "int8"
    assert sizes["activation_bytes"] == 2 * up and sizes["gradient_bytes"] == 2 * down
    predicted = COST.round_time(choice, _phone(), EDGE, samples=samples, local_epochs=2)
    for key in ("up_bytes", "down_bytes", "activation_bytes", "gradient_bytes"):
        assert predicted[key] == sizes[key]
    assert "activation_bytes" not in COST.transfer_bytes(Choice(N, 1, "ort", "int8", 32), samples=samples)


def test_features_run_once_a_round_and_training_every_epoch():
    choice = Choice(cut=N, train_from=2, engine="ort", encoding="int8", batch=32)

    one, two = _time(choice), _time(choice, local_epochs=2)

    assert one["features"] > 0 and two["features"] == pytest.approx(one["features"])
    assert two["compute"] - two["features"] == pytest.approx(2 * (one["compute"] - one["features"]))


def _fleet_phone(name, gflops, link):
    return DeviceProfile(
        name=name,
        source="catalog",
        cpu_cores=8,
        gflops=gflops,
        memory_mb=2000,
        engines=("ort", "executorch"),
        link=links()[link],
    )


def test_the_planner_prices_every_phone_with_the_fleets_download():
    # Prepare: a phone that trains deep (SplitFed, its cut pinned at 1) and one that trains its head
    planner = Planner(MODEL, EDGE, PlanConfig())
    deep, head = _fleet_phone("deep", 200.0, "wifi"), _fleet_phone("head", 0.5, "3g")
    pins = {"deep": Pin(cut=1)}
    alone = {p.name: planner.plan_phone(p, pins.get(p.name, Pin())).plan for p in (deep, head)}
    assert alone["deep"].train_from == 0 < alone["head"].train_from  # the premise

    # Execute
    fleet = planner.plan([deep, head], pins)

    # Assert: the head phone pays for the deep phone's blocks, and the plan is a fixed point
    fed_from = min(p.plan.train_from for p in fleet.phones)
    planned = {p.profile: p for p in fleet.phones}
    assert planned["head"].plan.predicted["down_bytes"] > alone["head"].predicted["down_bytes"]
    for phone in (deep, head):
        plan = planned[phone.name].plan
        choice = Choice(plan.cut, plan.train_from, plan.engine, plan.encoding, plan.batch_size)
        assert (
            plan.predicted["down_bytes"] == planner.cost.transfer_bytes(choice, 3000, fed_from=fed_from)["down_bytes"]
        )
        assert planned[phone.name] == planner.plan_phone(phone, pins.get(phone.name, Pin()), fed_from=fed_from)
    # a fleet of one is priced as the phone alone
    assert planner.plan([head]).phones[0].plan == alone["head"]


# -- early exits ----------------------------------------------------------------------------

EXIT_MODEL = load_model("small_cnn+exits:1,2")  # exits 1, 2 and the final one, 5
EXIT_COST = CostModel(EXIT_MODEL)
T = EXIT_MODEL.train_from(N, 1)  # the run's first trained block: the classifier


def test_branches_are_priced_with_the_flops_and_parameters_the_model_counts():
    stats = EXIT_MODEL.exit_stats()

    assert [c.name for c in EXIT_COST.branches] == ["exits.1", "exits.2"]
    for cost, exit_stats in zip(EXIT_COST.branches, stats[:-1], strict=True):
        assert sum(cost.flops[k] for k in ("conv", "pointwise", "depthwise", "linear")) == exit_stats.branch_flops
        assert cost.params == exit_stats.branch_params > 0
    assert EXIT_COST.costs == COST.costs  # the blocks are the plain model's


@pytest.mark.parametrize("cut, t", [(1, T), (2, T), (N, T), (N, 2)])
def test_an_exit_plan_uploads_its_trainable_tensors_and_downloads_the_runs_blob(cut, t):
    # Prepare: the tensors the phone trains, as the exporter's trainable part holds them, and
    # the run's version 0 (every branch, blocks from T on)
    train_from = min(t, cut)
    trainable = {n: p.detach().numpy() for n, p in EXIT_MODEL.trainable_part(train_from, cut).named_parameters()}
    header = UpdateHeader("phone-7", 3, 2, 1000)
    update = encode(header, trainable, "int8", rng=np.random.default_rng(0))
    blob = _weights_blob(EXIT_MODEL, t)

    # Execute
    sizes = EXIT_COST.transfer_bytes(Choice(cut, train_from, "ort", "int8", 32), samples=1000, fed_from=t)

    # Assert: every branch it holds is in its update; nothing crosses to an edge
    assert sum(name.startswith("exits.") for name in trainable) == 4 * sum(1 for p in (1, 2) if p <= cut)
    assert sizes["up_bytes"] == len(update) - _header_bytes(header)
    assert sizes["down_bytes"] == len(blob) - _header_bytes(decode(blob).header)
    assert set(sizes) == {"up_bytes", "down_bytes"}


def test_an_exit_plan_trains_its_branches_on_the_phone_and_nothing_on_the_edge():
    # Prepare: the classifier trained at the final exit, with the branches of exits 1 and 2 or
    # on the plain model
    final = Choice(N, T, "ort", "int8", 32)
    branches_only = Choice(2, 2, "ort", "int8", 32)  # exit 2 before T: no block trains

    # Execute
    exit_time = EXIT_COST.round_time(final, _phone(), EDGE, samples=1000, fed_from=T)
    plain_time = COST.round_time(final, _phone(), EDGE, samples=1000)
    early = EXIT_COST.round_time(branches_only, _phone(), EDGE, samples=1000, fed_from=T)
    early_alone = EXIT_COST.round_time(branches_only, _phone(), EDGE, samples=1000)

    # Assert: the branches' training (3 forwards a batch) on top of the blocks', and their memory
    branch_fwd = EXIT_COST.forward_seconds(_phone(), 32)[N:].sum()
    assert exit_time["compute"] - plain_time["compute"] >= 3 * math.ceil(1000 / 32) * branch_fwd
    branch_bytes = sum(4 * c.params + 32 * c.saved_bytes + 12 * c.params for c in EXIT_COST.branches)
    assert EXIT_COST.memory_mb(final) - COST.memory_mb(final) == pytest.approx(branch_bytes / 1e6)
    assert early["edge"] == exit_time["edge"] == 0 and early["compute"] > early["features"] > 0
    assert early["features"] < exit_time["features"]  # blocks [0, 2) frozen, not [0, 4)
    # exit 2 comes before T: the phone has no fed part, and still downloads the run's blob from T
    assert early["compute"] == early_alone["compute"]
    assert early["down_bytes"] == exit_time["down_bytes"] < early_alone["down_bytes"]
