"""A fleet plan → bundles: one bundle per distinct per-phone choice, and an index of which
phone gets which bundle (what `fedkit deploy` needs)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from device_runtime.manifest import DevicePlan
from toolkit.errors import PlanError
from toolkit.planning.planner import FleetPlan, distinct_choices

INDEX = "phones.json"


@dataclass(frozen=True)
class PlannedBundle:
    folder: Path
    plan: DevicePlan
    phones: tuple[str, ...]  # profile names that get this bundle


def bundle_folder_name(plan: DevicePlan) -> str:
    return f"cut{plan.cut}-from{plan.train_from}-{plan.engine}-{plan.encoding}-b{plan.batch_size}"


def export_plan_bundles(
    fleet: FleetPlan,
    out_dir: str | Path,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[PlannedBundle]:
    """Exports every distinct choice of ``fleet`` into ``out_dir/<choice>/`` and writes
    ``out_dir/phones.json`` (phone → bundle folder). Infeasible phones get no bundle."""
    from exporters.bundle import export_bundle  # imports torch: only when exporting
    from toolkit.data import LABEL_NAMES
    from toolkit.models import load_model

    model = load_model(fleet.model_id)
    if list(model.block_names) != list(fleet.block_names):
        raise PlanError(
            f"the plan's blocks for {fleet.model_id} differ from this fedkit's model: re-run `fedkit plan`"
        )
    choices = distinct_choices(fleet)
    if not choices:
        raise PlanError("the plan has no feasible phone: nothing to export (see `fedkit plan` for the reasons)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    fed_from = min(plan.train_from for plan, _ in choices)  # phones training less take these blocks from the global model
    for plan, phones in choices:
        folder = out_dir / bundle_folder_name(plan)
        export_bundle(model, plan, folder, (plan.engine,), label_names=LABEL_NAMES, progress=progress, fed_from=fed_from)
        made.append(PlannedBundle(folder, plan, tuple(phones)))
    index = {phone: b.folder.name for b in made for phone in b.phones}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return made
