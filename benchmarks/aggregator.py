"""B3 — aggregator throughput and recovery, on loopback.

The real server (``python -m toolkit.aggregator.server``) in a subprocess; phones are threads
of this process, each with its own ``device_runtime.client.SyncClient``, pushing B1-head-sized
int8 updates (classifier.weight 10×1280 + classifier.bias 10).

- Throughput at 10 and 200 phones: FedBuff with a buffer of one update per phone, so every
  phone pushes once per model version; all phones push at once, wait for each other (a
  barrier, so no task polling loads the server), pull the next task; bounded by a fixed number
  of versions. Accepted updates per second of push bursts (first push starts to last push
  ends; the aggregation of each version included), p50/p99 push latency (the client's view,
  retries included), and the server's peak RSS (VmHWM), which must not grow with the phones
  (aggregation streams the updates).
- Latency is also given as a ratio to GET /v1/health measured against the same server in the
  same run (the machine is shared and noisy).
- Recovery: 20 phones, synchronous FedAvg over 3 rounds; the server is killed with SIGKILL
  twice mid-round and restarted on the same database. Every push a phone was told "accepted"
  (or "duplicate") must be in an aggregate: lost must be 0.

Prints one JSON line and writes it to benchmarks/results/aggregator.json.
"""

from __future__ import annotations

import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from device_runtime.client import RetryPolicy, SyncClient
from device_runtime.codec import UpdateHeader, encode
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.store import Store
from toolkit.benchmarking import write_result

SEED = 0
HEAD = {"classifier.weight": (10, 1280), "classifier.bias": (10,)}
PATIENT = RetryPolicy(attempts=80, base_s=0.05, cap_s=1.0)
VERSIONS = {10: 30, 200: 2}  # phones -> model versions pushed (300 and 400 pushes)


def run_folder(folder: Path, config: str) -> AggregatorProcess:
    """The aggregator of a run folder: its config, initial head weights and database."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(SEED)
    head = {n: (0.01 * rng.standard_normal(s)).astype(np.float32) for n, s in HEAD.items()}
    (folder / "weights.bin").write_bytes(encode(UpdateHeader("init", 0, 0, 1, kind="weights"), head, "fp32"))
    (folder / "run.toml").write_text(config)
    return AggregatorProcess(folder / "run.toml", folder / "agg.sqlite", folder / "server.log")


def config(mode: str, phones: int, rounds: int) -> str:
    return f"""
name = "b3"
weights = "weights.bin"
mode = "{mode}"
seed = {SEED}
[fedavg]
min_reports = {phones}
deadline_s = 3600.0
[fedbuff]
buffer_size = {phones}
max_staleness = 2
[limits]
requests_per_s = 1000.0
burst = 1000
[[stages]]
name = "head"
rounds = {rounds}
lr = 0.01
"""


class Phone(threading.Thread):
    """Enrols, then pulls a task and pushes an int8 update, ``pushes`` times (or until done)."""

    def __init__(self, server: AggregatorProcess, token: str, index: int, pushes: int, on_answer=None, barrier=None):
        super().__init__(daemon=True)
        self.barrier = barrier  # all phones push, then all pull the next task: no polling
        self.server, self.token, self.id, self.pushes = server, token, f"phone-{index:03d}", pushes
        self.rng = np.random.default_rng(SEED + index)
        self.latencies: list[float] = []
        self.spans: list[tuple[int, float, float]] = []  # (round, push start, push end)
        self.answers: list[tuple[int, str]] = []  # (round, status)
        self.on_answer = on_answer or (lambda status: None)
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with SyncClient(self.server.url, retry=PATIENT, timeout_s=30, rng=None) as c:
                c.enrol(self.token, self.id)
                while len(self.answers) < self.pushes:
                    task = c.task()
                    if task.status == "done":
                        return
                    if task.status == "wait":
                        time.sleep(min(task.retry_after, 0.3) * (0.5 + self.rng.random()))
                        continue
                    delta = {n: (0.001 * self.rng.standard_normal(s)).astype(np.float32) for n, s in HEAD.items()}
                    body = encode(
                        UpdateHeader(self.id, task.round, task.base_version, 100), delta, "int8", rng=self.rng
                    )
                    t0 = time.perf_counter()
                    result = c.push(body, f"{self.id}-r{task.round}")
                    t1 = time.perf_counter()
                    self.latencies.append(t1 - t0)
                    self.spans.append((task.round, t0, t1))
                    self.answers.append((task.round, result.status))
                    self.on_answer(result.status)
                    if self.barrier is not None:
                        self.barrier.wait(600)
        except Exception as exc:  # reported in the result, never silently dropped
            self.error = exc


def health_latency(url: str, n: int = 200) -> float:
    import httpx

    times = []
    with httpx.Client(base_url=url) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            c.get("/v1/health")
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def throughput(folder: Path, phones: int) -> dict:
    versions = VERSIONS[phones]
    server = run_folder(folder, config("fedbuff", phones, rounds=10**6))
    tokens = server.issue_tokens(phones)
    server.start()
    try:
        health = health_latency(server.url)
        rss_idle = server.peak_rss_mb()
        barrier = threading.Barrier(phones)
        fleet = [Phone(server, tokens[i], i, versions, barrier=barrier) for i in range(phones)]
        t0 = time.perf_counter()
        for p in fleet:
            p.start()
        for p in fleet:
            p.join(600)
        wall = time.perf_counter() - t0
        errors = [repr(p.error) for p in fleet if p.error]
        latencies = np.array([x for p in fleet for x in p.latencies])
        accepted = sum(s == "accepted" for p in fleet for _, s in p.answers)
        # Push throughput: accepted updates over the time spent in the rounds' push bursts
        # (first push starts to last push ends), leaving out enrolment and task pulls.
        bursts = {}
        for p in fleet:
            for rnd, t_start, t_end in p.spans:
                lo, hi = bursts.get(rnd, (t_start, t_end))
                bursts[rnd] = (min(lo, t_start), max(hi, t_end))
        burst_seconds = sum(hi - lo for lo, hi in bursts.values())
        store = Store(server.db)
        aggregated_versions = store.latest_version().version
        store.close()
        return {
            "phones": phones,
            "pushes": int(latencies.size),
            "accepted": accepted,
            "model_versions": aggregated_versions,
            "wall_seconds": round(wall, 3),
            "push_burst_seconds": round(burst_seconds, 3),
            "accepted_per_second": round(accepted / burst_seconds, 2),
            "accepted_per_second_wall": round(accepted / wall, 2),
            "push_p50_ms": round(1e3 * float(np.percentile(latencies, 50)), 2),
            "push_p99_ms": round(1e3 * float(np.percentile(latencies, 99)), 2),
            "health_p50_ms": round(1e3 * health, 3),
            "push_p50_vs_health": round(float(np.percentile(latencies, 50)) / health, 2),
            "server_peak_rss_mb": round(server.peak_rss_mb(), 1),
            "server_rss_before_phones_mb": round(rss_idle, 1),
            "errors": errors,
        }
    finally:
        server.stop()


def recovery(folder: Path, phones: int = 20, rounds: int = 3, kills_at: tuple[int, ...] = (10, 35)) -> dict:
    server = run_folder(folder, config("fedavg", phones, rounds=rounds))
    tokens = server.issue_tokens(phones)
    server.start()
    counted = {"n": 0}
    lock = threading.Lock()

    def on_answer(status: str) -> None:
        with lock:
            counted["n"] += status in ("accepted", "duplicate")

    fleet = [Phone(server, tokens[i], i, rounds, on_answer) for i in range(phones)]
    restarts = []
    try:
        for p in fleet:
            p.start()
        for threshold in kills_at:
            while counted["n"] < threshold and any(p.is_alive() for p in fleet):
                time.sleep(0.01)
            server.kill()
            restarts.append(round(server.start(), 3))
        for p in fleet:
            p.join(600)
    finally:
        server.stop()
    store = Store(server.db)
    told = {(p.id, r) for p in fleet for r, s in p.answers if s in ("accepted", "duplicate")}
    in_aggregate = {(u.device_id, u.round) for u in store.updates() if u.version is not None}
    result = {
        "phones": phones,
        "rounds": rounds,
        "kills": len(kills_at),
        "restart_seconds": restarts,
        "told_accepted_or_duplicate": len(told),
        "duplicates": sum(s == "duplicate" for p in fleet for _, s in p.answers),
        "in_aggregate": len(in_aggregate & told),
        "accepted_updates_lost": len(told - in_aggregate),
        "model_versions": store.latest_version().version,
        "errors": [repr(p.error) for p in fleet if p.error],
    }
    store.close()
    return result


def main() -> None:
    import fastapi
    import httpx
    import uvicorn

    with tempfile.TemporaryDirectory(prefix="fedkit-b3-") as tmp:
        runs = {str(n): throughput(Path(tmp) / f"tp{n}", n) for n in VERSIONS}
        rec = recovery(Path(tmp) / "recovery")
    rss = {n: r["server_peak_rss_mb"] for n, r in runs.items()}
    write_result(
        "aggregator",
        config={
            "update": {
                "tensors": {k: list(v) for k, v in HEAD.items()},
                "encoding": "int8",
                "model_fp32_kb": round(4 * sum(int(np.prod(s)) for s in HEAD.values()) / 1024, 1),
            },
            "throughput_mode": "fedbuff, buffer = phones (each phone pushes once per version)",
            "versions_pushed": VERSIONS,
            "recovery_mode": "fedavg, min_reports = phones, SIGKILL after 10 and 35 counted pushes",
            "seed": SEED,
            "versions": {
                "python": platform.python_version(),
                "numpy": np.__version__,
                "fastapi": fastapi.__version__,
                "uvicorn": uvicorn.__version__,
                "httpx": httpx.__version__,
            },
            "transport": "HTTP on loopback, phones as threads of one process",
        },
        figures={
            "throughput": runs,
            "peak_rss_mb_by_phones": rss,
            "rss_growth_10_to_200_phones": round(rss["200"] / rss["10"], 3),
            "recovery": rec,
            "accepted_updates_lost": rec["accepted_updates_lost"],
        },
    )


if __name__ == "__main__":
    main()
