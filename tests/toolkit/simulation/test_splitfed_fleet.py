"""End to end SplitFed: three emulated phone processes with three different cuts against the
real aggregator serving the edge on loopback (small_cnn, 2 rounds): healthy, and with the
aggregator SIGKILLed mid-round and restarted on its database (the edge's copies are gone, the
phones are told to restart their round from batch 0, and every update accepted holds its edge
part and is in the aggregate)."""

from __future__ import annotations

import json
import sqlite3

from device_runtime.codec import decode
from toolkit.simulation import parse_simulation, simulate

CUTS = (1, 3, 4)  # after features.0 | after features.2 | after the pool: the edge trains the rest


def three_cuts(**extra):
    import torch

    torch.manual_seed(0)  # small_cnn's backbone comes from torch's global generator
    return parse_simulation(
        {
            "model": "small_cnn",
            "mode": "splitfed",
            "train_images": 1800,
            "partition": "iid",
            "deadline_s": 60,
            "phones": [
                {"class": "flagship-2023", "cut": CUTS[0]},
                {"class": "mid-2022", "cut": CUTS[1]},
                {"class": "low-2022", "cut": CUTS[2]},
            ],
            "stages": [{"name": "all", "rounds": 2, "lr": 0.1, "local_epochs": 2}],
            **extra,
        }
    )


def test_splitfed_fleet_with_three_cuts_completes_above_chance(tmp_path):
    config = three_cuts(name="splitfed", test_images=1000, compute="none", timeout_s=120)
    summary = simulate(config, tmp_path / "run").model_dump()
    assert summary["mode"] == "splitfed" and summary["rounds"] == 2
    assert summary["final_accuracy"] > 0.25  # chance is 0.10; 0.42 on this host
    assert summary["updates_accepted"] == 6 and summary["accepted_lost"] == 0
    assert sorted(b for p in summary["phones"] for b in p["bundles"]) == [
        f"cut{cut}-from0-ort-int8-b32" for cut in CUTS
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


def test_aggregator_killed_mid_splitfed_round_restarts_the_phones_rounds_and_loses_nothing(tmp_path):
    # the low-end phones compute 2-3 times slower: when the flagship's update is accepted, they
    # are mid-round, and the kill lands while the edge holds their copies
    config = three_cuts(
        name="splitfed-kill",
        test_images=500,
        timeout_s=180,
        faults=[{"kind": "kill_aggregator", "round": 1, "after_s": 0.0, "down_s": 0.5}],
    )
    run_dir = tmp_path / "run"

    summary = simulate(config, run_dir).model_dump()

    # Assert: the run finished, the kill happened mid-round, nothing accepted was lost
    assert summary["rounds"] == 2 and summary["accepted_lost"] == 0
    assert summary["updates_accepted"] == 6
    (kill,) = [f for f in summary["faults"] if f["kind"] == "kill_aggregator"]
    assert kill["round"] == 1 and kill["accepted_before"] < 3
    # ... phones that were mid-round were told to start over, and did
    trains = [
        json.loads(line)
        for p in (run_dir / "phones").iterdir()
        for line in (p / "events.jsonl").read_text().splitlines()
    ]
    restarted = [e for e in trains if e["event"] == "train" and e["round"] == 1 and e["restarts"] > 0]
    pushes_restarted = [e for e in trains if e["event"] == "upload" and e["status"] == "restart"]
    assert restarted or pushes_restarted, "no phone was mid-round when the aggregator was killed"
    # ... and every update accepted holds its phone's tensors and its edge part: every tensor of
    # the model (each phone trains every block before its cut, the edge every block after)
    with sqlite3.connect(run_dir / "aggregator.sqlite") as db:
        rows = db.execute("SELECT device_id, round, version, blob FROM updates ORDER BY id").fetchall()
        names = set(decode(db.execute("SELECT blob FROM versions WHERE version = 0").fetchone()[0]).tensors)
    assert sorted((d, r) for d, r, _, _ in rows) == sorted((f"phone-{i}", r) for i in (1, 2, 3) for r in (1, 2))
    for device, round_, version, blob in rows:
        assert version == round_, (device, round_)  # aggregated into its round's version
        assert set(decode(blob).tensors) == names, (device, round_)
