"""Profiles a phone over adb: pushes the probe and its payload, runs it, reads its JSON.

The phone needs a Python with numpy (Termux's, for instance) and, to time the kernels,
onnxruntime; ``--python`` names the interpreter on the phone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from android_harness import probe
from toolkit.errors import PlanError
from toolkit.models import SplittableModel
from toolkit.profiling.kernels import write_payload
from toolkit.profiling.local import FULL_REPEATS, FULL_SECONDS, QUICK_REPEATS, profile_from_probe
from toolkit.profiling.profile import DeviceProfile

REMOTE_DIR = "/data/local/tmp/fedkit-probe"
TIMEOUT_S = 600


def _run(serial: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``adb -s serial args``, whatever its exit status."""
    adb = shutil.which("adb")
    if adb is None:
        raise PlanError("adb is not installed: install it (Debian: `apt-get install adb`) and attach the phone")
    try:
        return subprocess.run([adb, "-s", serial, *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise PlanError(
            f"`adb {' '.join(args)}` on {serial} did not finish in {timeout:.0f} s: "
            "check the phone is awake and unlocked"
        ) from exc


def _adb(serial: str, *args: str, timeout: float = 60) -> str:
    """The output of ``adb -s serial args``; a failure means adb could not reach the phone."""
    done = _run(serial, *args, timeout=timeout)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise PlanError(
            f"adb could not reach device {serial!r} ({said[-1] if said else f'exit {done.returncode}'}): "
            "attach the phone with USB debugging on and check that `adb devices` lists it"
        )
    return done.stdout


def stage_probe(folder: Path, model: SplittableModel | None = None, batch: int = 32) -> Path:
    """What a device runs to be profiled, into ``folder`` (created): ``probe.py`` and its payload
    (``payload/``: probe.json and the ONNX kernels, and ``model``'s blocks at ``batch``), built on
    this host. Run as ``python3 folder/probe.py folder/payload --repeats N``."""
    folder = Path(folder)
    write_payload(folder / "payload", model, batch)
    shutil.copy(probe.__file__, folder / "probe.py")
    return folder


def probe_adb(
    serial: str,
    quick: bool = True,
    model: SplittableModel | None = None,
    aggregator: str | None = None,
    batch: int = 32,
    python: str = "python3",
) -> DeviceProfile:
    """The profile of the phone ``serial``, measured on the phone."""
    _adb(serial, "get-state", timeout=15)  # fails fast, with adb's own words, when it is not attached
    with tempfile.TemporaryDirectory(prefix="fedkit-probe-") as tmp:
        stage_probe(Path(tmp), model, batch)
        _adb(serial, "shell", "rm", "-rf", REMOTE_DIR)
        _adb(serial, "push", f"{tmp}/.", REMOTE_DIR, timeout=TIMEOUT_S)
    command = [
        python,
        f"{REMOTE_DIR}/probe.py",
        f"{REMOTE_DIR}/payload",
        "--repeats",
        str(QUICK_REPEATS if quick else FULL_REPEATS),
    ]
    if not quick:
        command += ["--min-seconds", str(FULL_SECONDS)]
    if aggregator:
        command += ["--aggregator", aggregator]
    # Not _adb: adb passes on the exit status of the command it ran, so a failure here is the
    # probe's (it reports its own errors as JSON, a missing python3 or numpy on stderr), not a
    # phone adb lost: say what the phone said, not to attach it.
    done = _run(serial, "shell", *command, timeout=TIMEOUT_S)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError) as exc:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()  # a traceback's last line says why
        last = said[-1][:200] if said else "no output"
        raise PlanError(
            f"the probe on {serial} gave no result (exit {done.returncode}: {last!r}): "
            f"the phone needs `{python}` with numpy (e.g. Termux: `pkg install python python-numpy`); "
            "pass --python with its path"
        ) from exc
    return profile_from_probe(result, serial, "adb", model.model_id if model else None, batch)
