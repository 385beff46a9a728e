"""Aggregation as pure functions over decoded updates (already validated by the caller).

Updates may cover different subsets of tensors (phones fine-tune different depths): each
tensor is combined over the updates that contain it; the result holds the union.

Memory: the mean (FedAvg, FedBuff) streams, one update at a time, into one running sum per
tensor: O(model size) however many phones report. The median and the trimmed mean need every
update's value of a coordinate at once, which is O(phones) per coordinate by nature; they work
in chunks of coordinates so that phones × chunk stays under ``budget_floats``, reading the
updates once per chunk (more passes, bounded memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from toolkit.errors import InternalError

Method = Literal["mean", "trimmed_mean", "median"]
DEFAULT_BUDGET_FLOATS = 8 * 1024 * 1024  # 32 MB of float32 per chunk of a robust aggregate


@dataclass(frozen=True)
class Contribution:
    """One accepted update: its delta tensors, its sample count and its staleness (model
    versions between the one it trained from and the one it updates)."""

    tensors: Mapping[str, np.ndarray]
    num_samples: int
    staleness: int = 0


def staleness_weight(staleness: int, kind: str = "sqrt") -> float:
    """FedBuff's discount of a stale update: 1/sqrt(1+s), or 1 for "constant"."""
    return 1.0 if kind == "constant" else 1.0 / math.sqrt(1.0 + staleness)


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    # Not np.dot: BLAS threads cost milliseconds per call on a loaded machine.
    return math.sqrt(sum(float(np.square(t, dtype=np.float64).sum()) for t in tensors.values()))


def clip_norm(tensors: Mapping[str, np.ndarray], max_norm: float) -> dict[str, np.ndarray]:
    """Scales the whole update down so its L2 norm is at most ``max_norm``."""
    norm = l2_norm(tensors)
    scale = 1.0 if norm <= max_norm else max_norm / norm
    return {name: (t * np.float32(scale)).astype(np.float32) for name, t in tensors.items()}


class MeanAccumulator:
    """Streaming weighted mean per tensor: sum(w_i * x_i) / sum(n_i) over the updates that hold
    the tensor. With w_i = n_i this is FedAvg; FedBuff passes w_i = n_i * staleness_weight so a
    stale update moves the model less instead of reweighting the others up."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._norms: dict[str, float] = {}

    def add(self, tensors: Mapping[str, np.ndarray], weight: float, norm: float) -> None:
        for name, t in tensors.items():
            if name not in self._sums:
                self._sums[name] = np.zeros(t.shape, np.float64)
                self._norms[name] = 0.0
            self._sums[name] += weight * t
            self._norms[name] += norm

    def result(self) -> dict[str, np.ndarray]:
        if not self._sums:
            raise InternalError("aggregating zero updates: the caller must only aggregate accepted updates")
        return {name: (s / self._norms[name]).astype(np.float32) for name, s in self._sums.items()}


def _prepared(c: Contribution, clip: float | None, staleness_kind: str) -> tuple[dict[str, np.ndarray], float]:
    tensors = clip_norm(c.tensors, clip) if clip is not None else dict(c.tensors)
    return tensors, staleness_weight(c.staleness, staleness_kind)


def aggregate(
    contributions: Callable[[], Iterable[Contribution]],
    *,
    method: Method = "mean",
    trim_fraction: float = 0.1,
    clip: float | None = None,
    staleness_kind: str = "sqrt",
    budget_floats: int = DEFAULT_BUDGET_FLOATS,
) -> dict[str, np.ndarray]:
    """The combined delta of the updates ``contributions()`` yields (called once per pass, so
    it should read them lazily from the store). Mean: weighted by samples (and staleness).
    Median and trimmed mean: unweighted per coordinate, each update scaled by its staleness
    weight first."""
    if method == "mean":
        acc = MeanAccumulator()
        for c in contributions():
            tensors, discount = _prepared(c, clip, staleness_kind)
            acc.add(tensors, weight=c.num_samples * discount, norm=c.num_samples)
        return acc.result()
    return _robust(contributions, method, trim_fraction, clip, staleness_kind, budget_floats)


def _robust(contributions, method, trim_fraction, clip, staleness_kind, budget_floats) -> dict[str, np.ndarray]:
    # First pass: which tensors exist, their shapes and how many updates hold each.
    shapes: dict[str, tuple[int, ...]] = {}
    holders: dict[str, int] = {}
    for c in contributions():
        for name, t in c.tensors.items():
            shapes[name] = t.shape
            holders[name] = holders.get(name, 0) + 1
    if not shapes:
        raise InternalError("aggregating zero updates: the caller must only aggregate accepted updates")
    out = {name: np.empty(int(np.prod(shape)), np.float32) for name, shape in shapes.items()}
    for pieces in _chunks(shapes, holders, budget_floats):
        columns: dict[tuple[str, int, int], list[np.ndarray]] = {p: [] for p in pieces}
        for c in contributions():
            tensors, discount = _prepared(c, clip, staleness_kind)
            for name, start, stop in pieces:
                if name in tensors:
                    columns[(name, start, stop)].append(tensors[name].ravel()[start:stop] * np.float32(discount))
        for (name, start, stop), rows in columns.items():
            out[name][start:stop] = _combine(np.stack(rows), method, trim_fraction)
    return {name: flat.reshape(shapes[name]) for name, flat in out.items()}


def _chunks(shapes, holders, budget_floats):
    """Groups of (tensor, start, stop) slices whose holders × length stays within the budget."""
    group, used = [], 0
    for name, shape in shapes.items():
        size, n = int(np.prod(shape)), holders[name]
        step = max(1, budget_floats // n)
        for start in range(0, size, step):
            stop = min(size, start + step)
            cost = (stop - start) * n
            if group and used + cost > budget_floats:
                yield group
                group, used = [], 0
            group.append((name, start, stop))
            used += cost
    if group:
        yield group


def _combine(rows: np.ndarray, method: str, trim_fraction: float) -> np.ndarray:
    if method == "median":
        return np.median(rows, axis=0).astype(np.float32)
    n = rows.shape[0]
    k = math.floor(trim_fraction * n)
    if n - 2 * k < 1:
        k = (n - 1) // 2
    ordered = np.sort(rows, axis=0)
    return ordered[k : n - k].mean(axis=0).astype(np.float32)
