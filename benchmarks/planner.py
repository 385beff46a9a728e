"""B4 — split planning: the planner against every cut, the oracle, all-on-phone and all-on-edge.

MobileNetV2 (32x32 input), the B1 round: 3,000 samples per phone, 1 local epoch, batch 32.
The edge is this host (profiled now, with MobileNetV2's own block timings), one phone on it
at a time (edge_load 1, as Neurosurgeon measures a single client).

1. Calibration. This host's per-block ONNX Runtime latencies at batch 1 and 32 are measured,
   and fused parts (CALIBRATION_PARTS, each one ONNX model, as a bundle runs them) at both
   batches; the per-op-kind cost model is fitted to them (in-sample and leave-one-block-out
   errors; the parts fit the overhead of one run, which timing blocks alone counts once per
   block), and the shipped calibration (``toolkit/planning/calibration.json``, fitted on an
   earlier run of this script with ``--write-calibration``) is checked against today's
   measurements.
2. Cases: every catalogue class x 3 links (3g, 4g, wifi). Per case, all predicted:
   - the planner's choice (the documented rule: deepest training within 10% of the fastest);
   - the oracle: a brute force over the raw product of cut, train_from (any block), engine,
     encoding and batch, with the same rule; the planner must be within 5% of it;
   - the fastest choice of any depth (slack 0): what the depth rule costs in time;
   - every cut at the planner's trainable depth (the best engine, encoding and batch for it);
   - all-on-phone (cut = 21) and all-on-edge (cut 0: raw images uploaded; a baseline only,
     never planned) at the planner's depth, and the speed-up over the better of the two;
     also the latency-only speed-up (fastest plan of any depth against the fastest
     all-on-phone and all-on-edge of any depth), the figure Neurosurgeon reports.
3. Measured: the chosen choice's parts run for real on this host with ONNX Runtime at the
   planned batch (the phone's frozen part, its trainable part, the edge part), trainable parts
   counted 3x (forward + backward, the documented rule: ORT's training step itself is B5's),
   the phone's time scaled by host GFLOP/s (the conv kernel, timed in the same rounds) / phone
   GFLOP/s, plus the predicted transfers: the measured round time beside the predicted one.
   The transfers count every byte (``CostModel.transfer_bytes``), shown per case.
   Every timing (the profiles and parts of the calibration, the parts measured here) is the
   fastest run over rounds spread over seconds, as a full profile times (``probe.fastest``),
   and records how many cores other processes kept busy meanwhile (``cores_busy_elsewhere``):
   no statistic undoes load that lasts through a whole timing, so a result says when it had some.
4. Fleets: per link, the whole catalogue planned as one fleet (``Planner.plan``): every phone
   downloads the global weights from the fleet's shallowest trained block on, so the plan is
   re-priced with that download; per phone its choice and bytes, and whether it differs from
   the phone planned alone.

Prints one JSON line and writes it to benchmarks/results/planner.json.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from android_harness import probe
from toolkit import __version__
from toolkit.benchmarking import write_result
from toolkit.models import load_model
from toolkit.planning import PlanConfig, Planner, fit_calibration, shipped_calibration
from toolkit.planning.cost import TRAIN_FACTOR, Choice, PartTiming, block_costs, predict_block, predict_part
from toolkit.profiling import catalog_profiles, link, measure_local
from toolkit.profiling.kernels import export_part, kernels
from toolkit.profiling.local import FULL_REPEATS, FULL_SECONDS

ROOT = Path(__file__).resolve().parent
CALIBRATION = ROOT.parent / "toolkit" / "planning" / "calibration.json"
SEED = 0
LINKS = ("3g", "4g", "wifi")
# Fused parts timed for the calibration: the whole model and three thirds of it, so the fit
# sees runs of many blocks at once (one run overhead) and of different feed sizes
CALIBRATION_PARTS = ((0, 21), (0, 7), (7, 14), (14, 21))  # MobileNetV2 has 21 blocks


def busy_elsewhere(measure):
    """``measure()``, and how many cores other processes kept busy meanwhile (None where
    unknown): load that lasts through a whole timing skews it, so every timing says."""
    before, started = probe.cpu_seconds(), time.perf_counter()
    out = measure()
    return out, probe.cores_elsewhere(before, time.perf_counter() - started)


def calibrate(model, write: bool):
    """Measures this host, fits the cost model, and checks the shipped fit on today's data."""
    busy = {}
    at1, busy["profile_b1"] = busy_elsewhere(
        lambda: measure_local(quick=False, model=model, batch=1, name="edge (this host)")
    )
    at32, busy["profile_b32"] = busy_elsewhere(
        lambda: measure_local(quick=False, model=model, batch=32, name="edge (this host)")
    )
    timings = [at1.timing(model.model_id), at32.timing(model.model_id)]
    with tempfile.TemporaryDirectory(prefix="fedkit-b4-cal-") as tmp:
        spans = [(start, stop, b) for b in (1, 32) for start, stop in CALIBRATION_PARTS]
        (host_gflops, seconds), busy["parts"] = busy_elsewhere(lambda: time_parts(model, spans, Path(tmp)))
    parts = [PartTiming(start, stop, b, seconds[(start, stop, b)], host_gflops) for start, stop, b in spans]
    fresh = fit_calibration(model, [at1, at32], parts)
    if write:
        CALIBRATION.write_text(fresh.model_dump_json(indent=1) + "\n")
    shipped = shipped_calibration()
    costs = block_costs(model)
    shipped_error = {}
    for profile, timing in zip((at1, at32), timings, strict=True):
        rel = [predict_block(c, shipped, profile.gflops, timing.batch) / timing.seconds[c.name] - 1 for c in costs]
        total = (
            sum(predict_block(c, shipped, profile.gflops, timing.batch) for c in costs) / sum(timing.seconds.values())
            - 1
        )
        shipped_error[f"block_mean_b{timing.batch}"] = float(np.mean(np.abs(rel)))
        shipped_error[f"model_b{timing.batch}"] = float(total)
    for part in parts:
        predicted = predict_part(costs[part.start : part.stop], shipped, part.gflops, part.batch)
        shipped_error[f"part_{part.start}_{part.stop}_b{part.batch}"] = predicted / part.seconds - 1
    return at32, fresh, shipped, shipped_error, busy


def best_at(planner, phone, depth, encoding, batch, cut):
    """The fastest choice at this cut that trains ``depth`` blocks with this encoding and batch
    and fits the phone (train_from and engine free); None when nothing fits."""
    options = []
    for train_from in range(planner.n + 1):
        if planner.depth(train_from) != depth or (cut == planner.n and train_from >= cut):
            continue
        for engine in ["ort"] if cut == 0 else planner.engines(phone, cut, min(train_from, cut)):
            options.append(Choice(cut, train_from, engine, encoding, batch))
    evaluated = [e for e in planner.evaluate_all(phone, options) if e.memory_mb <= phone.memory_mb]
    return min(evaluated, key=lambda e: e.predicted["total"], default=None)


def fastest_where(planner, phone, cuts):
    options = [c for c in planner.candidates(phone) if c.cut in cuts]
    if 0 in cuts:
        options += [
            Choice(0, t, "ort", enc, b)
            for t in range(planner.n)
            for enc in planner.config.encodings
            for b in planner.config.batches
        ]
    evaluated = [e for e in planner.evaluate_all(phone, options) if e.memory_mb <= phone.memory_mb]
    return min(e.predicted["total"] for e in evaluated)


def time_parts(model, spans, folder: Path) -> tuple[float, dict[tuple[int, int, int], float]]:
    """The host's dense-conv GFLOP/s, and the seconds of one ONNX Runtime forward of each part
    {(start, stop, batch): seconds}, each exported as one model. Timed as a full profile times
    blocks (``probe.fastest``, with its session options): every part round-robin with the
    others and the conv kernel, the fastest run of each, over FULL_REPEATS rounds or more spread
    over FULL_SECONDS, so the conv kernel, the parts and the profile's blocks share one
    definition of the host's speed and load from other processes spreads over all of them."""
    options = probe.session_options()
    runs = {}
    for start, stop, batch in spans:
        path = folder / f"part_{start}_{stop}_b{batch}.onnx"
        shape = export_part(model, start, stop, batch, path)
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input": np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)}
        runs[(start, stop, batch)] = lambda session=session, feed=feed: session.run(None, feed)
    # the host's dense-conv GFLOP/s, timed in the same rounds: the emulation's scale factor
    proto, shape, conv_flops = kernels()["conv"]
    conv = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    conv_feed = {"input": np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)}
    runs["conv"] = lambda: conv.run(None, conv_feed)
    best = dict(zip(runs, probe.fastest(list(runs.values()), FULL_REPEATS, FULL_SECONDS), strict=True))
    return conv_flops / best.pop("conv") / 1e9, best


def measure_choices(model, keys, folder: Path) -> tuple[float, dict[tuple, tuple[float, float, float]]]:
    """The host's dense-conv GFLOP/s, and the host seconds per batch of each choice's parts,
    ONNX Runtime forward at the planned batch: {(cut, train_from, batch): (phone frozen part,
    phone trainable part, edge part)}."""
    n = len(model.block_names)

    def parts(cut, train_from):
        return ((0, min(train_from, cut)), (min(train_from, cut), cut), (cut, n))

    spans = sorted(
        {
            (start, stop, batch)
            for cut, train_from, batch in keys
            for start, stop in parts(cut, train_from)
            if start < stop
        }
    )
    host_gflops, best = time_parts(model, spans, folder)
    return host_gflops, {
        (cut, train_from, batch): tuple(best.get((start, stop, batch), 0.0) for start, stop in parts(cut, train_from))
        for cut, train_from, batch in keys
    }


def fleet_case(planner, link_name: str) -> dict:
    """The catalogue on one link planned as one fleet: each phone's choice and bytes, priced
    with the fleet's download, against the same phone planned alone."""
    phones = catalog_profiles(link_name=link_name)
    fleet = planner.plan(phones)
    per_phone, changed = {}, 0
    for phone, planned in zip(phones, fleet.phones, strict=True):
        alone = planner.plan_phone(phone)
        if planned.plan is None:
            per_phone[phone.name] = {"infeasible": planned.reason}
            continue
        d = planned.plan
        same = alone.plan is not None and (
            alone.plan.cut,
            alone.plan.train_from,
            alone.plan.encoding,
            alone.plan.batch_size,
        ) == (d.cut, d.train_from, d.encoding, d.batch_size)
        changed += not same
        per_phone[phone.name] = {
            "cut": d.cut,
            "train_from": d.train_from,
            "encoding": d.encoding,
            "batch": d.batch_size,
            "total_s": d.predicted["total"],
            "down_bytes": d.predicted["down_bytes"],
            "up_bytes": d.predicted["up_bytes"],
            "alone": None
            if alone.plan is None
            else {
                "cut": alone.plan.cut,
                "train_from": alone.plan.train_from,
                "total_s": alone.plan.predicted["total"],
                "down_bytes": alone.plan.predicted["down_bytes"],
            },
        }
    trained = [p.plan.train_from for p in fleet.phones if p.plan is not None]
    downs = [p["down_bytes"] for p in per_phone.values() if "down_bytes" in p]
    return {
        "fed_from": min(trained, default=None),
        "down_mb": max(downs, default=0) / 1e6,
        "changed": changed,
        "phones": per_phone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write-calibration", action="store_true", help="refit and ship toolkit/planning/calibration.json"
    )
    args = parser.parse_args()
    torch.manual_seed(SEED)
    started = time.perf_counter()
    model = load_model("mobilenet_v2")
    edge, fresh, shipped, shipped_error, calibration_busy = calibrate(model, args.write_calibration)
    config = PlanConfig()
    planner = Planner(model, edge, config, shipped)
    n = planner.n
    raw_planner = Planner(model, edge, config.model_copy(update={"allow_raw_upload": True}), shipped)
    fastest_planner = Planner(model, edge, config.model_copy(update={"slack": 0.0}), shipped)

    cases = []
    folder = Path(tempfile.mkdtemp(prefix="fedkit-b4-"))
    for link_name in LINKS:
        for phone in catalog_profiles(link_name=link_name):
            chosen = planner.plan_phone(phone)
            oracle = planner.oracle(phone)
            fastest = fastest_planner.plan_phone(phone)
            case = {"class": phone.name, "link": link_name, "phone_gflops": phone.gflops, "memory_mb": phone.memory_mb}
            if chosen.plan is None:
                cases.append({**case, "infeasible": chosen.reason})
                continue
            plan, depth = chosen.plan, chosen.trainable_blocks
            total = plan.predicted["total"]
            sweep = {}
            for cut in range(0, n + 1):
                best = best_at(raw_planner, phone, depth, plan.encoding, plan.batch_size, cut)
                sweep[cut] = None if best is None else round(best.predicted["total"], 4)
            all_phone, all_edge = sweep[n], sweep[0]
            baselines = [t for t in (all_phone, all_edge) if t is not None]
            fastest_total = fastest.plan.predicted["total"]
            fastest_phone = fastest_where(raw_planner, phone, {n})
            fastest_edge = fastest_where(raw_planner, phone, {0})
            cases.append(
                {
                    **case,
                    "choice": {
                        "cut": plan.cut,
                        "train_from": plan.train_from,
                        "trainable_blocks": depth,
                        "engine": plan.engine,
                        "encoding": plan.encoding,
                        "batch": plan.batch_size,
                    },
                    "predicted": plan.predicted,
                    "oracle_total": oracle.plan.predicted["total"],
                    "oracle_same_choice": oracle.plan == plan,
                    "gap_vs_oracle": total / oracle.plan.predicted["total"] - 1,
                    "fastest_any_depth": {
                        "total": fastest.plan.predicted["total"],
                        "cut": fastest.plan.cut,
                        "trainable_blocks": fastest.trainable_blocks,
                    },
                    "time_cost_of_depth_rule": total / fastest.plan.predicted["total"] - 1,
                    "every_cut_at_this_depth": sweep,
                    "best_cut_at_this_depth": min((t, c) for c, t in sweep.items() if t is not None and c > 0)[1],
                    "all_on_phone": all_phone,
                    "all_on_edge_raw_upload": all_edge,
                    "speedup_vs_better_baseline": (min(baselines) / total) if baselines else None,
                    "latency_only": {
                        "fastest_private": fastest_total,
                        "fastest_all_on_phone": fastest_phone,
                        "fastest_all_on_edge_raw_upload": fastest_edge,
                        "speedup_vs_all_on_phone": fastest_phone / fastest_total,
                        "speedup_vs_all_on_edge": fastest_edge / fastest_total,
                        "speedup_vs_better": min(fastest_phone, fastest_edge) / fastest_total,
                    },
                    "measured": {},  # filled in below, once every choice's parts are timed together
                }
            )
    fleets = {link_name: fleet_case(planner, link_name) for link_name in LINKS}
    feasible = [c for c in cases if "choice" in c]
    keys = sorted({(c["choice"]["cut"], c["choice"]["train_from"], c["choice"]["batch"]) for c in feasible})
    (host_gflops, host_seconds), measuring_busy = busy_elsewhere(lambda: measure_choices(model, keys, folder))
    shutil.rmtree(folder)
    for c in feasible:
        ch, predicted = c["choice"], c["predicted"]
        frozen_s, trainable_s, edge_s = host_seconds[(ch["cut"], ch["train_from"], ch["batch"])]
        batches = config.local_epochs * math.ceil(config.samples / ch["batch"])
        compute = batches * (frozen_s + TRAIN_FACTOR * trainable_s) * host_gflops / c["phone_gflops"]
        edge_time = batches * TRAIN_FACTOR * edge_s * config.edge_load
        total = compute + edge_time + predicted["upload"] + predicted["download"]
        c["measured"] = {
            "compute": compute,
            "edge": edge_time,
            "total": total,
            "host_seconds_per_batch": {"frozen": frozen_s, "trainable": trainable_s, "edge": edge_s},
            "host_gflops": host_gflops,
        }
        c["measured_vs_predicted"] = total / predicted["total"] - 1
        c["measured_vs_predicted_compute"] = compute / predicted["compute"] - 1
    gaps = [c["gap_vs_oracle"] for c in feasible]
    speedups = [c["speedup_vs_better_baseline"] for c in feasible if c["speedup_vs_better_baseline"]]
    latency = [c["latency_only"] for c in feasible]
    errors = [abs(c["measured_vs_predicted"]) for c in feasible]
    figures = {
        "summary": {
            "cases": len(cases),
            "infeasible": len(cases) - len(feasible),
            "planner_within_5pct_of_oracle_every_case": all(g <= 0.05 for g in gaps),
            "max_gap_vs_oracle": max(gaps),
            "median_speedup_vs_better_of_phone_and_edge_same_depth": statistics.median(speedups),
            "mean_speedup_vs_better_of_phone_and_edge_same_depth": statistics.fmean(speedups),
            "latency_only_median_speedup_vs_all_on_phone": statistics.median(
                x["speedup_vs_all_on_phone"] for x in latency
            ),
            "latency_only_max_speedup_vs_all_on_phone": max(x["speedup_vs_all_on_phone"] for x in latency),
            "latency_only_median_speedup_vs_all_on_edge": statistics.median(
                x["speedup_vs_all_on_edge"] for x in latency
            ),
            "latency_only_median_speedup_vs_better": statistics.median(x["speedup_vs_better"] for x in latency),
            "latency_only_mean_speedup_vs_better": statistics.fmean(x["speedup_vs_better"] for x in latency),
            "splitfed_choices": sum(c["choice"]["cut"] < n for c in feasible),
            "median_abs_measured_vs_predicted": statistics.median(errors),
            "cores_busy_elsewhere_while_measuring": measuring_busy,
            "max_abs_measured_vs_predicted": max(errors),
            "max_time_cost_of_depth_rule": max(c["time_cost_of_depth_rule"] for c in feasible),
            "fleet_download_mb": {name: f["down_mb"] for name, f in fleets.items()},
            "fleet_choices_changed_by_fleet_download": {name: f["changed"] for name, f in fleets.items()},
        },
        "calibration": {
            "fresh_fit": fresh.model_dump(),
            "shipped_on_todays_measurements": shipped_error,
            "host_kernel_gflops": edge.kernel_gflops,
            "cores_busy_elsewhere": calibration_busy,
        },
        "cases": cases,
        "fleets": fleets,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    write_result(
        "planner",
        config={
            "model": "mobilenet_v2",
            "plan": config.model_dump(),
            "links": {name: link(name).model_dump() for name in LINKS},
            "edge": {"name": edge.name, "gflops": edge.gflops, "cores": edge.cpu_cores},
            "oracle": "brute force over the raw product of cut 1..21, train_from 0..cut, engine, encoding, batch; "
            "same rule",
            "measured": "ONNX Runtime forward of the real parts on this host at the planned batch; trainable parts x3 "
            "(forward + backward, the documented rule); phone parts x host/phone GFLOP/s; plus the predicted transfers",
            "timing": f"every block, part and kernel (the conv kernel: host GFLOP/s) the fastest run of >= "
            f"{FULL_REPEATS} round-robin rounds spread over >= {FULL_SECONDS:g} s, as `fedkit profile --full` times",
            "seed": SEED,
            "fedkit": __version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        figures=figures,
    )


if __name__ == "__main__":
    main()
