"""The edge's side of SplitFed: per phone, a copy of the blocks past that phone's cut, trained
in PyTorch on the activations the phone sends, answering with the gradient at the cut.

One batch is one message each way, both codec containers in the phone's encoding (int8 by
default; the edge answers in the encoding the activation came in):

    phone → edge   kind "activation", header (phone, round, base version, batch size B):
                   tensor <the phone's last block>, e.g. "features.13": its output (B, ...)
                   tensor "labels": (B,) class indices, fp32
    edge → phone   kind "gradient": tensor <the same name>, d(mean cross-entropy)/d(activation),
                   and "loss" (a scalar, fp32)

The activation's name says where the phone cut the model, so phones with different cuts need
no other set-up. The edge checks the round like a push does (open, assigned to this phone,
same base version, no update pushed yet) and keeps per phone one copy of blocks [cut, n) with
its SGD momentum (lr and momentum of the round's stage) and the last batch id and answer:

- a retried batch (same id: the phone's answer was lost) gets the cached answer again and
  does not train twice; batch 0 (re)starts the phone's round on a fresh copy; the next id
  (last + 1) trains;
- any other id cannot continue the phone's round: the edge holds no copy of this round for
  the phone past batch 0 (the aggregator restarted, or the copy was dropped), or the id is
  behind or ahead of the copy's last batch. Training it would leave the edge's part of the
  update without batches the phone's part has, so the answer is 409 with the header
  ``X-Fedkit-Batch: restart`` (status "restart"): the phone resets its weights and optimizer
  to the round's base and sends batch 0;
- the copies are made from the round's global model, and dropped when the next round's first
  batch arrives, so the edge holds at most one copy per phone of the open round;
- when the phone's update is accepted, the coordinator merges this copy into it (as a delta
  from the round's base, with the phone's sample count): at round end every block is averaged
  over every copy that trained it, on phones and here alike. A SplitFed update (one without
  the model's last block, which the edge always trains) whose copy the edge does not hold is
  answered "restart" too (409): accepting it would drop the edge's part.

Work runs on a pool of ``workers`` threads behind a bounded queue: a batch that finds
``workers + queue`` batches in work or waiting, or a new phone when ``max_copies`` copies are
held, is answered 503 with Retry-After instead of piling up.

Locks, always taken in this order: the store's (the coordinator merging a copy in its push
transaction) → a phone's → the edge's map lock. Training never touches the store while
holding a phone's lock.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import nn

from device_runtime.codec import Update, UpdateHeader, decode, encode
from device_runtime.errors import CodecError
from toolkit.aggregator.config import EdgeConfig, Stage
from toolkit.aggregator.coordinator import Coordinator
from toolkit.errors import ConfigError, InternalError
from toolkit.models import SplittableModel

EDGE_ID = "edge"
LABELS = "labels"
LOSS = "loss"


class PhoneTraffic(BaseModel):
    """One phone's SplitFed traffic with the edge, retries included (bytes on the wire)."""

    device_id: str
    cut: int
    round: int
    batches: int  # trained
    samples: int
    retries: int  # batches answered again from the cache
    activation_bytes: int  # phone → edge
    gradient_bytes: int  # edge → phone
    edge_seconds: float = 0.0  # the edge's compute for this phone (its part's forward, backward and step)


class EdgeStatus(BaseModel):
    schema_version: int = 1
    model: str
    workers: int
    capacity: int  # batches in work or waiting at once
    in_flight: int
    busy_answers: int  # 503s so far
    copies: int  # per-phone model copies held
    edge_seconds: dict[int, float] = {}  # per round: the edge's compute, every phone's batches
    phones: list[PhoneTraffic]


@dataclass(frozen=True)
class BatchReply:
    """The edge's definite answer to one batch. ``status``: trained, retry (the cached answer),
    busy (503), restart (409: send batch 0), stale (409), or rejected; ``body`` holds the
    gradient message when ``code`` is 200. Sent as the ``X-Fedkit-Batch`` header."""

    status: str
    code: int
    reason: str = ""
    body: bytes = b""
    retry_after: int | None = None


@dataclass
class _Copy:
    """One phone's copy of blocks [cut, n) for one round."""

    round: int
    cut: int
    base: dict[str, np.ndarray]  # the round's global tensors (shared by every copy of the round)
    part: nn.Module
    optimizer: torch.optim.Optimizer
    last_batch: int = -1
    last_reply: bytes = b""


def _refused(code: int, reason: str) -> BatchReply:
    return BatchReply("stale" if code == 409 else "rejected", code, reason)


def edge_step(
    part: nn.Module, optimizer: torch.optim.Optimizer, activation: np.ndarray, labels: np.ndarray
) -> tuple[float, np.ndarray]:
    """One SGD step of the edge's part on one batch: (mean cross-entropy, its gradient with
    respect to ``activation``). The parameters' gradients, taken before the step, stay in
    their ``.grad``."""
    x = torch.tensor(activation, dtype=torch.float32, requires_grad=True)
    optimizer.zero_grad()
    loss = F.cross_entropy(part(x), torch.tensor(labels, dtype=torch.int64))
    loss.backward()
    optimizer.step()
    if x.grad is None:  # backward fills it: the loss depends on x, which requires grad
        raise InternalError("the edge's backward left no gradient at the cut")
    return loss.item(), x.grad.numpy()


def initial_weights(model: SplittableModel, train_from: int) -> bytes:
    """A run's version 0 (codec fp32, kind "weights"): every parameter of blocks [train_from,
    n), and of every early-exit branch of a model with exits, so it holds what any phone
    training from ``train_from`` or later trains, and what the edge trains past any cut."""
    part = model.trainable_part(train_from, len(model.block_names))
    tensors = {name: p.detach().cpu().numpy().copy() for name, p in part.named_parameters()}
    return encode(UpdateHeader(EDGE_ID, 0, 0, 0, kind="weights"), tensors, "fp32")


class SplitFedEdge:
    """The edge of a synchronous (FedAvg) SplitFed run on ``coordinator``, training ``model``'s
    blocks past each phone's cut. It registers itself with the coordinator, which merges a
    phone's copy into that phone's accepted update."""

    def __init__(
        self,
        coordinator: Coordinator,
        model: SplittableModel,
        config: EdgeConfig = EdgeConfig(),
        *,
        executor: Executor | None = None,  # the worker pool; default: ``config.workers`` threads
    ):
        if coordinator.config.mode != "fedavg":
            raise ConfigError(
                f"SplitFed needs synchronous rounds, the run's mode is {coordinator.config.mode!r}: "
                'set mode = "fedavg"'
            )
        self.coordinator = coordinator
        self.model = model
        self.config = config
        model.root.eval()  # BatchNorm on its running statistics, as on the phones
        self._out_shapes = [s.out_shape for s in model.stats]  # computed once, before any thread
        last = model.block_names[-1]
        self._last_block = {name for name, _ in model.root.named_parameters() if name.startswith(last + ".")}
        self._pool = executor or ThreadPoolExecutor(config.workers, thread_name_prefix="splitfed-edge")
        self._capacity = config.workers + config.queue
        self._lock = threading.Lock()  # guards everything below
        self._in_flight = 0
        self._busy = 0
        self._copies: dict[str, _Copy] = {}
        self._phone_locks: dict[str, threading.Lock] = {}
        self._traffic: dict[str, PhoneTraffic] = {}
        self._edge_seconds: dict[int, float] = {}
        self._global: tuple[int, dict[str, np.ndarray]] | None = None
        coordinator.edge_delta = self.delta

    def close(self) -> None:
        """Stops the workers (batches still waiting are dropped: their phones retry)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- serving ---------------------------------------------------------------------------
    async def submit(self, device_id: str, batch: int, body: bytes) -> BatchReply:
        """Trains one batch on a worker; "busy" at once when the edge is at capacity. A caller
        that goes away meanwhile (the phone vanished) does not stop a batch already running:
        its answer is cached for the phone's retry."""
        with self._lock:
            if self._in_flight >= self._capacity:
                self._busy += 1
                return BatchReply(
                    "busy",
                    503,
                    f"the edge is at capacity ({self._capacity} batches in work or waiting): retry later",
                    retry_after=self.config.retry_after_s,
                )
            self._in_flight += 1
        future = self._pool.submit(self.train_batch, device_id, batch, body)
        future.add_done_callback(lambda _: self._release())
        return await asyncio.wrap_future(future)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def train_batch(self, device_id: str, batch: int, body: bytes) -> BatchReply:
        """Checks one activation message, trains this phone's copy on it and returns the
        gradient message (or the cached one for a retried batch id)."""
        try:
            message = decode(body, max_bytes=self.coordinator.config.limits.max_update_bytes)
        except CodecError as exc:
            return _refused(422, f"activation message does not decode: {exc}")
        checked = self._check_message(device_id, message)
        if isinstance(checked, BatchReply):
            return checked
        cut, activation, labels = checked
        h = message.header
        found = self._check_round(device_id, h)
        if isinstance(found, BatchReply):
            return found
        stage, base = found
        self._count(device_id, cut, h.round, activation_bytes=len(body))

        with self._phone_lock(device_id):
            with self._lock:
                held = self._copies.get(device_id)
            ongoing = held if held is not None and held.round == h.round and held.cut == cut else None
            if ongoing is not None and batch == ongoing.last_batch:
                self._count(device_id, cut, h.round, retries=1, gradient_bytes=len(ongoing.last_reply))
                return BatchReply("retry", 200, body=ongoing.last_reply)
            if batch == 0:
                kept = self._new_copy(device_id, h.round, cut, base, stage)
                if isinstance(kept, BatchReply):
                    return kept
            elif ongoing is None:
                return BatchReply(
                    "restart",
                    409,
                    f"the edge holds no state for round {h.round} of this phone past batch 0 (the aggregator "
                    "restarted, or its copy was dropped): send batch 0 to start the round over",
                )
            elif batch != ongoing.last_batch + 1:
                return BatchReply(
                    "restart",
                    409,
                    f"batch {batch} cannot follow batch {ongoing.last_batch}, the edge's last this round: "
                    "send batch 0 to start the round over",
                )
            else:
                kept = ongoing
            t0 = time.perf_counter()
            loss, grad = edge_step(kept.part, kept.optimizer, activation, labels)
            edge_seconds = time.perf_counter() - t0
            name = self.model.block_names[cut - 1]
            header = UpdateHeader(EDGE_ID, h.round, h.base_version, len(labels), kind="gradient")
            rng = np.random.default_rng([h.round, batch])  # stochastic rounding: same batch, same bytes
            reply = encode(
                header,
                {name: grad, LOSS: np.asarray(loss, dtype=np.float32)},  # the loss as a 0-d tensor
                {name: message.encodings[name], LOSS: "fp32"},
                rng=rng,
            )
            kept.last_batch, kept.last_reply = batch, reply
        self._count(
            device_id,
            cut,
            h.round,
            batches=1,
            samples=len(labels),
            gradient_bytes=len(reply),
            edge_seconds=edge_seconds,
        )
        return BatchReply("trained", 200, body=reply)

    def delta(self, device_id: str, round_: int, phone_tensors: set[str]) -> dict[str, np.ndarray] | str | None:
        """What the coordinator merges into the phone's update of ``round_`` (holding
        ``phone_tensors``): this phone's copy as a delta from the round's base; None for an
        update of the whole model (it holds the last block: no copy to merge); or, for a SplitFed
        update whose copy the edge does not hold, the reason to answer "restart"."""
        with self._phone_lock(device_id):
            with self._lock:
                kept = self._copies.get(device_id)
            if kept is None or kept.round != round_:
                if phone_tensors & self._last_block:
                    return None
                return (
                    f"the edge holds no state for round {round_} of this phone (the aggregator restarted after its "
                    "last batch): its part of the update is lost; train the round again from batch 0 and push that "
                    "update"
                )
            return {name: p.detach().numpy() - kept.base[name] for name, p in kept.part.named_parameters()}

    def status(self) -> EdgeStatus:
        with self._lock:
            return EdgeStatus(
                model=self.model.model_id,
                workers=self.config.workers,
                capacity=self._capacity,
                in_flight=self._in_flight,
                busy_answers=self._busy,
                copies=len(self._copies),
                edge_seconds={r: round(t, 3) for r, t in sorted(self._edge_seconds.items())},
                phones=[t.model_copy() for _, t in sorted(self._traffic.items())],
            )

    # -- checks ----------------------------------------------------------------------------
    def _check_message(self, device_id: str, message: Update) -> tuple[int, np.ndarray, np.ndarray] | BatchReply:
        h = message.header
        if h.device_id != device_id:
            return _refused(403, f"message is signed for device {h.device_id!r}, but this credential is {device_id!r}")
        if h.kind != "activation":
            return _refused(422, f"message kind is {h.kind!r}; the edge takes 'activation' messages")
        names = [n for n in message.tensors if n != LABELS]
        if LABELS not in message.tensors or len(names) != 1:
            return _refused(
                422,
                f"message holds {sorted(message.tensors)}: "
                "send 'labels' and one activation named after the phone's last block",
            )
        (name,) = names
        blocks = self.model.block_names
        if name not in blocks[:-1]:
            return _refused(
                422,
                f"activation {name!r} is not the output of a block of {self.model.model_id} before its last: "
                "name it after the phone's last block",
            )
        cut = blocks.index(name) + 1
        activation, labels = message.tensors[name], message.tensors[LABELS]
        n = h.num_samples
        if activation.shape != (n, *self._out_shapes[cut - 1]) or labels.shape != (n,) or n < 1:
            return _refused(
                422,
                f"activation {activation.shape} and labels {labels.shape} do not fit {n} samples of the output of "
                f"{name} {self._out_shapes[cut - 1]}",
            )
        classes = self.model.num_classes
        if not (np.all(labels == np.round(labels)) and labels.min() >= 0 and labels.max() < classes):
            return _refused(422, f"labels must be class indices 0..{classes - 1}")
        return cut, activation, labels.astype(np.int64)

    def _check_round(self, device_id: str, h: UpdateHeader) -> tuple[Stage, dict[str, np.ndarray]] | BatchReply:
        """(the round's stage, its global tensors), or why the batch cannot be trained now."""
        store = self.coordinator.store
        with store.transaction():
            rnd = store.get_round(h.round)
            if rnd is None or not store.is_assigned(h.round, device_id):
                return _refused(403, f"round {h.round} was not given to this device; pull a task first")
            current = store.current_round()
            if rnd.closed is not None or current is None or current.round != rnd.round:
                return _refused(409, f"round {h.round} is closed; pull a new task")
            if h.base_version != rnd.base_version:
                return _refused(
                    422, f"round {h.round} trains from version {rnd.base_version}, the message says {h.base_version}"
                )
            if store.has_report(device_id, h.round):
                return _refused(
                    409, f"this device already pushed its update for round {h.round}; wait for the next task"
                )
        return self.coordinator.config.stages[rnd.stage], self._global_tensors(rnd.base_version)

    def _global_tensors(self, version: int) -> dict[str, np.ndarray]:
        # Read without the edge's lock (lock order: the store's before the edge's); two threads
        # decoding the same version at once is harmless.
        cached = self._global
        if cached is not None and cached[0] == version:
            return cached[1]
        tensors = decode(self.coordinator.store.version_blob(version)).tensors
        self._global = (version, tensors)
        return tensors

    # -- per-phone state -------------------------------------------------------------------
    def _new_copy(
        self, device_id: str, round_: int, cut: int, base: dict[str, np.ndarray], stage: Stage
    ) -> _Copy | BatchReply:
        part = copy.deepcopy(self.model.edge_part(cut)).eval()
        missing = [name for name, _ in part.named_parameters() if name not in base]
        if missing:
            return _refused(
                422,
                f"the run's global model lacks {missing[:3]}, which the edge trains past cut {cut}: start the run "
                "from toolkit.splitfed.initial_weights, or use a later cut",
            )
        with torch.no_grad():
            for name, p in part.named_parameters():
                p.copy_(torch.from_numpy(base[name]))
        kept = _Copy(round_, cut, base, part, torch.optim.SGD(part.parameters(), lr=stage.lr, momentum=stage.momentum))
        with self._lock:
            for other in [d for d, c in self._copies.items() if c.round != round_]:
                del self._copies[other]  # the round they trained in is over
            if device_id not in self._copies and len(self._copies) >= self.config.max_copies:
                self._busy += 1
                return BatchReply(
                    "busy",
                    503,
                    f"the edge holds copies for {len(self._copies)} phones, its limit: retry later",
                    retry_after=self.config.retry_after_s,
                )
            self._copies[device_id] = kept
        return kept

    def _phone_lock(self, device_id: str) -> threading.Lock:
        with self._lock:
            return self._phone_locks.setdefault(device_id, threading.Lock())

    def _count(self, device_id: str, cut: int, round_: int, **add: float) -> None:
        with self._lock:
            t = self._traffic.get(device_id)
            if t is None:
                t = self._traffic[device_id] = PhoneTraffic(
                    device_id=device_id,
                    cut=cut,
                    round=round_,
                    batches=0,
                    samples=0,
                    retries=0,
                    activation_bytes=0,
                    gradient_bytes=0,
                )
            t.cut, t.round = cut, round_
            for key, value in add.items():
                setattr(t, key, getattr(t, key) + value)
            if "edge_seconds" in add:
                self._edge_seconds[round_] = self._edge_seconds.get(round_, 0.0) + add["edge_seconds"]
