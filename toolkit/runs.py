"""A new run on disk, from a fleet plan: the run config (``run.toml``) and the version-0 weights
(``weights.bin``) that every phone's bundle and the SplitFed edge start from. What
``fedkit run-config`` writes by hand and ``fedkit simulate`` writes for its aggregator.

Version 0 holds every parameter from the fleet's shallowest trained block to the end of the
model (``toolkit.splitfed.initial_weights``): what any phone trains, at any of its bundles'
depths, and what the edge trains past any SplitFed cut. An exit run's holds every branch and
blocks from its one T on (``toolkit.planning.planner.exit_train_from``): a phone at an exit
before T trains its branches only. A fleet with a SplitFed phone gets a ``[splitfed]``
section, so ``fedkit serve`` serves the edge too. An ``[evaluation]`` section
(``evaluation_section``) makes the aggregator evaluate every version itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w

from device_runtime.folders import is_free, new_folder
from toolkit.aggregator.config import RunConfig, parse_config
from toolkit.errors import ConfigError
from toolkit.planning.export import phone_bundles
from toolkit.planning.planner import FleetPlan, exit_train_from

RUN_CONFIG = "run.toml"
WEIGHTS = "weights.bin"


def has_splitfed(fleet: FleetPlan) -> bool:
    """Some phone cuts before the end of a model without exits (an exit is no cut: nothing runs past it)."""
    return any(p.plan is not None and p.plan.cut < len(fleet.block_names) and not p.plan.exits for p in fleet.phones)


def run_config(fleet: FleetPlan, name: str, stages: list[dict[str, Any]], **sections: Any) -> RunConfig:
    """The run config of ``fleet``: its model, ``weights.bin`` as version 0 and the aggregator
    beside it (``run_dir = "."``), ``stages``, and ``sections`` (``fedavg``, ``robust``, ...)."""
    data: dict[str, Any] = {
        "name": name,
        "model": fleet.model_id,
        "weights": WEIGHTS,
        "run_dir": ".",
        "stages": stages,
        **sections,
    }
    if has_splitfed(fleet):
        data.setdefault("splitfed", {})
    return parse_config(data)


def evaluation_section(fleet: FleetPlan, test_images: int) -> dict[str, Any]:
    """The ``[evaluation]`` section of a run the aggregator evaluates on the first ``test_images``
    test images; an exit model's total loss weighs its exits as the plan's phones train them."""
    section: dict[str, Any] = {"test_images": test_images}
    if fleet.config.exit_weights is not None:
        section["exit_weights"] = fleet.config.exit_weights
    return section


def write_run(config: RunConfig, fleet: FleetPlan, out_dir: str | Path) -> Path:
    """Writes ``out_dir/run.toml`` and ``out_dir/weights.bin`` (``out_dir`` must not exist, or
    be empty; it appears only whole); returns the config's path."""
    from toolkit.models import load_model  # torch: only when writing weights
    from toolkit.splitfed import initial_weights

    out_dir = Path(out_dir)
    if not is_free(out_dir):
        raise ConfigError(f"{out_dir} already exists: remove it or choose another --out")
    model = load_model(fleet.model_id)
    plans = [p for ps in phone_bundles(fleet, model).values() for p in ps]
    if not plans:
        raise ConfigError("the plan has no feasible phone: nothing would train (see `fedkit plan` for the reasons)")
    first = exit_train_from(model, fleet.config) if model.exits else min(p.train_from for p in plans)
    weights = initial_weights(model, first)
    with new_folder(out_dir) as staging:
        (staging / WEIGHTS).write_bytes(weights)
        (staging / RUN_CONFIG).write_text(config_toml(config))
    return out_dir / RUN_CONFIG


def config_toml(config: RunConfig) -> str:
    """The run config as TOML, every field written (defaults too: the file says what runs)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
