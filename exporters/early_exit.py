"""A model with exits → an early-exit folder: one ONNX file per exit and ``early_exit.json``,
which ``device_runtime.early_exit.EarlyExitPredictor`` runs segment by segment, so the phone
computes only up to the exit where an image stops (the folder's layout is documented there).

The export is a straight chain of named steps: ``check_early_exit`` (refuse what cannot be exported
before any file is written) → ``_segment`` per exit (blocks ``[p_{k-1}, p_k)`` and the exit's
branch, as a module) → ``export_onnx`` per segment (dynamic batch) → the index → the phone's own
loader verifies the folder before it is moved into place. The model's current weights are the
ones exported: merge a trained global model into it first (``fedkit export-global --early-exit``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from device_runtime import __version__
from device_runtime.bundle import sha256_file
from device_runtime.early_exit import INDEX, EarlyExitIndex, EarlyExitPredictor, Segment
from device_runtime.folders import is_free, new_folder
from device_runtime.manifest import FileEntry
from device_runtime.preprocess import InputSpec
from exporters.errors import ExportError
from exporters.onnx import export_onnx

EXAMPLE_BATCH = 2  # the traced batch; the exported batch dimension is dynamic


class ExitStats(Protocol):
    @property
    def position(self) -> int: ...
    @property
    def branch_flops(self) -> int: ...  # forward, per image
    @property
    def flops(self) -> int: ...  # blocks [0, position) and every branch up to this one, forward, per image


class ExitModel(Protocol):
    """What the exporter needs of a model with exits: ``toolkit.models.ExitModel`` is the one
    there is (a plain model has ``exits == ()``). Named here, not imported: the exporters sit
    below the toolkit."""

    model_id: str
    block_names: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def exits(self) -> tuple[int, ...]: ...
    @property
    def blocks(self) -> list[tuple[str, nn.Module]]: ...
    def branch_module(self, position: int) -> nn.Module: ...
    def shape_at(self, position: int) -> tuple[int, ...]: ...
    def exit_stats(self) -> Sequence[ExitStats]: ...
    def content_hash(self) -> str: ...


class SegmentModule(nn.Module):
    """Blocks ``[start, exit)`` and the exit's branch → one row per image: the exit's logits,
    then the activation at the exit flattened (``branch`` None, the final exit: the logits alone)."""

    def __init__(self, blocks: list[nn.Module], branch: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.branch = branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.branch is None:
            return x
        return torch.cat([self.branch(x), x.flatten(1)], dim=1)


def export_early_exit(
    model: ExitModel, out_dir: str | Path, *, label_names: Sequence[str], stop: int | None = None
) -> EarlyExitIndex:
    """Writes the early-exit folder of ``model`` into ``out_dir`` (which must not exist yet, or be
    empty): a segment for each exit up to ``stop`` (default: the final exit), the last one
    returning its logits alone. Returns the index. ``model`` is left in eval mode."""
    out_dir = Path(out_dir)
    exits = check_early_exit(model, out_dir, label_names, stop)
    stats = {s.position: s for s in model.exit_stats()}
    with new_folder(out_dir) as staging:
        segments = []
        earlier_branches = 0  # FLOPs of the branches before the segment's exit
        for k, (start, position) in enumerate(zip((0, *exits[:-1]), exits, strict=True)):
            module = _segment(model, start, position, last=k == len(exits) - 1)
            example = torch.zeros(EXAMPLE_BATCH, *model.shape_at(start))
            path = export_onnx(module, example, staging / f"segment_{k}_exit_{position}.onnx")
            segments.append(
                Segment(
                    exit=position,
                    input_shape=tuple(model.shape_at(start)),
                    file=FileEntry(path.name, sha256_file(path), path.stat().st_size),
                    flops=stats[position].flops,
                    alone_flops=stats[position].flops - earlier_branches,
                )
            )
            earlier_branches += stats[position].branch_flops
        index = EarlyExitIndex(
            model_id=model.model_id,
            model_hash=model.content_hash(),
            input_spec=InputSpec(*model.input_shape[1:], channels=model.input_shape[0]),
            label_names=tuple(label_names),
            segments=tuple(segments),
            fedkit_version=__version__,
        )
        (staging / INDEX).write_text(json.dumps(index.to_dict(), indent=2, sort_keys=True) + "\n")
        EarlyExitPredictor(staging)  # the phone's loader must accept what we wrote
    return index


def check_early_exit(
    model: ExitModel, out_dir: Path, label_names: Sequence[str], stop: int | None = None
) -> tuple[int, ...]:
    """Everything that can be refused before any file is written (a caller may ask first, before
    long work of its own); returns the exits to export."""
    if not model.exits:
        raise ExportError(
            f"{model.model_id} has no early exits: train and export a model with them "
            f"(e.g. {model.model_id}+exits, or {model.model_id}+exits:P,Q for exits after blocks P-1 and Q-1)"
        )
    if stop is not None and stop not in model.exits:
        raise ExportError(
            f"stop {stop} is not an exit of {model.model_id}: choose one of {', '.join(map(str, model.exits))}"
        )
    if len(label_names) != model.num_classes:
        raise ExportError(f"{len(label_names)} label names given for a model with {model.num_classes} classes")
    if not is_free(out_dir):
        raise ExportError(f"{out_dir} already exists: remove it or choose another output folder")
    return tuple(p for p in model.exits if stop is None or p <= stop)


def _segment(model: ExitModel, start: int, position: int, *, last: bool) -> SegmentModule:
    # The final exit is the model's own classifier, the last block: it has no branch.
    blocks = [module for _, module in model.blocks[start:position]]
    branch = model.branch_module(position) if position < len(model.block_names) else None
    if last and branch is not None:
        # an export that stops early: its last segment returns the branch's logits alone
        return SegmentModule([*blocks, branch], None)
    return SegmentModule(blocks, branch)
