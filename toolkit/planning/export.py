"""A fleet plan → bundles: one bundle per distinct per-phone choice, and an index of which
phone gets which bundles (what `fedkit deploy --fleet` reads). `fedkit export --plan` and
`fedkit simulate` both export through here: one naming scheme, one cache.

Every phone gets the bundle of its plan; a whole-model phone also gets a shallower bundle for
each of the plan's ``stage_depths`` (a stage naming that trainable depth, e.g. a head-only
warm-up). Every frozen part is fed the global values of the blocks some phone of the fleet
trains (``fed_from``: the fleet's shallowest ``train_from``). An exit plan (a model with early
exits) has no fed part: every phone of an exit run trains from min(T, its exit) for one
run-wide T (``planner.exit_train_from``), so no block a phone runs frozen is trained by any
other; and no stage-depth bundles, the run's depth being one for all.

Bundles are exported once into the host cache (``$FEDKIT_CACHE_DIR/bundles``), keyed by the
choice, ``fed_from``, the export format and the model's hash, and copied from there; a cache
entry that fails verification (a file, or the manifest itself, altered or missing) or holds
another plan is exported again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from device_runtime.bundle import MANIFEST, Bundle, sha256_file
from device_runtime.errors import FedkitError
from device_runtime.folders import is_free, new_folder
from device_runtime.manifest import DevicePlan
from toolkit.errors import ExportError, PlanError
from toolkit.planning.planner import FleetPlan

if TYPE_CHECKING:
    from toolkit.models import SplittableModel

INDEX = "phones.json"  # phone → its bundle folders, the planned one first

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PlannedBundle:
    folder: Path
    plan: DevicePlan
    phones: tuple[str, ...]  # profile names that get this bundle


def bundle_folder_name(plan: DevicePlan) -> str:
    """The choice as a folder name; an exit plan's names its exit, and its weights unless all 1."""
    if not plan.exits:
        return f"cut{plan.cut}-from{plan.train_from}-{plan.engine}-{plan.encoding}-b{plan.batch_size}"
    weights = "" if set(plan.exit_weights) == {1.0} else "-w" + "_".join(f"{w:g}" for w in plan.exit_weights)
    return f"exit{plan.cut}-from{plan.train_from}-{plan.engine}-{plan.encoding}-b{plan.batch_size}{weights}"


def phone_bundles(fleet: FleetPlan, model: SplittableModel) -> dict[str, list[DevicePlan]]:
    """Per feasible phone, the plans of its bundles: its own first (predictions dropped: a
    bundle is shared by phones whose predictions differ), then one per shallower stage depth."""
    n = len(model.block_names)
    out = {}
    for phone in fleet.phones:
        if phone.plan is None:
            continue
        own = replace(phone.plan, predicted={})
        plans = [own]
        if own.cut == n and not own.exits:
            for depth in sorted(set(fleet.config.stage_depths), reverse=True):
                train_from = model.train_from(n, min(depth, len(model.parameterised_blocks(n))))
                if train_from > own.train_from:
                    plans.append(replace(own, train_from=train_from))
        out[phone.profile] = plans
    return out


def export_plan_bundles(fleet: FleetPlan, out_dir: str | Path, progress: Progress | None = None) -> list[PlannedBundle]:
    """Exports every distinct bundle of ``fleet`` into ``out_dir/<choice>/`` and writes
    ``out_dir/phones.json``. Infeasible phones get no bundle. Every bundle is checked before
    any is exported, and ``out_dir`` (which must not exist, or be empty) appears only whole."""
    from exporters.bundle import check_request  # imports torch: only when exporting
    from toolkit.data import LABEL_NAMES
    from toolkit.models import load_model

    out_dir = Path(out_dir)
    if not is_free(out_dir):
        raise ExportError(f"{out_dir} already exists: remove it or choose another --out")
    model = load_model(fleet.model_id)
    if list(model.block_names) != list(fleet.block_names):
        raise PlanError(f"the plan's blocks for {fleet.model_id} differ from this fedkit's model: re-run `fedkit plan`")
    per_phone = phone_bundles(fleet, model)
    if not per_phone:
        raise PlanError("the plan has no feasible phone: nothing to export (see `fedkit plan` for the reasons)")
    distinct: dict[str, tuple[DevicePlan, list[str]]] = {}
    for phone, plans in per_phone.items():
        for plan in plans:
            distinct.setdefault(bundle_folder_name(plan), (plan, []))[1].append(phone)
    for name, (plan, phones) in distinct.items():
        try:
            check_request(model, plan, (plan.engine,), LABEL_NAMES, out_dir / name)
        except FedkitError as exc:
            raise PlanError(
                f"the plan's choice for {', '.join(phones)} cannot be exported ({exc}): re-run `fedkit plan`"
            ) from exc

    shallowest = min(plan.train_from for plan, _ in distinct.values())
    made = []
    with new_folder(out_dir) as staging:
        for name, (plan, phones) in sorted(distinct.items()):
            fed_from = plan.train_from if plan.exits else shallowest
            shutil.copytree(cached_bundle(model, plan, fed_from, progress), staging / name)
            made.append(PlannedBundle(out_dir / name, plan, tuple(phones)))
        index = {phone: [bundle_folder_name(p) for p in plans] for phone, plans in per_phone.items()}
        (staging / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return made


def cached_bundle(model: SplittableModel, plan: DevicePlan, fed_from: int, progress: Progress | None = None) -> Path:
    """The verified bundle of ``plan`` in the host cache, exported first when missing, damaged or
    of another plan. ``Bundle.load`` checks every file against the manifest; the manifest is
    checked against its sha256 kept beside the entry when it was exported (nothing else would
    notice an edited manifest that still parses)."""
    from exporters.bundle import EXPORT_FORMAT, export_bundle
    from toolkit.central import cache_dir
    from toolkit.data import LABEL_NAMES

    fed = f"-fed{fed_from}" if fed_from < plan.train_from else ""
    # local_epochs is not in the folder name of an export, but a phone's bundle carries it; an
    # exit model's id names its exits after a colon, which some file systems refuse
    name = (
        f"{model.model_id.replace(':', '@')}-{bundle_folder_name(plan)}-e{plan.local_epochs}{fed}"
        f"-x{EXPORT_FORMAT}-{model.content_hash()[:12]}"
    )
    path = cache_dir() / "bundles" / name
    stamp = path.with_name(name + ".sha256")  # the manifest's sha256 as exported
    try:
        bundle = Bundle.load(path)
        if stamp.read_text() == bundle.bundle_hash and bundle.manifest.plan == plan:
            return path
    except (FedkitError, OSError):
        pass
    shutil.rmtree(path, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    export_bundle(model, plan, path, (plan.engine,), label_names=LABEL_NAMES, progress=progress, fed_from=fed_from)
    stamp.write_text(sha256_file(path / MANIFEST))
    return path


def read_index(out_dir: str | Path) -> dict[str, list[Path]]:
    """``phones.json`` of an export: phone → its bundle folders (the planned one first)."""
    path = Path(out_dir) / INDEX if Path(out_dir).is_dir() else Path(out_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise PlanError(
            f"{path} does not exist: export the plan first (fedkit export --plan PLAN.json --out DIR)"
        ) from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} is not JSON ({exc}): export the plan again") from exc
    if not isinstance(data, dict) or not all(
        isinstance(v, list) and v and all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in v)
        for v in data.values()
    ):
        raise PlanError(f"{path} is not a phone index (phone → list of bundle folders): export the plan again")
    return {phone: [path.parent / f for f in folders] for phone, folders in data.items()}
