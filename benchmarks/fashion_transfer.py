"""B1 — fashion-transfer: MobileNetV2 → Fashion-MNIST on 20 emulated phones (BENCHMARKS.md).

Every run is ``fedkit simulate`` (one OS process per phone, the real aggregator on loopback):
20 phones (4 catalogue classes × 5), Dirichlet(0.5) label skew of the 60,000 training images
(seed 0), all phones every round, 1 local epoch, batch 32, SGD lr 0.01 momentum 0.9 (fresh each
round), FedAvg by samples, the global model evaluated on the 10,000 test images after every
round. Phones run at host speed (no compute slowdown: the figures here are accuracy and
bytes); links are shaped in-process from each class's cellular link.

- A-int8 and A-fp32: variant A (classifier only), int8 updates and the same run in fp32.
- B-int8: variant B, the planner's depth per phone (planner slack 0.5), capped at 2 blocks
  (features.18 + classifier): three blocks diverge at lr 0.01 (their BatchNorm statistics are
  frozen).

Figures: final accuracy against the centralized reference (benchmarks/results/central.json),
uplink payload bytes (accepted updates) and the int8/fp32 ratio, wall time, the peak RSS of a
phone process. ``--rounds N`` runs fewer rounds (recorded in the JSON). Prints one JSON line
and writes it to benchmarks/results/fashion_transfer.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULT = Path(__file__).parent / "results" / "fashion_transfer.json"
CLASSES = ("flagship-2023", "upper-mid-2023", "mid-2022", "low-2022")


def config(name: str, rounds: int, encoding: str, depth: str) -> dict:
    return {
        "name": name,
        "model": "mobilenet_v2",
        "depth": depth,
        "planner_slack": 0.5,
        "max_train_blocks": 2,
        "encoding": encoding,
        "train_images": 60000,
        "test_images": 10000,
        "partition": "dirichlet",
        "alpha": 0.5,
        "seed": 0,
        "compute": "none",
        "deadline_s": 600,
        "min_reports": 20,
        "timeout_s": 3600,
        "phones": [{"class": c, "count": 5} for c in CLASSES],
        "stages": [{"name": "b1", "rounds": rounds, "lr": 0.01, "momentum": 0.9, "local_epochs": 1, "batch_size": 32,
                    "encoding": encoding, "trainable_blocks": 1 if depth == "head" else 2}],
    }


def run(name: str, rounds: int, encoding: str, depth: str, root: Path) -> dict:
    from toolkit.simulation import parse_simulation, simulate

    t = time.perf_counter()
    s = simulate(parse_simulation(config(name, rounds, encoding, depth)), root / name)
    metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "final_accuracy": s["final_accuracy"],
        "accuracy_per_round": [m["accuracy"] for m in metrics],
        "rounds": s["rounds"],
        "uplink_payload_bytes": s["bytes_accepted"],
        "updates_accepted": s["updates_accepted"],
        "wall_s": round(time.perf_counter() - t, 1),
        "train_s": s["train_s"],
        "phone_peak_rss_mb": max((p["peak_rss_mb"] or 0) for p in s["phones"]),
        "bundles": sorted({b for p in s["phones"] for b in p["bundles"]}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--runs", default="A-int8,A-fp32,B-int8")
    args = parser.parse_args()
    from toolkit import __version__
    from toolkit.simulation.fleet import central_reference

    runs = {"A-int8": ("int8", "head"), "A-fp32": ("fp32", "head"), "B-int8": ("int8", "plan")}
    results = {}
    with tempfile.TemporaryDirectory(prefix="b1-") as tmp:
        for name in args.runs.split(","):
            encoding, depth = runs[name]
            results[name] = run(name, args.rounds, encoding, depth, Path(tmp))
    figures = {"runs": results}
    ref = central_reference("mobilenet_v2")
    figures["central_final_accuracy"] = ref["final_accuracy"] if ref else None
    if "A-int8" in results and "A-fp32" in results:
        a8, a32 = results["A-int8"], results["A-fp32"]
        figures["A_int8_minus_fp32_points"] = round(100 * (a8["final_accuracy"] - a32["final_accuracy"]), 2)
        figures["A_uplink_fp32_over_int8"] = round(a32["uplink_payload_bytes"] / a8["uplink_payload_bytes"], 2)
    if "A-int8" in results and "B-int8" in results:
        figures["B_minus_A_points"] = round(100 * (results["B-int8"]["final_accuracy"] - results["A-int8"]["final_accuracy"]), 2)
    import numpy
    import onnxruntime

    out = {
        "name": "fashion_transfer",
        "config": {
            "rounds": args.rounds, "full_b1_rounds": 30, "phones": 20, "classes": list(CLASSES), "alpha": 0.5, "seed": 0,
            "lr": 0.01, "momentum": 0.9, "batch_size": 32, "local_epochs": 1, "planner_slack_B": 0.5, "max_depth_B": 2,
            "compute": "host speed (no slowdown)", "links": "in-process, each class's cellular link",
            "versions": {"fedkit": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        },
        "figures": figures,
    }
    line = json.dumps(out)
    print(line)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
