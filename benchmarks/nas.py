"""B7 — architecture search over MobileNetV2 / EfficientNet-Lite0 block pools (BENCHMARKS.md).

Every search is ``toolkit.nas.run_search`` on the default config (``toolkit/nas/nas.toml``:
9 pools × 2 families = 512 networks, 8,000 proxy training images, 1,000 validation images,
2,000 held-out test images, all from Fashion-MNIST's training split at 32×32; 150 warm-up
batches; 20 controller steps × 4 sampled networks, 6 batches each; top-5 re-evaluated), only
the seed and the strategy changing.

- (a) the LSTM controller against random search with the same number of sampled networks and
  the same training per network, over seeds 0, 1, 2: the chosen network's reward and accuracy
  on the validation slice that chose it and on the held-out test slice, its parameters and
  MFLOPs; and the federated reward (the sampled networks' accuracy on 20 emulated phones'
  held-out slices of B1's split, through the aggregator) for seed 0.
- (b) the network the controller chose with seed 0 against MobileNetV2 on B1-A federated
  (``fedkit simulate``: 20 phones, 30 rounds, head only, int8; the same config as
  benchmarks/fashion_transfer.py's A-int8), and the chosen network with exits after every
  stage pool (the best exit-point version the aggregator kept): accuracy, parameters, MFLOPs,
  and the planner's round time per phone class.
- (c) each search's time: setup, warm-up, search, final re-evaluation.

Prints one JSON line and writes benchmarks/results/nas.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fashion_transfer import CLASSES
from fashion_transfer import config as b1_config

from toolkit.benchmarking import RESULTS, library_versions, write_result

RESULT = RESULTS / "nas.json"  # read back: parts not asked for keep their figures
SEEDS = (0, 1, 2)
STRATEGIES = ("controller", "random")
ROUNDS = 30
SAMPLES = 3000  # the planner's round time: about B1's mean shard


def search(strategy: str, seed: int, root: Path, reward_source: str = "server") -> dict:
    from toolkit.nas.config import default_config
    from toolkit.nas.reward import reward
    from toolkit.nas.search import run_search

    name = f"b7-{strategy}-{reward_source}-{seed}"
    overrides = {"name": name, "strategy": strategy, "seed": seed, "reward_source": reward_source}
    if reward_source == "federated":
        overrides["fleet"] = {"phones": 20}  # an emulated fleet of B1's 20 phones on this host
    config = default_config().model_copy(update=overrides)
    t = time.perf_counter()
    r = run_search(config, root / name)
    wall = time.perf_counter() - t
    c = r.chosen
    return {
        "model_id": c.model_id,
        "arch_id": c.arch_id,
        "blocks": c.description,
        "params": c.params,
        "mflops": round(c.mflops, 3),
        "val_accuracy": c.val_accuracy,
        "test_accuracy": c.test_accuracy,
        "reward": c.reward,
        "test_reward": reward(c.test_accuracy, c.params, r.baseline_params, r.beta),
        "baseline_val_accuracy": None if r.baseline_network is None else r.baseline_network.accuracy,
        "baseline_test_accuracy": r.baseline_test_accuracy,
        "best_search_reward": max(h.reward for h in r.history),
        "mean_reward_last_quarter": statistics.fmean(
            h.reward for h in r.history if h.step > 0.75 * max(s.step for s in r.steps)
        ),
        "sampled_networks": sum(1 for h in r.history if h.step > 0),
        "distinct_networks": len({h.arch_id for h in r.history}),
        "times_s": {k: round(v, 1) for k, v in r.times.model_dump().items()},
        "wall_s": round(wall, 1),
    }


def compare(runs: dict) -> dict:
    """(a)'s summary: per strategy, the mean and spread over seeds; the controller minus random."""
    out = {}
    for strategy in STRATEGIES:
        rs = [runs[f"{strategy}-{s}"] for s in SEEDS if f"{strategy}-{s}" in runs]
        if not rs:
            continue
        out[strategy] = {
            k: {
                "mean": round(statistics.fmean(r[k] for r in rs), 4),
                "sd": round(statistics.pstdev(r[k] for r in rs), 4),
            }
            for k in ("reward", "test_reward", "val_accuracy", "test_accuracy", "params", "mflops")
        }
    if len(out) == 2:
        out["controller_minus_random"] = {
            k: round(out["controller"][k]["mean"] - out["random"][k]["mean"], 4)
            for k in ("reward", "test_reward", "test_accuracy")
        }
    return out


def federated_run(name: str, model: str, root: Path) -> dict:
    from toolkit.simulation import parse_simulation, simulate

    cfg = {k: v for k, v in b1_config(name, ROUNDS, "int8", "head").items() if v is not None}
    t = time.perf_counter()
    s = simulate(parse_simulation({**cfg, "model": model}), root / name).model_dump()
    metrics = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {
        "model": model,
        "final_accuracy": s["final_accuracy"],
        "accuracy_per_round": [m["accuracy"] for m in metrics],
        "best_exit": s.get("best_exit"),
        "rounds": s["rounds"],
        "uplink_payload_bytes": s["bytes_accepted"],
        "wall_s": round(time.perf_counter() - t, 1),
        "phone_peak_rss_mb": max((p["peak_rss_mb"] or 0) for p in s["phones"]),
    }


def model_figures(model_id: str) -> dict:
    """Parameters, forward MFLOPs per image and the planner's round time per class (B1-A's
    choice: every block on the phone, the classifier trains, int8, batch 32)."""
    from toolkit.models import load_model
    from toolkit.planning.cost import Choice, CostModel
    from toolkit.profiling import DeviceProfile, catalog_profiles

    model = load_model(model_id)
    n = len(model.block_names)
    cost = CostModel(model)
    edge = DeviceProfile(name="edge", source="local", cpu_cores=2, gflops=50.0, memory_mb=8192)
    choice = Choice(n, model.train_from(n, 1), "ort", "int8", 32)
    per_class = {}
    for phone in catalog_profiles(list(CLASSES)):
        t = cost.round_time(choice, phone, edge, SAMPLES)
        per_class[phone.name] = {"round_s": round(t["total"], 2), "compute_s": round(t["compute"], 2)}
    return {
        "params": sum(s.params for s in model.stats),
        "mflops": round(sum(s.flops for s in model.stats) / 1e6, 3),
        "planned_round_s": per_class,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="a,federated,b", help="a: controller vs random; federated; b: B1")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--workdir", type=Path, help="keep the searches here: run again to continue them")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]

    previous = json.loads(RESULT.read_text()) if RESULT.exists() else {}
    figures = dict(previous.get("figures", {}))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="b7-") as tmp:
        root = args.workdir or Path(tmp)
        # the chosen networks are saved here, for this process and the simulations' processes
        os.environ["FEDKIT_MODELS_DIR"] = str(root / "models")
        searches = dict(figures.get("searches", {}))
        if "a" in parts or "b" in parts:
            for seed in seeds if "a" in parts else (0,):
                for strategy in STRATEGIES if "a" in parts else ("controller",):
                    searches[f"{strategy}-{seed}"] = search(strategy, seed, root)
            figures["a"] = compare(searches)
        figures["searches"] = searches
        if "b" in parts:
            chosen = searches["controller-0"]["model_id"]
            runs = {
                "mobilenet_v2": federated_run("mobilenet_v2", "mobilenet_v2", root),
                "chosen": federated_run("chosen", chosen, root),
                "chosen+exits": federated_run("chosen-exits", f"{chosen}+exits", root),
            }
            models = {"mobilenet_v2": model_figures("mobilenet_v2"), "chosen": model_figures(chosen)}
            figures["b"] = {
                "chosen_arch": searches["controller-0"]["arch_id"],
                "chosen_blocks": searches["controller-0"]["blocks"],
                "runs": runs,
                "models": models,
                "chosen_minus_mobilenet_v2_points": round(
                    100 * (runs["chosen"]["final_accuracy"] - runs["mobilenet_v2"]["final_accuracy"]), 2
                ),
                "params_ratio": round(models["chosen"]["params"] / models["mobilenet_v2"]["params"], 3),
            }
        if "federated" in parts:
            fed = search("controller", 0, root, "federated")
            server = searches.get("controller-0")
            figures["federated_reward"] = {
                "federated": fed,
                "server": server,
                "same_network": None if server is None else fed["arch_id"] == server["arch_id"],
            }
        figures["c"] = {
            "search_wall_s": {k: r["wall_s"] for k, r in searches.items()},
            "per_search_times_s": {k: r["times_s"] for k, r in searches.items()},
            "benchmark_wall_s": round(time.perf_counter() - started, 1),
        }
    write_result(
        "nas",
        config={
            "search_config": "toolkit/nas/nas.toml (default), seed and strategy varied",
            "seeds": seeds,
            "strategies": list(STRATEGIES),
            "b1": "fashion_transfer A-int8: 20 phones, 30 rounds, head only, int8",
            "phone_classes": list(CLASSES),
            "versions": library_versions(),
        },
        figures=figures,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
