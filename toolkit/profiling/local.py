"""Profiles this host: the same probe a phone runs, called in-process."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

from android_harness import probe
from toolkit.errors import PlanError
from toolkit.models import SplittableModel
from toolkit.profiling.kernels import write_payload
from toolkit.profiling.profile import MEMORY_SHARE, BlockTiming, DeviceProfile, Link, Source

QUICK_REPEATS = 3
FULL_REPEATS = 30
# A full profile's rounds are spread over at least this long (``probe.fastest``): on a shared
# host 30 rounds pass in half a second, too short to outlast a burst of other work, and the
# ratio of the model's time to the conv kernel's (what the planner scales by) then drifts by
# several percent from one profile to the next
FULL_SECONDS = 10.0
# Other processes keeping more than this many cores busy while the probe timed: the profile
# says so in its notes (long runs come out slower against the conv kernel than on a quiet device)
BUSY_ELSEWHERE = 0.25


def profile_from_probe(result: dict, name: str, source: Source, model_id: str | None, batch: int) -> DeviceProfile:
    """Turns the probe's JSON into a DeviceProfile."""
    if "error" in result:
        raise PlanError(f"the probe failed on {name}: {result['error']}")
    items = result["items"]
    kernel_gflops = {i["name"]: i["flops"] / i["seconds"] / 1e9 for i in items if i["group"] == "kernel"}
    blocks = {i["name"]: i["seconds"] for i in items if i["group"] == "block"}
    network = result.get("network")
    return DeviceProfile(
        name=name,
        source=source,
        cpu_cores=result["cpu_cores"],
        # without onnxruntime on the device, numpy's matmul is the only compute figure there is
        gflops=kernel_gflops.get("conv", result["numpy_matmul_gflops"]),
        kernel_gflops=kernel_gflops,
        memory_mb=result["memory_available_mb"] * MEMORY_SHARE,
        engines=tuple(result["engines"]),
        link=Link(**network) if network else None,
        # blocks are timed only for a model, the one model_id names
        block_timings=(BlockTiming(model_id=model_id, batch=batch, seconds=blocks),) if blocks and model_id else (),
        notes=_notes(result),
    )


def _notes(result: dict) -> str:
    busy = result.get("busy_elsewhere")  # probe v4 on
    if busy is None or busy <= BUSY_ELSEWHERE:
        return f"probe v{result['probe_version']}"
    return (
        f"probe v{result['probe_version']}; other processes kept {busy:.2f} cores busy while timing: "
        "profile again on a quieter device"
    )


def measure_local(
    quick: bool = True,
    model: SplittableModel | None = None,
    aggregator: str | None = None,
    batch: int = 32,
    name: str | None = None,
) -> DeviceProfile:
    """This host's profile. ``quick`` times each kernel a few times (about a second), else
    each item is timed in FULL_REPEATS rounds or more, over FULL_SECONDS; with ``model`` each
    of its blocks is also exported and timed at ``batch``; with ``aggregator`` (the URL of a
    `fedkit serve`) the link to it is measured through its probe route. Its engines are those
    fedkit's phone runtime trains with here without torch."""
    with tempfile.TemporaryDirectory(prefix="fedkit-probe-") as tmp:
        payload = write_payload(Path(tmp), model, batch)
        try:
            result = probe.probe(
                str(payload),
                QUICK_REPEATS if quick else FULL_REPEATS,
                aggregator,
                0.0 if quick else FULL_SECONDS,
            )
        except RuntimeError as exc:
            raise PlanError(f"profiling this host failed: {exc}") from exc
    return profile_from_probe(
        result, name or platform.node() or "local", "local", model.model_id if model else None, batch
    )
