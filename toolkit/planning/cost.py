"""The cost model: a phone's round time and memory for any cut, trainable depth, encoding
and batch, from its DeviceProfile.

Compute. A block's forward time on a device of ``gflops`` (dense-conv GFLOP/s) at batch B is

    (B * sum_k flops_k * cost_k  +  ops * op_overhead) / (gflops * 1e9)

over op kinds k (dense conv, 1x1 conv, depthwise conv, linear, elementwise, and conv weight
reads): ``cost_k`` is how many dense-conv FLOPs one FLOP (or element) of kind k costs.
A part (consecutive blocks exported as one ONNX model, as a bundle's frozen, fed and
trainable files are) is run once per batch, and each run costs

    (run_overhead  +  B * (input + output bytes) * run_byte_cost) / (gflops * 1e9)

on top of its blocks: the session call and copying its feed in and its result out. The probe
times every block as its own run, so summing its block timings counts that overhead once per
block where a bundle pays it once per part: on this host a fused MobileNetV2 forward took
20-35 % less than the sum of its blocks timed alone.
Depthwise convs cost several times a dense FLOP: they move as many bytes per FLOP as an
elementwise op. Convs on tiny feature maps (MobileNetV2's late blocks at 32x32 input are 2x2
and 1x1) are bound by reading their weights once per image, hence the weight-read term.
``op_overhead`` is the dispatch cost of one op in dense-conv FLOPs, so it too scales with the
device. Both are fitted once on this host
(non-negative least squares on relative error, over measured per-block latencies at batch 1
and 32, the probe's kernels, and fused parts timed as one run, which is what separates the
run overhead from the blocks) and shipped in ``calibration.json``; a profile with the model's
own block timings rescales each block to its measurement.

Training. A trainable block costs 3x its forward (forward, then backward for the input and the
weight gradients, each about one forward); a frozen block 1x, and it runs once per round
whatever the local epochs (the trainer computes every sample's features once, then trains
epochs over them; the frozen part's are even cached across rounds, see below). The edge
trains every block behind the cut.

Transfers, every byte a round moves (``transfer_bytes``). Down: the global model's version
blob, fp32, as the aggregator serves it; it holds every tensor any phone of the fleet trains,
i.e. every block from the fleet's shallowest ``train_from`` on (``fed_from``: the phone's own
train_from when planned alone), and the phone downloads all of it (``phone_loop``), also a
head-only phone, whose fed part needs those values. Up: the update of its trainable tensors
in the plan's encoding. SplitFed adds per batch one request: the activation at the cut and
the labels up, the activation gradient and the loss down, the activation and its gradient in
ACTIVATION_ENCODING (``SplitTrainer``'s default). One RTT per round each way, and per SplitFed
batch. Sizes are ``device_runtime.codec.encoded_size``: the exact bytes on the wire, without
the container's JSON header (under 100 bytes a message) and HTTP headers.

What the round time is: the first round's. Later rounds skip the frozen part ``[0,
fed_from)``, whose features the trainer caches per shard; ``predicted["features"]`` says how
many of the compute seconds that is.

Edge. The edge's blocks run at the edge profile's speed; ``edge_load`` phones training at
once share it (processor sharing: each gets 1/load of it).

Early exits (a model with exits, ``toolkit.models.exits``). A choice's cut is one of the
model's exits and the phone holds every branch up to it. Its trainable part runs blocks
``[train_from, cut)`` and every branch it holds (those before ``train_from`` on the frozen
part's taps), so the training compute, memory, update and weights held count the branches as
well as the blocks (``branch_costs``: each branch measured as a block is, on the activation at
its position); the frozen part's output row is its taps and its activation (``row_bytes``) and
the trainable part returns every held exit's logits (``out_bytes``). Nothing runs on the edge.
The version blob holds every branch and blocks ``[T, n)`` for the run's one T
(``planner.exit_train_from``), and a phone downloads all of it as any phone does: the branches
past its exit too, a few hundred KB for MobileNetV2's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from scipy.optimize import nnls
from torch import nn

from device_runtime.codec import encoded_size
from device_runtime.split_trainer import LABELS, LOSS
from toolkit.errors import PlanError
from toolkit.models import ExitModel, SplittableModel
from toolkit.models.exits import EXITS_ROOT, split_spec
from toolkit.profiling.profile import DeviceProfile, Link

KINDS = ("conv", "pointwise", "depthwise", "linear", "elementwise", "weight_reads")
RUN_KINDS = ("run_overhead", "run_byte_cost")  # what one run of a part costs beyond its blocks
ACTIVATION_ENCODING = "int8"  # SplitFed activations and gradients: SplitTrainer's default
TRAIN_FACTOR = 3.0  # a trainable block: forward + backward ~ 2 forwards
MB = 1e6
# Resident memory of the runtime itself. ort: 66-83 MB measured here for a numpy +
# onnxruntime process running a forward (training artifacts loaded in the same range);
# executorch: estimate, its runtime is a few MB of native code plus the program; numpy: the
# same numpy + onnxruntime process (inference only), without the training session.
ENGINE_MEMORY_MB = {"ort": 85.0, "executorch": 30.0, "numpy": 80.0}
_ELEMENTWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d)


@dataclass(frozen=True)
class BlockCost:
    """What one block costs per sample, split the way the cost model needs it."""

    name: str
    flops: dict[str, int]  # per sample, by kind in KINDS (elementwise: elements touched; weight_reads: conv weights)
    ops: int  # conv, linear and pooling ops: each one a kernel dispatch
    params: int
    param_shapes: dict[str, tuple[int, ...]]  # whole-model names
    in_bytes: int  # fp32 bytes of the block's input
    out_shape: tuple[int, ...]
    peak_bytes: int  # inference: input + the largest intermediate
    saved_bytes: int  # training: every intermediate, kept for backward
    linear_only: bool  # its parameters are all in nn.Linear layers (ExecuTorch can train it)


@dataclass
class _Tally:
    """What one block's leaf modules do in a forward, as their forward hook sees it."""

    flops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    outputs: list[int] = field(default_factory=list)  # fp32 bytes of each leaf's output
    ops: int = 0

    def __call__(self, m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        self.outputs.append(out.numel() * 4)
        if isinstance(m, nn.Conv2d):
            kind = "depthwise" if m.groups > 1 else "pointwise" if m.kernel_size == (1, 1) else "conv"
            self.flops[kind] += 2 * m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups) * out.numel()
            self.flops["weight_reads"] += m.weight.numel()
            self.ops += 1
        elif isinstance(m, nn.Linear):
            self.flops["linear"] += 2 * m.in_features * out.numel()
            self.ops += 1
        elif isinstance(m, _ELEMENTWISE):
            self.flops["elementwise"] += inp[0].numel()
            self.ops += isinstance(m, nn.AdaptiveAvgPool2d)


def _measure(name: str, module: nn.Module, x: torch.Tensor) -> tuple[BlockCost, torch.Tensor]:
    """What ``module`` costs per sample on input ``x`` (one sample), from a forward with hooks on
    every leaf module; returns its cost and its output."""
    tally = _Tally()
    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(tally) for m in leaves]
    in_bytes = x.numel() * 4
    y = module(x)
    for h in handles:
        h.remove()
    parameterised = [m for m in leaves if any(True for _ in m.parameters(recurse=False))]
    cost = BlockCost(
        name=name,
        flops=tally.flops,
        ops=tally.ops,
        params=sum(p.numel() for p in module.parameters()),
        param_shapes={f"{name}.{n}": tuple(p.shape) for n, p in module.named_parameters()},
        in_bytes=in_bytes,
        out_shape=tuple(y.shape[1:]),
        peak_bytes=in_bytes + max(tally.outputs, default=0),
        saved_bytes=in_bytes + sum(tally.outputs),
        linear_only=all(isinstance(m, nn.Linear) for m in parameterised),
    )
    return cost, y


def block_costs(model: SplittableModel) -> list[BlockCost]:
    """Per-block costs, in order, each block on the previous one's output."""
    costs = []
    x = torch.zeros(1, *model.input_shape)
    was_training = model.root.training
    model.root.eval()
    with torch.no_grad():
        for name, block in model.blocks:
            cost, x = _measure(name, block, x)
            costs.append(cost)
    model.root.train(was_training)
    return costs


def branch_costs(model: SplittableModel) -> list[BlockCost]:
    """Per-branch costs of a model with early exits, in exit order, each branch on the activation
    at its position (none for a plain model)."""
    if not isinstance(model, ExitModel):
        return []
    was_training = model.root.training
    model.root.eval()
    with torch.no_grad():
        costs = [
            _measure(f"{EXITS_ROOT}.{p}", model.branch_module(p), torch.zeros(1, *model.shape_at(p)))[0]
            for p in model.branch_positions
        ]
    model.root.train(was_training)
    return costs


class Calibration(BaseModel):
    """The per-op-kind costs, fitted on one host, and how well they fit there."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = 1
    model_id: str
    host_gflops: float  # the host's dense-conv GFLOP/s the fit is relative to
    cost: dict[str, float]  # dense-conv FLOPs per FLOP of each kind (1 / efficiency)
    op_overhead: float  # dense-conv FLOPs one op dispatch costs
    run_overhead: float = 0.0  # dense-conv FLOPs one run of a part costs (0: not fitted)
    run_byte_cost: float = 0.0  # dense-conv FLOPs per byte a run copies in and out
    error: dict[str, float] = {}  # relative errors on the host, see fit_calibration

    @property
    def efficiency(self) -> dict[str, float]:
        return {k: (1 / c if c > 0 else math.inf) for k, c in self.cost.items()}


@dataclass(frozen=True)
class PartTiming:
    """Blocks [start, stop) timed as one run (one ONNX model) at ``batch``, with the dense-conv
    GFLOP/s of the same host timed in the same rounds."""

    start: int
    stop: int
    batch: int
    seconds: float
    gflops: float


def _features(cost: BlockCost, batch: int) -> list[int]:
    return [batch * cost.flops[k] for k in KINDS] + [cost.ops]


def _io_features(in_bytes: int, out_bytes: int, batch: int) -> list[float]:
    """One run of a part reading ``in_bytes`` and returning ``out_bytes`` per sample (fp32):
    the call, and its feed and result copied."""
    return [1.0, batch * (in_bytes + out_bytes)]


def _run_features(costs: list[BlockCost], batch: int) -> list[float]:
    """One run of the part of consecutive blocks ``costs``."""
    return _io_features(costs[0].in_bytes, 4 * math.prod(costs[-1].out_shape), batch)


def _coef(calibration: Calibration) -> np.ndarray:
    return np.array([calibration.cost[k] for k in KINDS] + [calibration.op_overhead])


def _run_coef(calibration: Calibration) -> np.ndarray:
    return np.array([calibration.run_overhead, calibration.run_byte_cost])


def predict_block(cost: BlockCost, calibration: Calibration, gflops: float, batch: int) -> float:
    """Seconds of the block run on its own (as the probe times it): its work and one run."""
    return predict_part([cost], calibration, gflops, batch)


def predict_part(costs: list[BlockCost], calibration: Calibration, gflops: float, batch: int) -> float:
    """Seconds of one run of consecutive blocks exported as one model (0 for no blocks)."""
    if not costs:
        return 0.0
    work = sum(float(np.dot(_features(c, batch), _coef(calibration))) for c in costs)
    return (work + float(np.dot(_run_features(costs, batch), _run_coef(calibration)))) / (gflops * 1e9)


def fit_calibration(
    model: SplittableModel, profiles: list[DeviceProfile], parts: Sequence[PartTiming] = ()
) -> Calibration:
    """Fits the per-kind costs to one host's measured block latencies and kernels: one
    profile per timed batch (``measure_local(model=..., batch=b)``). Each profile's times are
    taken relative to its own dense-conv GFLOP/s, timed in the same rounds as its blocks, and
    each part's to the conv kernel timed with the parts; all of them the fastest run over
    rounds spread over seconds (``probe.fastest``, as a full profile times), so the fit holds
    for the same host profiled again later. ``parts``, runs of several blocks at once, fit the
    run overhead (without them it stays 0 and the blocks' work absorbs it, as the probe sees it).

    ``error`` holds the mean and max relative error of the per-block predictions (in-sample,
    and leave-one-block-out, where each block is predicted by a fit without it), the error of
    the whole model's forward as the sum of its blocks, at each timed batch, and of each part."""
    costs = block_costs(model)
    kernel_kind = {"conv": "conv", "pointwise": "pointwise", "depthwise": "depthwise", "matmul": "linear"}
    rows: list[list[float]] = []
    ys: list[float] = []
    row_groups: list[int] = []  # a row's block index; -1: a kernel, -2: a part
    weights: list[float] = []
    timings = []
    for profile in profiles:
        timing = profile.timing(model.model_id)
        if timing is None:
            raise PlanError(
                f"profile {profile.name!r} has no block timings of {model.model_id}: "
                f"profile with --model {model.model_id}"
            )
        timings.append(timing)
        for i, c in enumerate(costs):
            rows.append(_features(c, timing.batch) + _run_features([c], timing.batch))
            ys.append(timing.seconds[c.name] * profile.gflops * 1e9)
            row_groups.append(i)
            weights.append(1.0)
        for name, gflops in profile.kernel_gflops.items():
            # a kernel of F FLOPs runs in F / gflops seconds: in dense-conv FLOPs, F * host / gflops
            rows.append([1e9 * (k == kernel_kind[name]) for k in KINDS] + [1, 0, 0])
            ys.append(1e9 * profile.gflops / gflops)
            row_groups.append(-1)
            weights.append(1.0)
    for part in parts:
        blocks = costs[part.start : part.stop]
        rows.append(
            list(np.sum([_features(c, part.batch) for c in blocks], axis=0)) + _run_features(blocks, part.batch)
        )
        ys.append(part.seconds * part.gflops * 1e9)
        row_groups.append(-2)
        weights.append(float(len(blocks)))  # a fused part weighs as much as its blocks timed alone
    a, y, groups, w = np.array(rows, float), np.array(ys, float), np.array(row_groups), np.array(weights)
    if not parts:
        a[:, len(KINDS) + 1 :] = 0  # the run overhead cannot be told from the blocks' own work

    def solve(mask):
        # divide each row by its target: least squares on relative error, so the small late
        # blocks count as much as the big early ones
        coef, _ = nnls(a[mask] / y[mask, None] * w[mask, None], w[mask])
        return coef

    coef = solve(np.ones(len(y), bool))
    in_sample = a @ coef / y - 1
    loo = np.array([(a[j] @ solve(groups != groups[j])) / y[j] - 1 if groups[j] >= 0 else 0.0 for j in range(len(y))])
    error = {}
    block_rows = np.flatnonzero(groups >= 0)
    for t, timing in enumerate(timings):
        sl = block_rows[t * len(costs) : (t + 1) * len(costs)]
        b = timing.batch
        error[f"block_mean_b{b}"] = float(np.mean(np.abs(in_sample[sl])))
        error[f"block_max_b{b}"] = float(np.max(np.abs(in_sample[sl])))
        error[f"block_loo_mean_b{b}"] = float(np.mean(np.abs(loo[sl])))
        error[f"model_b{b}"] = float((a[sl] @ coef).sum() / y[sl].sum() - 1)
    for part, j in zip(parts, np.flatnonzero(groups == -2), strict=True):
        error[f"part_{part.start}_{part.stop}_b{part.batch}"] = float(in_sample[j])
    k = len(KINDS)
    return Calibration(
        model_id=model.model_id,
        host_gflops=float(np.mean([p.gflops for p in profiles])),
        cost=dict(zip(KINDS, (float(c) for c in coef[:k]), strict=True)),
        op_overhead=float(coef[k]),
        run_overhead=float(coef[k + 1]),
        run_byte_cost=float(coef[k + 2]),
        error=error,
    )


def shipped_calibration() -> Calibration:
    """The calibration fitted on the development host (see benchmarks/planner.py)."""
    text = resources.files("toolkit.planning").joinpath("calibration.json").read_text()
    return Calibration.model_validate_json(text)


@dataclass(frozen=True)
class Choice:
    """One candidate for a phone: blocks [0, cut) on the phone, blocks from train_from on train
    (on the phone below the cut, on the edge above it)."""

    cut: int
    train_from: int
    engine: str
    encoding: str
    batch: int


class CostModel:
    """Predicts round time, energy and memory of a choice for one model.

    Its *units* are the model's blocks, in order, then its early-exit branches, in exit order
    (none for a plain model): ``forward_seconds`` and the byte counts index them alike."""

    def __init__(self, model: SplittableModel, calibration: Calibration | None = None):
        self.model = model
        self.calibration = calibration or shipped_calibration()
        self.costs = block_costs(model)
        self.n = len(self.costs)
        self.exits = model.exits  # every exit's position, the final one included (none: a plain model)
        self.branches = branch_costs(model)
        self.units = [*self.costs, *self.branches]
        # the blocks are the base model's: a profile's block timings of it apply to its exit models
        self.timing_id = split_spec(model.model_id)[0]
        # the planner asks for the same byte counts over and over; memos of this instance (a
        # functools.cache on the methods would keep every CostModel alive)
        self._bytes_memo: dict[tuple[tuple[int, ...], str], int] = {}
        self._exchange_memo: dict[tuple[int, int], tuple[int, int]] = {}

    # -- what a choice holds ---------------------------------------------------------------
    def splitfed(self, cut: int) -> bool:
        """The edge trains blocks [cut, n): a cut before the end of a model without exits (a
        phone at an early exit holds the whole model it runs)."""
        return cut < self.n and not self.exits

    def branch_units(self, cut: int) -> list[int]:
        """The units of the branches a phone whose plan stops at ``cut`` holds."""
        return [self.n + i for i, p in enumerate(self.exits[:-1]) if p <= cut]

    def trainable_units(self, cut: int, train_from: int) -> list[int]:
        """What the phone trains: blocks [train_from, cut), and every branch it holds."""
        return [*range(train_from, cut), *self.branch_units(cut)]

    def blob_from(self, train_from: int, fed_from: int | None) -> int:
        """The first block of the global version blob the phone downloads. With ``fed_from``
        the fleet's shallowest train_from; alone, the phone's own. An exit run's ``fed_from`` is
        its one T (``planner.exit_train_from``): a phone whose exit comes before T trains from
        its exit and downloads blocks [T, n) all the same."""
        if fed_from is None:
            return train_from
        return fed_from if self.exits else min(fed_from, train_from)

    def row_bytes(self, position: int) -> int:
        """fp32 bytes per sample of the frozen part's output at ``position`` (the trainable
        part's input): the taps at the exits before it, then the activation at it."""
        taps = [p for p in self.exits[:-1] if p < position]
        return 4 * sum(math.prod(self.activation_shape(p)) for p in (*taps, position))

    def out_bytes(self, cut: int) -> int:
        """fp32 bytes per sample of the phone's trainable part's output: the activation at the
        cut, or the logits of every exit held."""
        if self.exits:
            return 4 * self.model.num_classes * sum(1 for p in self.exits if p <= cut)
        return 4 * math.prod(self.activation_shape(cut))

    def activation_shape(self, cut: int) -> tuple[int, ...]:
        return tuple(self.model.input_shape) if cut == 0 else self.costs[cut - 1].out_shape

    # -- compute ---------------------------------------------------------------------------
    def _work_seconds(self, gflops: float, batch: int) -> np.ndarray:
        coef = _coef(self.calibration)
        return np.array([float(np.dot(_features(c, batch), coef)) for c in self.units]) / (gflops * 1e9)

    def forward_seconds(self, profile: DeviceProfile, batch: int) -> np.ndarray:
        """Forward seconds of each unit at ``batch`` on the device inside a part (its work, not
        the part's run: ``run_seconds``); each block rescaled to the profile's own measurement
        of the model's blocks when it has one (the measurement's own run taken out). Branches
        are never timed alone: theirs are the calibration's."""
        predicted = self._work_seconds(profile.gflops, batch)
        timing = profile.timing(self.timing_id)
        if timing is None:
            return predicted
        if set(timing.seconds) != {c.name for c in self.costs}:
            raise PlanError(
                f"profile {profile.name!r} has timings of {self.timing_id} blocks that do not match the model's: "
                f"re-run `fedkit profile --model {self.timing_id}`"
            )
        at_measured = np.array([predict_block(c, self.calibration, profile.gflops, timing.batch) for c in self.costs])
        measured = np.array([timing.seconds[c.name] for c in self.costs])
        blocks = predicted[: self.n]
        # a block the model prices at nothing scales with the batch
        with np.errstate(divide="ignore", invalid="ignore"):
            rescaled = np.where(at_measured > 0, blocks * measured / at_measured, measured * batch / timing.batch)
        return np.concatenate([rescaled, predicted[self.n :]])

    def run_seconds(self, profile: DeviceProfile, in_bytes: int, out_bytes: int, batch: int) -> float:
        """Seconds one run of a part costs beyond its units' work, for a part reading
        ``in_bytes`` and returning ``out_bytes`` per sample."""
        features = _io_features(in_bytes, out_bytes, batch)
        return float(np.dot(features, _run_coef(self.calibration))) / (profile.gflops * 1e9)

    def _part_seconds(
        self, profile: DeviceProfile, fwd: np.ndarray, units: Sequence[int], in_bytes: int, out_bytes: int, batch: int
    ) -> float:
        """Forward seconds of one run of the part made of ``units`` (0 for none)."""
        if not units:
            return 0.0
        return float(fwd[list(units)].sum()) + self.run_seconds(profile, in_bytes, out_bytes, batch)

    # -- bytes -----------------------------------------------------------------------------
    def _bytes(self, units: Sequence[int], encoding: str) -> int:
        """Encoded bytes of the weights of ``units`` (0 when they have none: nothing is sent)."""
        key = (tuple(units), encoding)
        if key not in self._bytes_memo:
            shapes = {name: shape for i in units for name, shape in self.units[i].param_shapes.items()}
            self._bytes_memo[key] = encoded_size(shapes, encoding) if shapes else 0
        return self._bytes_memo[key]

    def _exchange_bytes(self, cut: int, batch: int) -> tuple[int, int]:
        """Encoded bytes of one SplitFed batch of ``batch`` samples: (the activation at the cut
        and the labels, up; the activation gradient and the loss, down), as SplitTrainer and
        the edge write them."""
        if (cut, batch) not in self._exchange_memo:
            name = self.model.block_names[cut - 1] if cut > 0 else "input"
            shape = (batch, *self.activation_shape(cut))
            up = encoded_size({name: shape, LABELS: (batch,)}, {name: ACTIVATION_ENCODING, LABELS: "fp32"})
            down = encoded_size({name: shape, LOSS: ()}, {name: ACTIVATION_ENCODING, LOSS: "fp32"})
            self._exchange_memo[cut, batch] = (up, down)
        return self._exchange_memo[cut, batch]

    def transfer_bytes(
        self, choice: Choice, samples: int, local_epochs: int = 1, fed_from: int | None = None
    ) -> dict[str, int]:
        """Bytes one round moves: ``down_bytes`` (the global weights: blocks from ``blob_from``
        on and every branch, fp32, the whole version blob the phone pulls), ``up_bytes`` (the
        update of what it trains), and for SplitFed ``activation_bytes`` up and
        ``gradient_bytes`` down over the round's batches."""
        cut, train_from = choice.cut, min(choice.train_from, choice.cut)
        blob = [*range(self.blob_from(train_from, fed_from), self.n), *self.branch_units(self.n)]
        out = {
            "down_bytes": self._bytes(blob, "fp32"),
            "up_bytes": self._bytes(self.trainable_units(cut, train_from), choice.encoding),
        }
        if self.splitfed(cut):
            full, rest = divmod(samples, choice.batch)  # the last batch of an epoch holds the rest
            per_batch = np.array(self._exchange_bytes(cut, choice.batch)) * full
            if rest:
                per_batch += self._exchange_bytes(cut, rest)
            out["activation_bytes"], out["gradient_bytes"] = (int(b) * local_epochs for b in per_batch)
        return out

    def memory_mb(self, choice: Choice) -> float:
        """Peak memory on the phone: runtime, the fp32 weights it holds (blocks and branches),
        frozen-part activations of one batch, and for what it trains their saved activations
        plus gradients and momentum (the optimizer state) and the engine's copy of the weights."""
        cut, train_from, batch = choice.cut, min(choice.train_from, choice.cut), choice.batch
        weights = 4 * sum(self.units[i].params for i in (*range(cut), *self.branch_units(cut)))
        frozen = batch * max((c.peak_bytes for c in self.costs[:train_from]), default=0)
        trainable = [self.units[i] for i in self.trainable_units(cut, train_from)]
        training = batch * sum(c.saved_bytes for c in trainable) + 3 * 4 * sum(c.params for c in trainable)
        buffers = 2 * batch * 4 * math.prod(self.activation_shape(cut)) if self.splitfed(cut) else 0
        return ENGINE_MEMORY_MB[choice.engine] + (weights + frozen + training + buffers) / MB

    def round_time(
        self,
        choice: Choice,
        phone: DeviceProfile,
        edge: DeviceProfile,
        samples: int,
        local_epochs: int = 1,
        edge_load: int = 1,
        phone_fwd: np.ndarray | None = None,
        edge_fwd: np.ndarray | None = None,
        fed_from: int | None = None,
    ) -> dict[str, float]:
        """One round: seconds of compute, upload, download, edge and total, of which
        ``features`` the frozen part's (first round only), and the bytes of ``transfer_bytes``.
        ``fed_from`` is the fleet's shallowest train_from (None: this phone's own; an exit
        run's T, see ``blob_from``). ``phone_fwd`` / ``edge_fwd`` pass precomputed
        forward_seconds at this batch."""
        link = _require_link(phone)
        cut, train_from, batch = choice.cut, min(choice.train_from, choice.cut), choice.batch
        # the fed part [fed, train_from): what others train of this phone's frozen blocks (none
        # in an exit run, whose blob starts at or after every phone's train_from)
        fed = min(self.blob_from(train_from, fed_from), train_from)
        phone_fwd = self.forward_seconds(phone, batch) if phone_fwd is None else phone_fwd
        edge_fwd = self.forward_seconds(edge, batch) if edge_fwd is None else edge_fwd
        per_epoch = math.ceil(samples / batch)
        batches = local_epochs * per_epoch
        rows = self.row_bytes
        # the frozen part [0, fed) and the fed part [fed, train_from): one run each per batch of
        # features, once a round; the trainable part one training run per batch, every epoch
        features = per_epoch * self._part_seconds(phone, phone_fwd, range(fed), rows(0), rows(fed), batch)
        fed_part = per_epoch * self._part_seconds(
            phone, phone_fwd, range(fed, train_from), rows(fed), rows(train_from), batch
        )
        training = (
            batches
            * TRAIN_FACTOR
            * self._part_seconds(
                phone, phone_fwd, self.trainable_units(cut, train_from), rows(train_from), self.out_bytes(cut), batch
            )
        )
        compute = features + fed_part + training
        edge_blocks = range(cut, self.n) if self.splitfed(cut) else range(0)
        edge_time = (
            batches
            * TRAIN_FACTOR
            * self._part_seconds(edge, edge_fwd, edge_blocks, rows(cut), self.out_bytes(self.n), batch)
            * edge_load
        )
        rtt = link.rtt_ms / 1000
        sizes = self.transfer_bytes(choice, samples, local_epochs, fed_from)
        upload = rtt / 2 + _seconds(sizes["up_bytes"], link.uplink_mbps)
        download = rtt / 2 + _seconds(sizes["down_bytes"], link.downlink_mbps)
        if self.splitfed(cut):  # one request per batch: half its RTT each way
            upload += batches * rtt / 2 + _seconds(sizes["activation_bytes"], link.uplink_mbps)
            download += batches * rtt / 2 + _seconds(sizes["gradient_bytes"], link.downlink_mbps)
        total = compute + upload + download + edge_time
        seconds = {
            "compute": compute,
            "upload": upload,
            "download": download,
            "edge": edge_time,
            "total": total,
            "features": features,
        }
        return {**seconds, **{k: float(v) for k, v in sizes.items()}}

    def energy_j(self, predicted: dict[str, float], phone: DeviceProfile) -> float | None:
        """Phone energy of a round: CPU power while computing, radio power while transferring;
        None when the profile lacks either figure."""
        link = _require_link(phone)
        if phone.cpu_power_w is None or link.radio_power_w is None:
            return None
        return (
            predicted["compute"] * phone.cpu_power_w
            + (predicted["upload"] + predicted["download"]) * link.radio_power_w
        )


def _seconds(nbytes: int, mbps: float) -> float:
    return nbytes * 8 / (mbps * 1e6)


def _require_link(profile: DeviceProfile) -> Link:
    if profile.link is None:
        raise PlanError(
            f"profile {profile.name!r} has no link: profile it with --aggregator URL, or plan with --link 3g|4g|5g|wifi"
        )
    return profile.link
