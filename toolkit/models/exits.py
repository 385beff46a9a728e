"""Early exits: a SplittableModel with a small classifier branch after chosen blocks.

An exit sits at a *position* ``p``: after block ``p - 1``, on the activation the phone has once
it ran blocks ``[0, p)``. The model's own classifier is the final exit, at position ``n`` (every
block). A phone whose plan stops at exit ``p`` (its ``cut``) holds blocks ``[0, p)`` and every
branch at a position up to ``p``, never the blocks past it.

**Default positions** (``default_exits``): after the last block of each stage, where the next
block changes the activation's shape, except where the backbone so far costs under 30 % of the
model's forward FLOPs or over 90 %. Measured on Fashion-MNIST at 32×32 with MobileNetV2's frozen
ImageNet blocks, a branch trained centrally (20,000 images, 3 epochs, SGD 0.01): at positions 2
and 4 (under 30 %) the branch reaches 0.65 and 0.75 and its 1×1 convolution costs more than the
blocks before it; positions 7, 11, 14, 17 reach 0.81, 0.85, 0.84, 0.82, the final classifier
0.80; position 18 and later leave under 10 % of the forward to save. So MobileNetV2's exits are
7, 11, 14, 17 and the final one. A model made of *layers* of several blocks says where they end
(``SplittableModel.layer_ends``); its exits default to those positions instead: a searched
network (``toolkit.nas.space``) has one exit after each of its seven stage pools.

**Branch shape** (``branch``): a 1×1 convolution to ``BRANCH_WIDTH`` channels with ReLU, global
average pooling, a linear classifier; where the activation is already 1×1, pooling and the linear
layer alone. The convolution measurably helps on spatial maps (+4.3, +3.5, +1.7 points at
positions 7, 11, 14) and not on 1×1 ones (−0.5 at position 17). Each branch's weights are fresh,
created right after ``torch.manual_seed(seed + p)``.

**Parts.** The phone's frozen part (``frozen_part``) runs blocks ``[0, s)`` and returns one flat
row per image: the activation at every exit position before ``s`` (a *tap*), then the
activation at ``s``; its output is computed once per shard like any frozen part's. The trainable
part (``exit_part``) reads such a row, runs the branches on the taps and blocks ``[s, stop)`` with
their branches, and returns the logits of every exit it holds, stacked as (batch, exits, classes).
Parameter names are the whole model's (``exits.7.0.weight`` for a branch), so the manifest, the
codec and the aggregator speak of the same tensors as for any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.errors import ModelError
from toolkit.models.splittable import SplittableModel, _attach, _count_flops, _lookup

BRANCH_WIDTH = 128
EXITS_ROOT = "exits"  # the branches' module in the model: exits.<position>.<layer>
# The default positions' bounds, as shares of the model's forward FLOPs (see the module's doc).
MIN_SHARE, MAX_SHARE = 0.30, 0.90
SPEC_SEPARATOR = "+exits"  # "mobilenet_v2+exits" (default positions) or "mobilenet_v2+exits:7,11,14"


def split_spec(model_id: str) -> tuple[str, tuple[int, ...] | None]:
    """``"name+exits:7,11"`` → ("name", (7, 11)); ``"name+exits"`` → ("name", ()): the default
    positions; ``"name"`` → ("name", None): no exits."""
    base, sep, rest = model_id.partition(SPEC_SEPARATOR)
    if not sep:
        return model_id, None
    if rest == "":
        return base, ()
    if not rest.startswith(":"):
        raise ModelError(f"model {model_id!r}: write {base}+exits, or {base}+exits:P,Q,… with exit positions")
    try:
        positions = tuple(int(p) for p in rest[1:].split(","))
    except ValueError as exc:
        raise ModelError(f"model {model_id!r}: exit positions must be integers, e.g. {base}+exits:7,11,14") from exc
    return base, positions


@dataclass(frozen=True)
class ExitStats:
    """What inference up to one exit costs per image: the backbone before it and every branch up
    to it (an early-exit predictor runs them all when it goes that far)."""

    position: int
    block: str  # the last block before it ("classifier" for the final exit)
    branch_flops: int
    branch_params: int
    flops: int  # blocks [0, position) + every branch up to this one, forward, per image
    params: int  # the same blocks' and branches' parameters


def branch(shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """The classifier branch for an activation of ``shape`` (channels, height, width) or (features,)."""
    if len(shape) == 1:
        return nn.Sequential(nn.Linear(shape[0], num_classes))
    channels, *spatial = shape
    if math.prod(spatial) == 1:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))
    return nn.Sequential(
        nn.Conv2d(channels, BRANCH_WIDTH, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(BRANCH_WIDTH, num_classes),
    )


def default_exits(model: SplittableModel) -> tuple[int, ...]:
    """The model's layer ends if it has them, else the positions after a stage's last block
    between 30 % and 90 % of the forward FLOPs."""
    if model.layer_ends:
        return model.layer_ends
    stats = model.stats
    total = sum(s.flops for s in stats)
    done, out = 0, []
    for p in range(1, len(stats)):
        done += stats[p - 1].flops
        changes = stats[p - 1].out_shape != stats[p].out_shape
        if changes and len(stats[p - 1].out_shape) == 3 and MIN_SHARE <= done / total <= MAX_SHARE:
            out.append(p)
    return tuple(out)


class ExitModel(SplittableModel):
    """A SplittableModel with branch classifiers at ``branch_positions`` (the final exit, the
    model's own classifier, at position n)."""

    def __init__(self, model: SplittableModel, positions: tuple[int, ...] | None = None, seed: int = 0):
        super().__init__(
            model.model_id, model.root, model.block_names, model.input_shape, model.num_classes, model.layer_ends
        )
        positions = default_exits(model) if not positions else tuple(positions)
        n = len(self.block_names)
        if list(positions) != sorted(set(positions)) or not all(1 <= p < n - 1 for p in positions):
            raise ModelError(
                f"exit positions {list(positions)} for {model.model_id}: give increasing positions between 1 and "
                f"{n - 2} (position p is after block p-1; the model's classifier is the final exit)"
            )
        shapes = [s.out_shape for s in model.stats]
        if any(len(shapes[p - 1]) != 3 for p in positions):
            raise ModelError(
                f"exit positions {list(positions)}: every exit must follow a block with a (C, H, W) output"
            )
        branches = nn.ModuleDict()
        for p in positions:
            torch.manual_seed(seed + p)
            branches[str(p)] = branch(shapes[p - 1], self.num_classes)
        _attach(self.root, EXITS_ROOT, branches)
        self.root.eval()
        self.branch_positions = positions
        self.model_id = f"{model.model_id}{SPEC_SEPARATOR}:{','.join(map(str, positions))}"

    @property
    def exits(self) -> tuple[int, ...]:
        """Every exit's position, the final one (n) included."""
        return (*self.branch_positions, len(self.block_names))

    def held_exits(self, cut: int) -> tuple[int, ...]:
        """The exits a phone whose plan stops at ``cut`` holds."""
        self.check_exit(cut)
        return tuple(p for p in self.exits if p <= cut)

    def check_exit(self, cut: int) -> None:
        if cut not in self.exits:
            raise ModelError(
                f"{self.model_id} has exits at {', '.join(map(str, self.exits))}: a phone's cut must be one of them"
            )

    def branch_module(self, position: int) -> nn.Module:
        return _lookup(self.root, f"{EXITS_ROOT}.{position}")

    def shape_at(self, position: int) -> tuple[int, ...]:
        return tuple(self.input_shape) if position == 0 else self.stats[position - 1].out_shape

    def frozen_part(self, stop: int) -> TapPart:
        """Blocks [0, stop) → one flat row per image: the taps before ``stop``, then the activation at ``stop``."""
        self.check_cut(stop)
        return TapPart(self, stop)

    def trainable_part(self, start: int, stop: int) -> ExitPart:
        return self.exit_part(start, stop)

    def exit_part(self, start: int, stop: int) -> ExitPart:
        """Reads ``frozen_part(start)``'s rows; returns the logits of the exits held at ``stop``."""
        self.check_cut(start)
        self.check_exit(stop)
        if start > stop:
            raise ModelError(f"an exit part runs from block {start} to an exit at or after it, not {stop}")
        return ExitPart(self, start, stop)

    def exit_stats(self) -> list[ExitStats]:
        out = []
        flops = params = 0
        for p in self.exits:
            before = self.stats[:p]
            if p < len(self.block_names):
                module = self.branch_module(p)
                b_params = sum(q.numel() for q in module.parameters())
                with torch.no_grad():
                    b_flops = _count_flops(module.eval(), torch.zeros(1, *self.shape_at(p)))
            else:
                b_flops = b_params = 0
            flops += b_flops
            params += b_params
            out.append(
                ExitStats(
                    position=p,
                    block=self.block_names[p - 1],
                    branch_flops=b_flops,
                    branch_params=b_params,
                    flops=sum(s.flops for s in before) + flops,
                    params=sum(s.params for s in before) + params,
                )
            )
        return out


class TapPart(nn.Module):
    """Blocks [0, stop) of an ExitModel, returning taps + the activation at ``stop`` as one flat row."""

    def __init__(self, model: ExitModel, stop: int):
        super().__init__()
        self.block_names = model.block_names[:stop]
        self.taps = {p for p in model.branch_positions if p < stop}
        for name, module in model.blocks[:stop]:
            _attach(self, name, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, name in enumerate(self.block_names):
            x = _lookup(self, name)(x)
            if i + 1 in self.taps:
                rows.append(x.flatten(1))
        return torch.cat([*rows, x.flatten(1)], dim=1)


class ExitPart(nn.Module):
    """Blocks [start, stop) of an ExitModel and the branches of every exit up to ``stop``, on rows
    of ``frozen_part(start)`` (or images, when ``start`` is 0); returns (batch, exits, classes)."""

    def __init__(self, model: ExitModel, start: int, stop: int):
        super().__init__()
        n = len(model.block_names)
        self.block_names = model.block_names[start:stop]
        self.start = start
        self.tap_shapes = [(p, model.shape_at(p)) for p in model.branch_positions if p < start]
        self.input_shape = model.shape_at(start)
        self.branches = [p for p in model.branch_positions if start <= p <= stop]
        self.final = stop == n
        for name, module in model.blocks[start:stop]:
            _attach(self, name, module)
        for p in [p for p, _ in self.tap_shapes] + self.branches:
            _attach(self, f"{EXITS_ROOT}.{p}", model.branch_module(p))

    def _branch(self, p: int, h: torch.Tensor) -> torch.Tensor:
        return _lookup(self, f"{EXITS_ROOT}.{p}")(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        logits, at = [], 0
        for p, shape in self.tap_shapes:
            size = math.prod(shape)
            logits.append(self._branch(p, flat[:, at : at + size].reshape(-1, *shape)))
            at += size
        h = flat[:, at:].reshape(-1, *self.input_shape)
        position = self.start
        if position in self.branches:
            logits.append(self._branch(position, h))
        for name in self.block_names:
            h = _lookup(self, name)(h)
            position += 1
            if position in self.branches:
                logits.append(self._branch(position, h))
        if self.final:
            logits.append(h)
        return torch.stack(logits, dim=1)
