"""B6 — early exits: MobileNetV2 with exits on B1's data and split, 20 phones (BENCHMARKS.md).

Every run is ``fedkit simulate`` (one OS process per phone, the real aggregator on loopback):
MobileNetV2 with its default exits (positions 7, 11, 14, 17 and the final classifier, 21), 20
phones of four catalogue classes × 5, one of them weak (entry-2018: 6.7 GFLOP/s, 230 MB, 4G),
B1's Dirichlet(0.5) split, 1 local epoch, batch 32, SGD lr 0.01 momentum 0.9, int8 updates,
the multi-exit loss with every weight 1. Every phone trains the branches it holds and, when it
holds them, the last two blocks (``train_blocks = 2``: features.18 and the classifier, as B1-B).
Phones run at host speed: the figures here are accuracy, FLOPs and the planner's choices.

- ``plan``: each phone's exit from the planner's rule (``exit_policy = "plan"``), with a round
  budget of ``SLACK`` over the fastest phone's round at the final exit.
- ``random``: the patent's random assignment (``exit_policy = "random"``), the same fleet.
- ``weak-out``: the weak class left out (its five shards of the same 20-way split unused).

Figures: (a) every exit's accuracy per round and after the last, and the best exit-point
version the aggregator kept (S5.5); (b) early-exit inference on the plan run's final global
model: accuracy against mean MFLOPs per image over thresholds (max softmax), against the final
exit alone (the plain model, no branches), and the cheapest threshold within 0.5 point of it;
(c) the weak class's per-round compute at its exit against training to the final exit: the
planner's cost model, and one round measured alone on this host (LocalTrainer on its shard);
(d) plan against weak-out; (e) plan against random. Prints one JSON line and writes
benchmarks/results/early_exit.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from toolkit.benchmarking import B1_DATA, RESULTS, library_versions, write_result

RESULT = RESULTS / "early_exit.json"  # read back: runs not asked for keep their figures
MODEL = "mobilenet_v2+exits"
CLASSES = ("flagship-2023", "mid-2022", "low-2022", "entry-2018")
WEAK = "entry-2018"
SLACK = 1.0  # the round budget: up to 2x the fastest phone's round at the final exit
TRAIN_BLOCKS = 2
LR = 0.01
TOLERANCE = 0.005  # (b): "the same accuracy as the final exit" within half a point


def config(name: str, rounds: int, policy: str, weak_left_out: bool) -> dict:
    return {
        "name": name,
        "model": MODEL,
        "mode": "federated",
        "depth": "head",
        "train_blocks": TRAIN_BLOCKS,
        "planner_slack": SLACK,
        "exit_policy": policy,
        "encoding": "int8",
        **B1_DATA,
        "compute": "none",
        "memory_cap": False,  # the weak class's 230 MB would cap the address space, not the memory
        "deadline_s": 600,
        "min_reports": 15 if weak_left_out else 20,
        "timeout_s": 5400,
        "phones": [
            {"class": c, "count": 5, **({"left_out": True} if weak_left_out and c == WEAK else {})} for c in CLASSES
        ],
        "stages": [{"name": "b6", "rounds": rounds, "lr": LR, "momentum": 0.9}],
    }


def run(name: str, rounds: int, policy: str, weak_left_out: bool, root: Path) -> dict:
    from toolkit.simulation import parse_simulation, simulate

    t = time.perf_counter()
    s = simulate(parse_simulation(config(name, rounds, policy, weak_left_out)), root / name).model_dump()
    metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((root / name / "plan.json").read_text())
    exits_per_round = [m["exit_accuracy"] for m in metrics if m.get("exit_accuracy")]
    return {
        "final_accuracy": s["final_accuracy"],
        "exit_accuracy_final": exits_per_round[-1] if exits_per_round else None,
        "exit_accuracy_per_round": exits_per_round,
        "best": s["best_exit"],
        "rounds": s["rounds"],
        "uplink_payload_bytes": s["bytes_accepted"],
        "updates_accepted": s["updates_accepted"],
        "wall_s": round(time.perf_counter() - t, 1),
        "phone_peak_rss_mb": max((p["peak_rss_mb"] or 0) for p in s["phones"]),
        "exit_per_class": {p["profile"]: None if p["plan"] is None else p["plan"]["cut"] for p in plan["phones"]},
        "run_dir": str(root / name),
    }


def inference_curve(run_dir: Path) -> dict:
    """(b): the early-exit curve over the default thresholds from every exit's logits on the
    10,000 test images with the run's last global model (``exit_logits.npz``, written by the
    run), against the final exit alone (the plain model's FLOPs, no branch run)."""
    from device_runtime.early_exit import early_exit_curve, final_exit_alone
    from toolkit.simulation.summary import ExitLogits

    saved = ExitLogits.load(run_dir)
    if saved is None:
        raise SystemExit(f"{run_dir} has no exit_logits.npz: the run did not train an exit model")
    alone = final_exit_alone(saved.logits, saved.labels, saved.alone_flops)
    curve = early_exit_curve(saved.logits, saved.labels, saved.flops)
    good = [p for p in curve if p.accuracy >= alone.accuracy - TOLERANCE]
    cheapest = min(good, key=lambda p: p.mean_mflops) if good else None
    return {
        "version": saved.version,
        "exit_mflops": {int(p): round(f / 1e6, 3) for p, f in zip(saved.positions, saved.flops, strict=True)},
        "final_alone": {"accuracy": alone.accuracy, "mflops": round(alone.mean_mflops, 3)},
        "curve": [
            {
                "threshold": p.threshold,
                "accuracy": p.accuracy,
                "mean_mflops": round(p.mean_mflops, 3),
                "exit_shares": [round(s, 4) for s in p.exit_shares],
            }
            for p in curve
        ],
        "cheapest_within_half_point": None
        if cheapest is None
        else {
            "threshold": cheapest.threshold,
            "accuracy": cheapest.accuracy,
            "mean_mflops": round(cheapest.mean_mflops, 3),
            "mflops_saved": round(1 - cheapest.mean_mflops / alone.mean_mflops, 4),
        },
    }


def weak_compute(weak_exit: int, root: Path) -> dict:
    """(c): the weak class's per-round compute at its exit against training to the final exit:
    the planner's cost model (round 1, frozen forward included), and one round of LocalTrainer
    on a weak phone's shard alone on this host (frozen features timed apart: the runtime
    computes them once per shard)."""
    from device_runtime.bundle import Bundle
    from device_runtime.codec import decode
    from device_runtime.local_round import Task
    from device_runtime.manifest import DevicePlan
    from device_runtime.trainer import LocalTrainer
    from toolkit.data import write_shards
    from toolkit.models import load_model
    from toolkit.planning.cost import Choice, CostModel
    from toolkit.planning.export import cached_bundle
    from toolkit.profiling import DeviceProfile, catalog_profiles

    model = load_model(MODEL)
    n = len(model.block_names)
    top = model.train_from(n, TRAIN_BLOCKS)
    plans = {
        "at_exit": DevicePlan(
            cut=weak_exit,
            train_from=min(top, weak_exit),
            exits=model.held_exits(weak_exit),
            exit_weights=(1.0,) * len(model.held_exits(weak_exit)),
        ),
        "final_exit": DevicePlan(cut=n, train_from=top, exits=model.exits, exit_weights=(1.0,) * len(model.exits)),
    }
    cost = CostModel(model)
    phone = catalog_profiles([WEAK])[0]
    edge = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=50.0, memory_mb=8192)
    predicted = {
        k: cost.round_time(Choice(p.cut, p.train_from, "ort", "int8", 32), phone, edge, 3000) for k, p in plans.items()
    }
    ids = [f"phone-{i}" for i in range(1, 21)]
    write_shards(root / "shards", ids, "dirichlet", alpha=0.5, seed=0)
    shard = root / "shards" / f"phone-{CLASSES.index(WEAK) * 5 + 1}.npz"  # five phones per class, in order
    task = Task(round=1, base_version=0, lr=LR, local_epochs=1, batch_size=32, encoding="int8", seed=0)
    measured = {}
    for k, p in plans.items():
        bundle = Bundle.load(cached_bundle(model, p, p.train_from))
        trainer = LocalTrainer(bundle, shard, root / k, holdout_fraction=0.0)
        r = trainer.run_round(task, decode(bundle.path("weights").read_bytes()).tensors)
        measured[k] = {"train_s": round(r.train_seconds, 3), "features_s": round(r.feature_seconds, 3)}
    ratio = predicted["final_exit"]["compute"] / predicted["at_exit"]["compute"]
    later = measured["final_exit"]["train_s"] / measured["at_exit"]["train_s"]
    first = (measured["final_exit"]["train_s"] + measured["final_exit"]["features_s"]) / (
        measured["at_exit"]["train_s"] + measured["at_exit"]["features_s"]
    )
    return {
        "weak_exit": weak_exit,
        "predicted_compute_s": {k: round(v["compute"], 3) for k, v in predicted.items()},
        "predicted_final_over_exit": round(ratio, 2),
        "measured": measured,
        "measured_final_over_exit_round1": round(first, 2),
        "measured_final_over_exit_later_rounds": round(later, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", default="plan,random,weak-out")
    args = parser.parse_args()

    runs = {"plan": ("plan", False), "random": ("random", False), "weak-out": ("plan", True)}
    previous = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    figures = dict(previous.get("figures", {}))
    results = dict(figures.get("runs", {}))
    with tempfile.TemporaryDirectory(prefix="b6-") as tmp:
        for name in args.runs.split(","):
            policy, weak_out = runs[name]
            results[name] = {**run(name, args.rounds, policy, weak_out, Path(tmp)), "rounds_asked": args.rounds}
            if name == "plan":
                figures["inference"] = inference_curve(Path(results[name]["run_dir"]))
                figures["weak_compute"] = weak_compute(results[name]["exit_per_class"][WEAK], Path(tmp) / "c")
        for r in results.values():
            r.pop("run_dir", None)
    figures["runs"] = results
    plan = results.get("plan")
    for other in ("random", "weak-out"):
        if plan and other in results:
            figures[f"plan_minus_{other.replace('-', '_')}_points"] = {
                "final_exit": round(100 * (plan["final_accuracy"] - results[other]["final_accuracy"]), 2),
                "per_exit": {
                    p: round(100 * (a - results[other]["exit_accuracy_final"][p]), 2)
                    for p, a in plan["exit_accuracy_final"].items()
                    if p in results[other]["exit_accuracy_final"]
                },
            }
    write_result(
        "early_exit",
        config={
            "model": MODEL,
            "rounds": {name: r.get("rounds_asked", r["rounds"]) for name, r in results.items()},
            "full_b6_rounds": 30,
            "phones": 20,
            "classes": list(CLASSES),
            "weak_class": WEAK,
            "planner_slack": SLACK,
            "train_blocks": TRAIN_BLOCKS,
            "exit_weights": "1 each",
            "alpha": 0.5,
            "seed": 0,
            "lr": LR,
            "momentum": 0.9,
            "batch_size": 32,
            "local_epochs": 1,
            "compute": "host speed (no slowdown)",
            "versions": library_versions(),
        },
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
