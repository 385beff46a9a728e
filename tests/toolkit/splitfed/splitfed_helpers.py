"""Helpers for the SplitFed tests: a small_cnn run with an edge, enrolled phones, shards of real
Fashion-MNIST, activation messages, and a reference copy of the edge's part."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from serving import serving  # noqa: F401  (the SplitFed tests import it from here)

from device_runtime.codec import UpdateHeader, decode, encode
from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.config import EdgeConfig, parse_config
from toolkit.aggregator.coordinator import Coordinator
from toolkit.aggregator.store import Store
from toolkit.data import write_shard
from toolkit.models import SplittableModel, load_model
from toolkit.splitfed.edge import SplitFedEdge, edge_step, initial_weights

# (cut, train_blocks) of three phones; the edge trains the rest of each.
# Every block before the cut trains: features.0 | features.0-2 | features.0-2 + pool
THREE_CUTS = ((1, 1), (3, 3), (4, 3))
# Depths differ too: features.0 | features.1-2 (features.0 frozen) | features.2 + pool (features.0-1 frozen)
MIXED_DEPTHS = ((1, 1), (3, 2), (4, 1))


def small_cnn() -> SplittableModel:
    torch.manual_seed(0)  # as the session's bundles are made: same seed, same model
    return load_model("small_cnn")


def make_run(
    folder: Path,
    model: SplittableModel,
    *,
    min_reports: int = 3,
    rounds: int = 2,
    lr: float = 0.05,
    batch_size: int = 32,
    local_epochs: int = 1,
    edge_config: EdgeConfig = EdgeConfig(),
    executor=None,
) -> tuple[Coordinator, SplitFedEdge]:
    """A started SplitFed run from every parameter of ``model`` and its edge."""
    (folder / "weights.bin").write_bytes(initial_weights(model, 0))
    config = parse_config(
        {
            "name": "splitfed",
            "weights": "weights.bin",
            "fedavg": {"min_reports": min_reports, "deadline_s": 3600},
            "limits": {"requests_per_s": 10_000, "burst": 10_000},  # one request per batch
            "stages": [
                {
                    "name": "all",
                    "rounds": rounds,
                    "lr": lr,
                    "momentum": 0.9,
                    "batch_size": batch_size,
                    "local_epochs": local_epochs,
                }
            ],
        },
        folder,
    )
    coordinator = Coordinator(config, Store(config.default_db()))
    coordinator.start()
    return coordinator, SplitFedEdge(coordinator, model, edge_config, executor=executor)


def enrol(coordinator: Coordinator, device_id: str) -> str:
    (token,) = issue_tokens(coordinator.store, 1)
    enrolment = coordinator.enrol(token, device_id)
    assert enrolment.status == "enrolled", enrolment
    return enrolment.credential


def shard(folder: Path, data, start: int, count: int) -> Path:
    return write_shard(
        folder / f"shard-{start}-{count}.npz", data.images[start : start + count], data.labels[start : start + count]
    )


def activation_message(
    model: SplittableModel,
    device_id: str,
    round_: int,
    base_version: int,
    cut: int,
    n: int = 4,
    seed: int = 0,
    encoding: str = "int8",
) -> bytes:
    """A batch of ``n`` random activations at ``cut`` with random labels."""
    rng = np.random.default_rng(seed)
    name = model.block_names[cut - 1]
    tensors = {
        name: rng.standard_normal((n, *model.stats[cut - 1].out_shape)).astype(np.float32),
        "labels": rng.integers(0, model.num_classes, n).astype(np.float32),
    }
    header = UpdateHeader(device_id, round_, base_version, n, kind="activation")
    return encode(header, tensors, {name: encoding, "labels": "fp32"}, rng=rng)


def one_step_from(
    model: SplittableModel, weights: dict[str, np.ndarray], cut: int, message: bytes, lr: float, momentum: float = 0.9
):
    """The edge's part at ``cut`` loaded with ``weights`` after one SGD step on ``message``,
    computed here, independently of the edge: name → tensor."""
    part = copy.deepcopy(model.edge_part(cut)).eval()
    with torch.no_grad():
        for name, p in part.named_parameters():
            p.copy_(torch.from_numpy(weights[name]))
    tensors = decode(message).tensors
    activation = tensors[model.block_names[cut - 1]]
    edge_step(
        part,
        torch.optim.SGD(part.parameters(), lr=lr, momentum=momentum),
        activation,
        tensors["labels"].astype(np.int64),
    )
    return {name: p.detach().numpy() for name, p in part.named_parameters()}
