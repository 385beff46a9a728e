"""The on-device probe: measures what a phone can do and prints it as one JSON object.

Pushed to a phone by `fedkit profile --adb` (and run in-process by `fedkit profile --local`),
so it needs only the standard library, numpy, and onnxruntime when the phone has it. It never
builds models: the host pushes a payload folder with ``probe.json`` and the ONNX files it
lists (compute kernels, optionally the blocks of a model), and the probe times them.

    python probe.py PAYLOAD_DIR [--repeats N] [--min-seconds S] [--aggregator URL]

probe.json: ``{"items": [{"name", "group": "kernel"|"block", "file", "input_shape", "flops"}]}``;
``input_shape`` includes the batch, ``flops`` is per run (the whole batch).

``engines`` in the result are the engines fedkit's Python phone runtime can train with here,
without torch: ``ort`` when ONNX Runtime's training API imports with torch refused (checked in
a fresh interpreter, loaded as ``device_runtime.engines.ort`` loads it), never ``executorch``
(its Python bindings import torch; on a phone ExecuTorch is a native app's ``TrainingModule``,
which a Python probe cannot see). The kernels are timed whenever ``onnxruntime`` imports, even
an inference-only build.

The network test talks to the aggregator's probe route (``toolkit/aggregator/probe.py``, no
credential: a phone is profiled before it is enrolled): ``GET URL/probe/echo?size=N`` answers
N bytes, ``POST URL/probe/echo`` reads the body and answers a few bytes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime

# 4: --min-seconds, the fastest run over rounds spread over that long, and busy_elsewhere
# (cores other processes kept busy while timing); 3: numpy where
# onnxruntime imports; 2: engines are what trains without torch
PROBE_VERSION = 4
TRANSFER_BYTES = 1 << 20  # 1 MiB each way: long enough to see bandwidth past the RTT on 4G
ENGINE_CHECK_TIMEOUT_S = 120  # importing ONNX Runtime under qemu or on a slow phone takes a while

# Run in a fresh interpreter: imports ONNX Runtime's training API with torch refused, the way
# device_runtime/engines/ort.py loads it (``onnxruntime.training``'s own __init__ imports torch,
# so its ``api`` subpackage is reached through an empty stand-in package). Exit 0: it imports.
_REFUSE_TORCH = """
import sys
class RefuseTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch refused: a phone has none")
sys.meta_path.insert(0, RefuseTorch())
"""
_ORT_INFERENCE_CHECK = """
import onnxruntime
onnxruntime.InferenceSession
"""
_ORT_TRAINING_CHECK = """
import importlib, importlib.machinery, importlib.util, os
import onnxruntime
spec = importlib.machinery.ModuleSpec("onnxruntime.training", None, is_package=True)
spec.submodule_search_locations = [os.path.join(os.path.dirname(onnxruntime.__file__), "training")]
sys.modules["onnxruntime.training"] = importlib.util.module_from_spec(spec)
importlib.import_module("onnxruntime.training.api")
"""


def memory_available_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux and Android): what a new process can take
    without swapping or the low-memory killer stepping in."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def ort_trains_without_torch() -> bool:
    """Whether ONNX Runtime's training API imports here with torch refused."""
    return importlib.util.find_spec("onnxruntime") is not None and _runs_without_torch(_ORT_TRAINING_CHECK)


def _runs_without_torch(check: str) -> bool:
    """Whether ``check`` runs with torch refused. In a fresh interpreter: this process may hold
    torch already (`fedkit profile --local` on a host), and the stand-in package the training
    check registers must not stay in a process that exports."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _REFUSE_TORCH + check], capture_output=True, timeout=ENGINE_CHECK_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def engines_present() -> list[str]:
    """Engines fedkit's Python phone runtime can train with here, torch-free: ``ort`` where ONNX
    Runtime's training API imports (its training build, x86-64), ``numpy`` (a linear head, the
    frozen part on ONNX Runtime inference) wherever ``onnxruntime`` imports at all (arm64
    included). Never ``executorch``: its Python bindings import torch, and a phone's ExecuTorch
    (the Android ``TrainingModule``) belongs to a native app, not to this runtime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    return (["ort"] if ort_trains_without_torch() else []) + (
        ["numpy"] if _runs_without_torch(_ORT_INFERENCE_CHECK) else []
    )


def fastest(
    runs: Sequence[Callable[[], object]],
    repeats: int,
    min_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds of the fastest run of each of ``runs``: each is run once to warm up, then all
    of them round-robin, ``repeats`` rounds and more until ``min_seconds`` have passed.

    The fastest: other processes on a shared CPU only ever add time, so the fastest run is the
    least disturbed one. Round-robin: a burst of load spreads over every item instead of
    spoiling one, and every item (the conv kernel that gives the device's GFLOP/s, and the
    blocks the planner scales by it) is timed in the same stretch of time. Seconds, not only a
    count: a burst of load that outlasts every round spoils every run of an item, longer ones
    most (a 5 ms part is less often left alone for a whole run than a 1 ms kernel), and 30
    rounds of MobileNetV2's blocks pass in half a second on a host, so the ratio of a part's
    time to the conv kernel's drifted by 10 % and more from one profile to the next on a shared host;
    rounds spread over seconds find the quiet moments for the long items too."""
    for run in runs:
        run()  # warm-up: the first run allocates and plans memory
    best = [float("inf")] * len(runs)
    rounds, started = 0, clock()
    while rounds < repeats or clock() - started < min_seconds:
        for i, run in enumerate(runs):
            start = clock()
            run()
            best[i] = min(best[i], clock() - start)
        rounds += 1
    return best


def cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds used so far by the whole device (steal included: other guests of a
    hypervisor) and by this process and its children, or None where /proc/stat cannot be read
    (an Android app's sandbox)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, own.user + own.system + own.children_user + own.children_system


def cores_elsewhere(before: tuple[float, float] | None, seconds: float) -> float | None:
    """How many cores other processes kept busy, on average, over the ``seconds`` since
    ``before`` (``cpu_seconds()``); None when unknown. Timing cannot undo load that lasts
    through all of it (``fastest``), so a profile says when there was some."""
    after = cpu_seconds()
    if before is None or after is None or seconds <= 0:
        return None
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / seconds


def session_options() -> onnxruntime.SessionOptions:
    """ONNX Runtime options for timing: quiet, and idle worker threads sleep."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle worker threads of one session otherwise spin on the cores while the next session
    # runs: with dozens of sessions the timings measure that contention, not the kernels.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def time_items(payload_dir: str, repeats: int, min_seconds: float = 0.0) -> list[dict]:
    """Seconds per run of every item in probe.json with onnxruntime: the fastest of at least
    ``repeats`` rounds over the items, spread over at least ``min_seconds`` (``fastest``)."""
    with open(os.path.join(payload_dir, "probe.json")) as f:
        items = json.load(f)["items"]
    import onnxruntime as ort

    options = session_options()
    runs: list[Callable[[], object]] = []
    for item in items:
        session = ort.InferenceSession(
            os.path.join(payload_dir, item["file"]), options, providers=["CPUExecutionProvider"]
        )
        feed = {
            session.get_inputs()[0].name: np.random.default_rng(0)
            .standard_normal(item["input_shape"])
            .astype(np.float32)
        }
        runs.append(functools.partial(session.run, None, feed))
    best = fastest(runs, repeats, min_seconds)
    return [{**item, "seconds": seconds} for item, seconds in zip(items, best, strict=True)]


def numpy_matmul_gflops(repeats: int) -> float:
    """Fallback compute figure when onnxruntime is missing: numpy's BLAS on a 512² matmul."""
    a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    return 2 * 512**3 / fastest([lambda: a @ a], repeats)[0] / 1e9


def network(url: str, repeats: int = 3) -> dict:
    """RTT, downlink and uplink to the aggregator, in ms and Mbit/s."""
    base = url.rstrip("/") + "/probe/echo"

    def request(req) -> float:
        start = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()
        return time.perf_counter() - start

    try:
        rtt = min(request(f"{base}?size=1") for _ in range(repeats))
        down = min(request(f"{base}?size={TRANSFER_BYTES}") for _ in range(repeats))
        body = bytes(TRANSFER_BYTES)
        up = min(request(urllib.request.Request(base, data=body, method="POST")) for _ in range(repeats))
    except urllib.error.HTTPError as exc:  # reached, but refused: say why and what to do
        raise RuntimeError(f"the aggregator refused the probe at {base}: {_refusal(exc)}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"cannot reach the aggregator probe route {base}: {exc}") from exc
    mbits = TRANSFER_BYTES * 8 / 1e6
    return {
        "rtt_ms": rtt * 1000,
        "downlink_mbps": mbits / max(down - rtt, 1e-6),
        "uplink_mbps": mbits / max(up - rtt, 1e-6),
    }


def _refusal(exc: urllib.error.HTTPError) -> str:
    """The aggregator's reason (its error bodies are {"status", "reason"}) and the next step."""
    try:
        reason = json.loads(exc.read())["reason"]
    except (OSError, ValueError, KeyError, TypeError):
        reason = exc.reason
    if exc.code == 429:
        after = exc.headers.get("Retry-After")
        return f"{reason} (HTTP 429): wait {f'{after} s' if after else 'a minute'} and profile again"
    if exc.code == 404:
        return (
            f"{reason} (HTTP 404): point --aggregator at a `fedkit serve` of this fedkit version "
            "(it serves /probe/echo)"
        )
    return f"{reason} (HTTP {exc.code})"


def probe(payload_dir: str | None, repeats: int, aggregator: str | None = None, min_seconds: float = 0.0) -> dict:
    has_onnxruntime = importlib.util.find_spec("onnxruntime") is not None
    engines = engines_present()
    before, started = cpu_seconds(), time.perf_counter()
    # inference is enough to time kernels, so an inference-only onnxruntime still times them
    items = time_items(payload_dir, repeats, min_seconds) if payload_dir and has_onnxruntime else []
    result = {
        "probe_version": PROBE_VERSION,
        "cpu_cores": os.cpu_count() or 1,
        "memory_available_mb": memory_available_mb(),
        "engines": engines,
        "items": items,
        "busy_elsewhere": cores_elsewhere(before, time.perf_counter() - started),
        "numpy_matmul_gflops": numpy_matmul_gflops(repeats),
    }
    if aggregator:
        result["network"] = network(aggregator)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure this device for fedkit and print one JSON object.")
    parser.add_argument("payload", nargs="?", help="folder with probe.json and the ONNX files it lists")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.0, help="spread the rounds over at least this long")
    parser.add_argument("--aggregator", help="aggregator base URL for the RTT and bandwidth test")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(probe(args.payload, args.repeats, args.aggregator, args.min_seconds)))
    except Exception as exc:  # one line for the host to show; the host raises it as a PlanError
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
