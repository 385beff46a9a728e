"""Profiles the emulated arm64 phone (``android_harness.arm64``: a Debian arm64 rootfs under qemu
user mode): the probe and its payload are copied into the phone's rootfs and run there with the
phone's own python3, exactly as ``fedkit profile --adb`` runs them on a phone.

The figures are emulated: qemu translates every arm64 instruction, so the timings (here 0.35
GFLOP/s of dense conv against 88 natively, about 250× slower) say nothing about a real phone's
speed; the profile says so in its ``source`` (``arm64-emulated``) and ``notes``. What it does
say truly is what the phone's install can train with: ONNX Runtime's inference build only, so
``numpy`` (the linear head).

The probe runs with the fewest repeats (one timed run after a warm-up; ``quick=False``: three):
about 8 s on this host with the rootfs cached (10 s with small_cnn's blocks, or with three repeats).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from toolkit.errors import PlanError
from toolkit.models import SplittableModel
from toolkit.profiling.adb import stage_probe
from toolkit.profiling.local import QUICK_REPEATS, profile_from_probe
from toolkit.profiling.profile import DeviceProfile

QUICK = 1  # timed runs per kernel (after one warm-up): each emulated run is slow
FULL = QUICK_REPEATS
TIMEOUT_S = 1800  # a model's blocks at batch 32 under qemu take minutes
DEFAULT_NAME = "arm64-emulated"
NOTE = "emulated arm64 under qemu user mode: the timings say nothing about a real phone's speed"


def probe_arm64(
    quick: bool = True,
    model: SplittableModel | None = None,
    aggregator: str | None = None,
    batch: int = 32,
    name: str | None = None,
    cache_dir: Path | None = None,
) -> DeviceProfile:
    """The profile of the emulated arm64 phone (built or reused by ``ensure_phone(cache_dir)``),
    measured inside it. With ``aggregator`` the link to it is measured from inside the phone,
    which shares this host's network (an address, not ``localhost``: the phone has no
    /etc/hosts). Raises EmulationError when this host cannot run the phone."""
    from android_harness import arm64

    if aggregator is not None and (urlsplit(aggregator).hostname or "").lower() == "localhost":
        port = urlsplit(aggregator).port
        raise PlanError(
            "the emulated arm64 phone has no /etc/hosts, so it cannot resolve localhost: "
            f"use --aggregator http://127.0.0.1{f':{port}' if port else ''}"
        )
    phone = arm64.ensure_phone(cache_dir)
    host_tmp = phone.host_path("/tmp")
    host_tmp.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedkit-probe-", dir=host_tmp) as tmp:
        stage_probe(Path(tmp), model, batch)
        there = PurePosixPath("/tmp") / Path(tmp).name
        command = [
            "python3",
            str(there / "probe.py"),
            str(there / "payload"),
            "--repeats",
            str(QUICK if quick else FULL),
        ]
        if aggregator:
            command += ["--aggregator", aggregator]
        started = time.monotonic()
        done = phone.run(command, timeout=TIMEOUT_S)
        seconds = time.monotonic() - started
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        said = (done.stderr or done.stdout).strip()[-500:]
        raise PlanError(
            f"the probe in the emulated arm64 phone printed no JSON (exit {done.returncode}): {said!r}"
        ) from exc
    name = name or DEFAULT_NAME
    profile = profile_from_probe(result, name, "arm64-emulated", model.model_id if model else None, batch)
    cpu = arm64.PHONE_CPU
    return profile.model_copy(update={"notes": f"{NOTE} (qemu {cpu}; {profile.notes}, {seconds:.0f} s)"})
