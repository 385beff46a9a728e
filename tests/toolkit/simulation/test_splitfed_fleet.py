"""End to end SplitFed: three emulated phone processes with three different cuts against the
real aggregator serving the edge on loopback (small_cnn, 2 rounds)."""

from __future__ import annotations

import json

from toolkit.simulation import parse_simulation, simulate

CUTS = (1, 3, 4)  # after features.0 | after features.2 | after the pool: the edge trains the rest


def test_splitfed_fleet_with_three_cuts_completes_above_chance(tmp_path):
    import torch

    torch.manual_seed(0)  # small_cnn's backbone comes from torch's global generator
    config = parse_simulation({
        "name": "splitfed",
        "model": "small_cnn",
        "mode": "splitfed",
        "train_images": 1800,
        "test_images": 1000,
        "partition": "iid",
        "compute": "none",
        "deadline_s": 60,
        "timeout_s": 120,
        "phones": [{"class": "flagship-2023", "cut": CUTS[0]}, {"class": "mid-2022", "cut": CUTS[1]},
                   {"class": "low-2022", "cut": CUTS[2]}],
        "stages": [{"name": "all", "rounds": 2, "lr": 0.1, "local_epochs": 2}],
    })
    summary = simulate(config, tmp_path / "run")

    assert summary["mode"] == "splitfed" and summary["rounds"] == 2
    assert summary["final_accuracy"] > 0.25  # chance is 0.10; 0.42 on this host
    assert summary["updates_accepted"] == 6 and summary["accepted_lost"] == 0
    assert sorted(b for p in summary["phones"] for b in p["bundles"]) == [
        f"small_cnn-cut{cut}-from0-ort-b32" for cut in CUTS
    ]
    edge = summary["splitfed"]
    assert sorted(p["cut"] for p in edge["phones"]) == list(CUTS)
    # 600 samples per phone, batches of 32, two epochs: 38 batches a round, two rounds
    assert all(p["batches"] >= 76 and p["activation_bytes"] > 0 and p["gradient_bytes"] > 0 for p in edge["phones"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in metrics[1:]:  # every round: each phone's compute, the bytes each way and the edge's time
        assert len(m["phone_compute_s"]) == 3 and all(s > 0 for s in m["phone_compute_s"].values())
        assert m["activation_bytes"] > 0 and m["gradient_bytes"] > 0 and m["edge_s"] > 0
    assert "SplitFed" in (tmp_path / "run" / "report" / "index.html").read_text()
