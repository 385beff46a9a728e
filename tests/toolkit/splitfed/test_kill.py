"""A SplitFed phone process (``python -m device_runtime.phone_loop``) SIGKILLed at random moments
against the real edge (uvicorn on loopback, in this process) resumes from its checkpoint and
ends with the same weights and the same merged update, bit for bit, as a phone never killed;
the edge trains every batch once."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from splitfed_helpers import enrol, make_run, serving, shard

from device_runtime.checkpoint import load_checkpoint
from device_runtime.local_round import CHECKPOINT
from toolkit.aggregator.app import create_app

CUT, TRAIN_BLOCKS = 3, 3
IMAGES, BATCH, EPOCHS = 600, 8, 2
STEPS = EPOCHS * IMAGES // BATCH


def phone_folder(root: Path, url: str, token: str, bundle: Path, shard_path: Path) -> Path:
    shutil.copytree(bundle, root / "bundles" / "split")
    shutil.copy(shard_path, root / "shard.npz")
    (root / "credential.json").write_text(json.dumps({"url": url, "device_id": "p", "token": token}))
    return root


def start_phone(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "device_runtime.phone_loop", str(folder)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def train(folder: Path, model, bundle: Path, shard_path: Path, kills, wait_for) -> tuple[dict, object, object, list]:
    """One phone's one-round SplitFed run, its process SIGKILLed as ``kills`` say and restarted
    until it finishes: (its checkpoint, the run's coordinator, the edge's traffic for it, where each kill left it)."""
    folder.mkdir()
    coordinator, edge = make_run(folder, model, min_reports=1, rounds=1, batch_size=BATCH, local_epochs=EPOCHS)
    checkpoint = folder / "phone" / "work" / "split" / CHECKPOINT
    left = []
    with serving(create_app(coordinator, edge=edge)) as url:
        phone = phone_folder(folder / "phone", url, enrol(coordinator, "p"), bundle, shard_path)
        for reached in kills:
            proc = start_phone(phone)
            wait_for(proc, checkpoint, reached)
            proc.kill()  # SIGKILL
            proc.communicate()
            state = load_checkpoint(checkpoint)  # never torn, whatever the moment of the kill
            left.append(None if state is None else (state["phase"], state["position"].get("step")))
        final = start_phone(phone)
        _, err = final.communicate(timeout=300)
        assert final.returncode == 0, err.decode()[-2000:]
    edge.close()
    (traffic,) = edge.status().phones
    return load_checkpoint(checkpoint), coordinator, traffic, left


def test_a_killed_splitfed_phone_resumes_to_the_same_weights_and_merged_update(
    tmp_path, model, small_cnn_bundle, fashion_train, wait_for_checkpoint
):
    # Prepare: the phone trains features.0-2, the edge the pool and the classifier; 150 batches
    bundle, shard_path = small_cnn_bundle(CUT, TRAIN_BLOCKS), shard(tmp_path, fashion_train, 0, IMAGES)
    expected, reference, calm, _ = train(tmp_path / "reference", model, bundle, shard_path, [], wait_for_checkpoint)

    # Execute: kill -9 a little after the checkpoint reaches a random step, one per fifth of
    # the round (none in the last: a kill may land late), and once as the update is encoded (at the push)
    rng = np.random.default_rng(7)
    targets = sorted(int(rng.integers(k * STEPS // 5 + 1, (k + 1) * STEPS // 5)) for k in range(4))
    kills = [lambda s, t=t: s["phase"] != "training" or s["position"]["step"] >= t for t in targets]
    kills.append(lambda s: s["phase"] == "encoded")
    got, killed, traffic, left = train(tmp_path / "killed", model, bundle, shard_path, kills, wait_for_checkpoint)

    # Assert: the kills hit the training ...
    assert sum(s is not None and s[0] == "training" and 0 < s[1] < STEPS for s in left) >= 3, left
    # ... the phone's weights, the update it pushed, its merged update and the new global model
    # are the uninterrupted run's, bit for bit
    assert got["phase"] == expected["phase"] == "encoded" and got["position"]["step"] == STEPS
    for name, w in expected["weights"].items():
        np.testing.assert_array_equal(got["weights"][name], w, err_msg=name)
    assert got["payload"] == expected["payload"] and got["idempotency_key"] == expected["idempotency_key"]
    (update,), (reference_update,) = killed.store.updates(round_=1), reference.store.updates(round_=1)
    assert update.sha256 == reference_update.sha256  # the phone's tensors and the edge's copy, merged
    assert killed.weights(1)[0] == reference.weights(1)[0]
    # ... and the edge trained each batch once: a resumed phone's first batch was the edge's
    # last (answered from its cache) or the one after it
    assert traffic.batches == calm.batches == STEPS and traffic.samples == calm.samples
