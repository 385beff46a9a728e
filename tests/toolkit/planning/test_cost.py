"""The cost model: monotonic in what it should be, and a calibration that recovers a known truth."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.errors import PlanError
from toolkit.models import load_model
from toolkit.planning import Calibration, Choice, CostModel, fit_calibration, shipped_calibration
from toolkit.planning.cost import KINDS, block_costs, predict_block
from toolkit.profiling import BlockTiming, DeviceProfile, Link

MODEL = load_model("small_cnn")
COST = CostModel(MODEL)
N = len(MODEL.block_names)


def _phone(gflops=20.0, up=9.0, down=30.0, rtt=40.0, **changes) -> DeviceProfile:
    return DeviceProfile(name="p", source="catalog", cpu_cores=8, gflops=gflops, memory_mb=900,
                         link=Link(uplink_mbps=up, downlink_mbps=down, rtt_ms=rtt), **changes)


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
    measured = BlockTiming(model_id="small_cnn", batch=32, seconds={c.name: 3 * m for c, m in zip(costs, modelled)})

    fwd = COST.forward_seconds(_phone(block_timings=(measured,)), 32)

    assert fwd == pytest.approx([3 * m for m in modelled])
    stale = BlockTiming(model_id="small_cnn", batch=32, seconds={"features.0": 1.0})
    with pytest.raises(PlanError, match="do not match the model's: re-run `fedkit profile --model small_cnn`"):
        COST.forward_seconds(_phone(block_timings=(stale,)), 32)


def test_calibration_recovers_known_costs():
    truth = Calibration(model_id="small_cnn", host_gflops=100.0, op_overhead=2e6,
                        cost={"conv": 1.0, "pointwise": 1.3, "depthwise": 8.0, "linear": 1.1, "elementwise": 0.5,
                              "weight_reads": 2.0})
    costs = block_costs(MODEL)
    profiles = [
        DeviceProfile(name="host", source="local", cpu_cores=2, gflops=100.0, memory_mb=1000,
                      kernel_gflops={"conv": 100.0, "depthwise": 100 / 8, "pointwise": 100 / 1.3, "matmul": 100 / 1.1},
                      block_timings=(BlockTiming(model_id="small_cnn", batch=b,
                                                 seconds={c.name: predict_block(c, truth, 100.0, b) for c in costs}),))
        for b in (1, 32)
    ]

    fitted = fit_calibration(MODEL, profiles)

    for c in costs:
        for b in (1, 32):
            assert predict_block(c, fitted, 100.0, b) == pytest.approx(predict_block(c, truth, 100.0, b), rel=1e-3)
    assert fitted.error["block_max_b32"] < 1e-3
    assert fitted.efficiency["depthwise"] == pytest.approx(1 / 8, rel=1e-3)
    with pytest.raises(PlanError, match="no block timings of small_cnn"):
        fit_calibration(MODEL, [_phone()])


def test_shipped_calibration_says_depthwise_is_less_efficient():
    cal = shipped_calibration()

    assert set(cal.cost) == set(KINDS)
    assert cal.efficiency["depthwise"] < cal.efficiency["pointwise"] / 2
    assert cal.error  # the fit's error travels with it
