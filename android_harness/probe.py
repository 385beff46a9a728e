"""The on-device probe: measures what a phone can do and prints it as one JSON object.

Pushed to a phone by `fedkit profile --adb` (and run in-process by `fedkit profile --local`),
so it needs only the standard library, numpy, and onnxruntime when the phone has it. It never
builds models: the host pushes a payload folder with ``probe.json`` and the ONNX files it
lists (compute kernels, optionally the blocks of a model), and the probe times them.

    python probe.py PAYLOAD_DIR [--repeats N] [--aggregator URL]

probe.json: ``{"items": [{"name", "group": "kernel"|"block", "file", "input_shape", "flops"}]}``;
``input_shape`` includes the batch, ``flops`` is per run (the whole batch).

The network test talks to the aggregator's probe route: ``GET URL/probe/echo?size=N`` answers
N bytes, ``POST URL/probe/echo`` reads the body and answers a few bytes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np

PROBE_VERSION = 1
TRANSFER_BYTES = 1 << 20  # 1 MiB each way: long enough to see bandwidth past the RTT on 4G


def memory_available_mb() -> float:
    """MemAvailable from /proc/meminfo (Linux and Android): what a new process can take
    without swapping or the low-memory killer stepping in."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def engines_present() -> list[str]:
    """Engines whose runtime can be imported here; ExecuTorch on a phone is the Android AAR,
    which a Python probe cannot see, so it is reported only where its Python runtime exists."""
    found = []
    if importlib.util.find_spec("onnxruntime") is not None:
        found.append("ort")
    if importlib.util.find_spec("executorch") is not None:
        found.append("executorch")
    return found


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: the first run allocates and plans memory
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best  # the minimum is the least disturbed by other processes on a shared CPU


def time_items(payload_dir: str, repeats: int) -> list[dict]:
    """Seconds per run of every item in probe.json with onnxruntime: the fastest of
    ``repeats`` runs, taken round-robin over the items so a burst of load elsewhere on the
    device spreads over all of them instead of spoiling one."""
    with open(os.path.join(payload_dir, "probe.json")) as f:
        items = json.load(f)["items"]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle worker threads of one session otherwise spin on the cores while the next session
    # runs: with dozens of sessions the timings measure that contention, not the kernels.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    runs = []
    for item in items:
        session = ort.InferenceSession(os.path.join(payload_dir, item["file"]), options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(item["input_shape"]).astype(np.float32)}
        runs.append(lambda session=session, feed=feed: session.run(None, feed))
        runs[-1]()  # warm-up: the first run allocates and plans memory
    best = [float("inf")] * len(items)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            run()
            best[i] = min(best[i], time.perf_counter() - start)
    return [{**item, "seconds": seconds} for item, seconds in zip(items, best)]


def numpy_matmul_gflops(repeats: int) -> float:
    """Fallback compute figure when onnxruntime is missing: numpy's BLAS on a 512² matmul."""
    a = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    return 2 * 512**3 / _time(lambda: a @ a, repeats) / 1e9


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
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"cannot reach the aggregator probe route {base}: {exc}") from exc
    mbits = TRANSFER_BYTES * 8 / 1e6
    return {
        "rtt_ms": rtt * 1000,
        "downlink_mbps": mbits / max(down - rtt, 1e-6),
        "uplink_mbps": mbits / max(up - rtt, 1e-6),
    }


def probe(payload_dir: str | None, repeats: int, aggregator: str | None = None) -> dict:
    engines = engines_present()
    result = {
        "probe_version": PROBE_VERSION,
        "cpu_cores": os.cpu_count() or 1,
        "memory_available_mb": memory_available_mb(),
        "engines": engines,
        "items": time_items(payload_dir, repeats) if payload_dir and "ort" in engines else [],
        "numpy_matmul_gflops": numpy_matmul_gflops(repeats),
    }
    if aggregator:
        result["network"] = network(aggregator)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure this device for fedkit and print one JSON object.")
    parser.add_argument("payload", nargs="?", help="folder with probe.json and the ONNX files it lists")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--aggregator", help="aggregator base URL for the RTT and bandwidth test")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(probe(args.payload, args.repeats, args.aggregator)))
    except Exception as exc:  # one line for the host to show; the host raises it as a PlanError
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
