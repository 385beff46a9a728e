"""Operator actions on an aggregator database: issuing tokens, exporting the global model."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING

from device_runtime.codec import decode
from toolkit.aggregator.store import Store
from toolkit.errors import ModelError, StoreError

if TYPE_CHECKING:
    from toolkit.models import SplittableModel

ROLES = ("enrol", "admin")


def issue_tokens(store: Store, count: int = 1, role: str = "enrol") -> list[str]:
    """New one-time enrolment tokens (or admin tokens); only their hashes are stored, so show
    them to the operator now: they cannot be read back."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    tokens = [secrets.token_urlsafe(32) for _ in range(count)]
    with store.transaction():
        for token in tokens:
            store.add_token(token, role, time.time())
    return tokens


def global_state_dict(db: str | Path, model: str | None = None, version: int | None = None) -> dict:
    """A PyTorch state dict of the run's model at ``version`` (default: the latest): the
    model zoo's ``load_model(model).root.state_dict()`` with the version's tensors merged in.
    ``model`` defaults to the run config's ``model``."""
    from toolkit.models import load_model  # torch: only here, not in the server

    model, tensors = global_tensors(db, model, version)
    return merged_state_dict(load_model(model), tensors)


def merged_state_dict(splittable: SplittableModel, tensors: dict) -> dict:
    """The zoo model's state dict with ``tensors`` (a version's) merged in."""
    import torch

    state = splittable.root.state_dict()
    for name, t in tensors.items():
        if name not in state or tuple(state[name].shape) != t.shape:
            raise ModelError(
                f"global tensor {name!r} {t.shape} does not fit model {splittable.model_id!r}: "
                "pass the model the run trained"
            )
        state[name] = torch.from_numpy(t.copy())
    return state


def model_accuracy(splittable: SplittableModel, tensors: dict, test_images: int = 10000) -> float:
    """The accuracy of the zoo model with ``tensors`` merged in on the first ``test_images``
    Fashion-MNIST test images."""
    from toolkit.evaluation import Evaluator, frozen_end

    return Evaluator(splittable, frozen_end(splittable, tensors), test_images).accuracy(tensors)


def global_tensors(db: str | Path, model: str | None = None, version: int | None = None) -> tuple[str, dict]:
    """The run's model name (``model``, else the run config's) and the tensors of ``version``."""
    store = _open(db)
    try:
        if model is None:
            model = json.loads(store.get_meta("config") or "{}").get("model")
            if model is None:
                raise ModelError("the run config names no 'model': pass --model (e.g. mobilenet_v2)")
        row = store.latest_version() if version is None else store.get_version(version)
        if row is None:
            raise StoreError(f"{db} has no model version {version}; fedkit status lists the versions")
        tensors = decode(store.version_blob(row.version)).tensors
    finally:
        store.close()
    return model, tensors


def best_version(db: str | Path) -> int:
    """The run's best exit-point model version (``toolkit.aggregator.best``)."""
    from toolkit.aggregator.status import read_status

    best = read_status(db).best
    if best is None:
        raise StoreError(
            f"no model version in {db} has figures per exit: --best needs an exit model's run whose evaluator "
            "recorded them (fedkit simulate's does, and fedkit serve's own with a run config written with "
            "--evaluate); pass --version instead"
        )
    return best.version


def _open(db: str | Path) -> Store:
    if not Path(db).is_file():
        raise StoreError(f"no aggregator database at {db}; pass the --db that fedkit serve uses")
    return Store(db)
