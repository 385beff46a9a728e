"""The phone's sync loop: pull a task, pull the weights if they are new, train, checkpoint, push.

A phone folder (what ``fedkit deploy`` installs) holds::

    bundles/<name>/       one or more verified bundles (one per trainable depth it may train)
    shard.npz             the phone's images and labels
    credential.json       {"url", "device_id", "token"} or {"url", "device_id", "enrol_token"}
    work/                 trainer checkpoints, feature caches, the last global weights
    events.jsonl          one JSON line per span (train, download, upload, wait, offline) or event

The loop runs until the aggregator answers "done". Before every task pull it answers the open
validation probes (``device_runtime.probes``: a model's accuracy on the phone's held-out slice,
two counts posted, no image sent); a phone started with ``probes_only`` (``--probes-only``: it
needs no bundle) answers probes alone, long-polling for them, until it is stopped. A rejected
update (e.g. a diverged round whose norm is over the limit) is logged and the phone sits that
round out. It is safe to kill at any point: the trainer checkpoints the round and the encoded
update before the push, the aggregator hands out the same task again until it has the update,
and a repeated push is answered "duplicate".
A SplitFed push answered "restart" (the aggregator restarted after the phone's last batch and
lost the edge's part) trains the same task again from batch 0 and pushes that.

The plan is what runs: the phone trains with its bundle's plan (encoding, batch size, local
epochs) unless the task names a value (its stage overrides it). A task that names a trainable
depth (``trainable_blocks``) makes the phone train the deepest of its bundles that is not
deeper, or its shallowest one; a task that names none, its deepest (its planned depth).
Tensors of the global model that its bundle does not train are ignored by it. Standard library,
numpy and device_runtime only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from device_runtime.__main__ import peak_rss_mb
from device_runtime.bundle import Bundle
from device_runtime.client import Assignment, RetryPolicy, SyncClient
from device_runtime.codec import decode
from device_runtime.errors import FedkitError, ProtocolError
from device_runtime.local_round import Task
from device_runtime.probes import evaluate_probe
from device_runtime.split_trainer import SplitRoundResult, SplitTrainer, edge_exchange
from device_runtime.trainer import LocalTrainer, RoundResult

CREDENTIAL = "credential.json"
SHARD = "shard.npz"
BUNDLES = "bundles"
EVENTS = "events.jsonl"
MAX_FAILURES = 5  # consecutive "no definite answer" errors before the phone gives up
PROBE_WAIT_S = 20.0  # a probes-only phone's long poll for probes (under the client's 30 s timeout)

Event = dict[str, Any]  # one line of events.jsonl


@dataclass(frozen=True)
class Credential:
    url: str
    device_id: str
    token: str | None = None
    enrol_token: str | None = None

    @classmethod
    def load(cls, path: Path) -> Credential:
        try:
            data = json.loads(path.read_text())
            return cls(str(data["url"]), str(data["device_id"]), data.get("token"), data.get("enrol_token"))
        except FileNotFoundError as exc:
            raise FedkitError(f"{path} does not exist: deploy the phone with a credential first") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise FedkitError(
                f"{path} is not a credential (JSON with url, device_id and token or enrol_token): {exc}"
            ) from exc

    def save(self, path: Path) -> None:
        data = {k: v for k, v in vars(self).items() if v is not None}
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(data) + "\n")
        os.replace(tmp, path)


@dataclass(frozen=True)
class Hooks:
    """Where an emulated phone shapes the loop; a real phone uses the defaults."""

    before_task: Callable[[], None] = lambda: None  # e.g. wait out an offline window
    after_compute: Callable[[float], None] = lambda seconds: None  # e.g. slow compute down
    transport: httpx.BaseTransport | None = None  # e.g. a shaped link
    on_event: Callable[[Event], None] = lambda event: None  # every event as logged, e.g. printed (main)


class EventLog:
    """Appends one JSON line per event to ``events.jsonl``, flushed at once (a kill loses nothing)."""

    def __init__(self, path: Path, device_id: str, on_event: Callable[[Event], None] = lambda event: None):
        self.device_id = device_id
        self.on_event = on_event
        self._file = open(path, "a", buffering=1)  # noqa: SIM115  (open for the loop's life: close() closes it)

    def write(self, event: str, **fields: Any) -> None:
        record = {"t": round(time.time(), 3), "phone": self.device_id, "event": event, **fields}
        self._file.write(json.dumps(record) + "\n")
        self.on_event(record)

    def span(self, kind: str, start: float, **fields: Any) -> None:
        self.write(kind, start=round(start, 3), end=round(time.time(), 3), **fields)

    def close(self) -> None:
        self._file.close()


class PhoneLoop:
    def __init__(
        self,
        phone_dir: str | Path,
        hooks: Hooks = Hooks(),
        retry: RetryPolicy = RetryPolicy(),
        max_wait_s: float = 10.0,  # longest sleep when told to wait: how soon a new round is noticed
        probes_only: bool = False,  # answer validation probes, train nothing (no bundle needed)
    ):
        self.root = Path(phone_dir)
        self.max_wait_s = max_wait_s
        self.hooks = hooks
        self.probes_only = probes_only
        self.credential = Credential.load(self.root / CREDENTIAL)
        self.bundles = {} if probes_only else _load_bundles(self.root / BUNDLES)
        self.work = self.root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = EventLog(self.root / EVENTS, self.credential.device_id, hooks.on_event)
        self.retry = retry
        self.client = SyncClient(self.credential.url, self.credential.token, retry=retry, transport=hooks.transport)
        self._trainers: dict[str, LocalTrainer | SplitTrainer] = {}
        self._weights: tuple[int, dict[str, np.ndarray]] | None = None  # (version, tensors) last pulled
        self._rejected_round: int | None = None  # its update was rejected: sit the round out
        self._failed_probes: set[str] = set()  # probes this phone cannot run: not tried again

    def run(self) -> int:
        """Trains rounds until the run is done (a probes-only phone: until stopped), answering
        validation probes before each task pull; returns the number of updates pushed."""
        self.log.write("start", pid=os.getpid(), bundles=sorted(self.bundles))
        pushed, failures = 0, 0
        try:
            self._enrol()
            while True:
                self.hooks.before_task()
                try:
                    if self.probes_only:
                        start = time.time()
                        if not self._answer_probes(PROBE_WAIT_S) and time.time() - start < 1:
                            time.sleep(self.max_wait_s)  # the aggregator did not wait: do not poll it flat out
                        failures = 0
                        continue
                    self._answer_probes()
                    assignment = self.client.task()
                    if assignment.status == "done":
                        self.log.write("done", pushed=pushed, peak_rss_mb=round(peak_rss_mb(), 1))
                        return pushed
                    if assignment.status == "wait" or assignment.round == self._rejected_round:
                        start = time.time()
                        time.sleep(min(assignment.retry_after or 1.0, self.max_wait_s))
                        self.log.span("wait", start, round=assignment.round)
                        continue
                    pushed += self._round(assignment)
                    failures = 0
                except ProtocolError as exc:
                    failures += 1
                    self.log.write("error", reason=str(exc), failures=failures)
                    if failures >= MAX_FAILURES:
                        raise
                    # not at once: what failed (the aggregator, or a run the bundle does not fit) needs time to change
                    time.sleep(min(self.retry.base_s * 2**failures, self.retry.cap_s))
        finally:
            self.client.close()
            self.log.close()

    def _enrol(self) -> None:
        cred = self.credential
        if cred.token:
            return
        if not cred.enrol_token:
            raise FedkitError(f"{self.root / CREDENTIAL} holds neither a token nor an enrol_token: deploy a credential")
        token = self.client.enrol(cred.enrol_token, cred.device_id)
        self.credential = Credential(cred.url, cred.device_id, token)
        self.credential.save(self.root / CREDENTIAL)  # the enrolment token is spent: keep the credential
        self.log.write("enrolled")

    def _answer_probes(self, wait_s: float = 0.0) -> int:
        """Answers each open validation probe once (waiting up to ``wait_s`` for one); returns how
        many it tried. A probe the phone cannot run (a model ONNX Runtime refuses or that does
        not fit in memory, a shard it cannot read) is logged and skipped from then on; no answer
        is posted for it, so it does not count."""
        tried = 0
        for task in self.client.probes(wait_s):
            if task.probe in self._failed_probes:
                continue
            tried += 1
            start = time.time()
            try:
                blob = self.client.probe_model(task.probe)
                counts = evaluate_probe(blob, task.input, self.root / SHARD)
            except ProtocolError:
                raise
            except (FedkitError, MemoryError) as exc:  # MemoryError: a probe too big for the phone's memory
                self._failed_probes.add(task.probe)
                self.log.span("probe", start, probe=task.probe, status="failed", reason=str(exc))
                continue
            status = self.client.answer_probe(task.probe, counts.to_json())
            self.log.span("probe", start, probe=task.probe, status=status, correct=counts.correct, total=counts.total)
        return tried

    def _round(self, a: Assignment) -> int:
        name = _pick(self.bundles, a.trainable_blocks)
        task = Task(**a.task_fields(self.bundles[name].manifest.plan))
        global_weights = self._global_weights(task.base_version)
        trainer = self._trainer(name)
        self.log.write("round", round=task.round, stage=a.stage, bundle=name)
        start = time.time()
        result: RoundResult | SplitRoundResult
        accuracy: float | None
        fields: dict[str, object]
        if isinstance(trainer, SplitTrainer):
            result = trainer.run_round(task, global_weights)
            encoded = trainer.encode_update(task, result)
            # only the phone's own compute is slowed down: the edge and the link take their own time
            self.hooks.after_compute(result.compute_seconds)
            accuracy, fields = (
                None,
                {
                    "resumed": result.resumed,
                    "compute_s": round(result.compute_seconds, 3),
                    "exchange_s": round(result.exchange_seconds, 3),
                    "activation_bytes": result.activation_bytes,
                    "gradient_bytes": result.gradient_bytes,
                    "restarts": result.restarts,
                },
            )
        else:
            result = trainer.run_round(task, global_weights)
            encoded = trainer.encode_update(task, result)
            self.hooks.after_compute(time.time() - start)
            accuracy, fields = (
                result.eval_accuracy,
                {
                    "resumed": result.resumed,
                    "compute_s": round(result.feature_seconds + result.train_seconds, 3),
                },
            )
        self.log.span(
            "train",
            start,
            round=task.round,
            bundle=name,
            samples=result.num_samples,
            steps=result.steps,
            loss=result.train_loss,
            accuracy=accuracy,
            **fields,
        )
        start = time.time()
        answer = self.client.push(encoded.payload, encoded.idempotency_key, accuracy)
        self.log.span(
            "upload", start, round=task.round, bytes=len(encoded.payload), status=answer.status, reason=answer.reason
        )
        if answer.status == "rejected":  # pushing the same bytes again would be rejected again
            self._rejected_round = task.round
        if answer.status == "restart":  # SplitFed: the edge lost its part; the same task trains the round again
            if not isinstance(trainer, SplitTrainer):  # the edge holds no part of a whole-model update
                raise ProtocolError(
                    f"the push of round {task.round} was answered restart, an answer only a SplitFed update can get"
                )
            trainer.restart_round(task)
        return int(answer.status == "accepted")

    def _global_weights(self, version: int) -> dict[str, np.ndarray]:
        """The global model's tensors of ``version``, downloaded once (the trainers take what their bundle needs)."""
        if self._weights is None or self._weights[0] != version:
            start = time.time()
            blob, _ = self.client.weights(version)
            self._weights = (version, decode(blob).tensors)
            self.log.span("download", start, version=version, bytes=len(blob))
        return self._weights[1]

    def _trainer(self, name: str) -> LocalTrainer | SplitTrainer:
        if name not in self._trainers:
            bundle, device_id = self.bundles[name], self.credential.device_id
            if bundle.manifest.is_splitfed:
                self._trainers[name] = SplitTrainer(
                    bundle, self.root / SHARD, edge_exchange(self.client), workdir=self.work / name, device_id=device_id
                )
            else:
                self._trainers[name] = LocalTrainer(bundle, self.root / SHARD, self.work / name, device_id=device_id)
        return self._trainers[name]


def bundle_depth(bundle: Bundle) -> int:
    """How many blocks the bundle trains (blocks holding at least one trainable tensor)."""
    names = bundle.manifest.block_names
    return len({b for t in bundle.manifest.trainable for b in names if t.name.startswith(b + ".")})


def _load_bundles(folder: Path) -> dict[str, Bundle]:
    if not folder.is_dir() or not any(folder.iterdir()):
        raise FedkitError(f"{folder} holds no bundle: deploy one with fedkit deploy")
    return {p.name: Bundle.load(p) for p in sorted(folder.iterdir()) if p.is_dir()}


def _pick(bundles: dict[str, Bundle], depth: int | None) -> str:
    by_depth = sorted(bundles, key=lambda n: bundle_depth(bundles[n]))
    fitting = [n for n in by_depth if depth is None or bundle_depth(bundles[n]) <= depth]
    return fitting[-1] if fitting else by_depth[0]


class RoundLines:
    """Prints one line per round from the loop's events (``main`` without ``--json``)::

    round 2 (head, b1): 180 samples, loss 0.8123, local accuracy 71.0%, 3.2 s, 25.1 KB up, 98.4 KB down, push accepted
    """

    def __init__(self) -> None:
        self._start: float | None = None  # the round's first download, or its "round" event
        self._down = 0  # bytes downloaded for the round
        self._round: Event = {}

    def __call__(self, event: Event) -> None:
        kind = event["event"]
        if kind == "download":  # before the round's "round" event: the weights it trains from
            self._start = self._start or event["start"]
            self._down += event["bytes"]
        elif kind == "round":
            self._start = self._start or event["t"]
            self._round = dict(event)
        elif kind == "train":
            self._round.update(samples=event["samples"], loss=event["loss"], accuracy=event["accuracy"])
        elif kind == "upload":
            r = self._round
            loss = "–" if r.get("loss") is None else f"{r['loss']:.4f}"
            accuracy = "–" if r.get("accuracy") is None else f"{r['accuracy']:.1%}"
            answer = event["status"] + (f" ({event['reason']})" if event.get("reason") else "")
            print(
                f"round {r.get('round')} ({r.get('stage')}, {r.get('bundle')}): {r.get('samples')} samples, "
                f"loss {loss}, local accuracy {accuracy}, {event['end'] - (self._start or event['start']):.1f} s, "
                f"{_kb(event['bytes'])} up, {_kb(self._down)} down, push {answer}",
                flush=True,
            )
            self._start, self._down, self._round = None, 0, {}
        elif kind == "probe":
            counts = f"{event['correct']}/{event['total']} right, " if event.get("total") else ""
            why = f" ({event['reason']})" if event.get("reason") else ""
            print(f"probe {event['probe'][:12]}: {counts}{event['status']}{why}", flush=True)
        elif kind == "error":
            print(
                f"no answer from the aggregator ({event['failures']} of {MAX_FAILURES}): {event['reason']}", flush=True
            )
        elif kind == "done":
            print(f"done: the run is over, {event['pushed']} update(s) pushed", flush=True)


def _kb(n: int) -> str:
    return f"{n / 1024:,.1f} KB"


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m device_runtime.phone_loop", description=__doc__.splitlines()[0])
    parser.add_argument(
        "phone_dir", help="the phone folder: bundles/ (unless --probes-only), shard.npz, credential.json"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help=f"print every event as one JSON line (as in {EVENTS}) instead of one line per round",
    )
    parser.add_argument(
        "--probes-only", action="store_true", help="answer validation probes only, train nothing (no bundle needed)"
    )
    parser.add_argument(
        "--max-wait", type=float, default=10.0, help="longest sleep (s) between polls of the aggregator"
    )
    args = parser.parse_args(argv)
    on_event = (lambda event: print(json.dumps(event), flush=True)) if args.json else RoundLines()
    try:
        PhoneLoop(
            args.phone_dir, Hooks(on_event=on_event), max_wait_s=args.max_wait, probes_only=args.probes_only
        ).run()
    except FedkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
