"""A model and one phone's plan → a bundle folder: the phone's model files and manifest.json.

The export is a straight chain of named steps, each writing files under their bundle roles:
``frozen.onnx`` (blocks ``[0, train_from)``, only when some are frozen; see ``fed_from``) → ``trainable.onnx``
(blocks ``[train_from, cut)``) → ONNX Runtime training artifacts → ExecuTorch programs →
``weights`` (the initial trainable weights) → ``manifest.json``. Everything is written into a
hidden folder beside ``out_dir``, verified with the phone's own loader, and renamed into place
at the end: a failed or interrupted export leaves no half-written bundle. The same model and
plan give byte-identical files, so the same manifest and bundle hash.

Phones of one run may train different depths. ``fed_from`` is the first block any phone of the
run trains: the frozen blocks from there on are a part of their own, ``fed.onnx``, whose
parameters are inputs, so the phone runs them with the global model's values (which deeper
phones update) rather than the exported ones. ``frozen.onnx`` keeps only blocks
``[0, fed_from)``, which no phone trains: their outputs are computed once per shard, and only the
few fed blocks run again when the global model moves.

An early-exit plan (``plan.exits``, a model with exits: ``toolkit.models.exits``) exports the
model's ``frozen_part(train_from)`` (its rows carry the activations the held branches before
``train_from`` read, the *taps*) and ``trainable_part(train_from, cut)`` (those branches, blocks
``[train_from, cut)`` and their branches, out to stacked logits (batch, exits, classes)), trained
with ORT's ``"exits"`` loss, the weighted multi-exit cross-entropy. It has no fed part and
ignores ``fed_from``: every phone of an exit run trains from ``min(T, cut)`` for one run-wide
``T``, so no block before ``T`` is ever trained and no phone's frozen blocks are another's
trainable ones. Exit bundles train on the ``ort`` engine only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from device_runtime import __version__
from device_runtime.bundle import MANIFEST, Bundle, sha256_file
from device_runtime.codec import ENCODINGS, UpdateHeader, encode
from device_runtime.folders import is_free, new_folder
from device_runtime.manifest import ENGINES, DevicePlan, FileEntry, Manifest, TensorSpec, linear_layer
from device_runtime.preprocess import InputSpec
from exporters.errors import ExportError
from exporters.onnx import export_onnx
from exporters.ort_training import export_ort_training

# Called before each step and once at the end: (name of the step starting, steps done, steps in all).
Progress = Callable[[str, int, int], None]
# Bumped whenever the files exported for the same model and plan change, so caches of bundles
# (``toolkit.planning.export.cached_bundle``) do not hand out one of an older layout.
# 2: codec format 2 weights; frozen blocks other phones train in fed.onnx.
EXPORT_FORMAT = 2


class SplittableModel(Protocol):
    """What the exporter needs of a model: ``toolkit.models.SplittableModel`` is the one there is.
    Named here, not imported, because the exporters sit below the toolkit."""

    model_id: str
    block_names: list[str]
    input_shape: tuple[int, int, int]
    num_classes: int

    @property
    def exits(self) -> tuple[int, ...]: ...  # the early exits' positions (the last one n); none without exits

    def check_cut(self, cut: int) -> None: ...
    def part(self, start: int, stop: int) -> nn.Module: ...
    def frozen_part(self, stop: int) -> nn.Module: ...
    def trainable_part(self, start: int, stop: int) -> nn.Module: ...
    def content_hash(self) -> str: ...


@dataclass(frozen=True)
class Step:
    name: str  # what a progress bar shows while it runs
    write: Callable[[Path], dict[str, Path]]  # writes into the bundle folder; returns role → file


def export_bundle(
    model: SplittableModel,
    plan: DevicePlan,
    out_dir: str | Path,
    engines: Sequence[str] = ("ort",),
    *,
    label_names: Sequence[str],
    progress: Progress | None = None,
    fed_from: int | None = None,
) -> Manifest:
    """Writes the bundle of ``plan`` for ``model`` into ``out_dir`` (which must not exist yet,
    or be empty) with the files of each engine in ``engines``; returns its manifest. Every part
    is exported in eval mode (BatchNorm on its running statistics, as the phone trains it), and
    ``model`` is left in eval mode."""
    out_dir = Path(out_dir)
    engines = tuple(engines)
    trainable = check_request(model, plan, engines, label_names, out_dir)
    # an exit run has no fed part (see the module's doc)
    split = plan.train_from if plan.exits or fed_from is None else min(fed_from, plan.train_from)
    frozen = model.frozen_part(split) if split > 0 else None
    fed = model.part(split, plan.train_from) if split < plan.train_from else None
    steps = _steps(model, plan, engines, frozen, fed, trainable)
    total = len(steps) + 1  # the manifest is the last step

    with new_folder(out_dir) as staging:
        files: dict[str, Path] = {}
        for done, step in enumerate(steps):
            if progress:
                progress(step.name, done, total)
            files.update(step.write(staging))
        if progress:
            progress("manifest", total - 1, total)
        manifest = Manifest(
            model_id=model.model_id,
            model_hash=model.content_hash(),
            block_names=tuple(model.block_names),
            plan=plan,
            input_spec=InputSpec(*model.input_shape[1:], channels=model.input_shape[0]),
            label_names=tuple(label_names),
            trainable=tuple(
                TensorSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
                for name, p in trainable.named_parameters()
            ),
            files={role: _file_entry(staging, path) for role, path in files.items()},
            fedkit_version=__version__,
        )
        (staging / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
        Bundle.load(staging)  # the phone's verifier must accept what we wrote
    if progress:
        progress("done", total, total)
    return manifest


def check_request(
    model: SplittableModel, plan: DevicePlan, engines: tuple[str, ...], label_names: Sequence[str], out_dir: Path
) -> nn.Module:
    """Everything that can be refused before any file is written; returns the trainable part."""
    model.check_cut(plan.cut)
    if not engines or any(e not in ENGINES for e in engines):
        raise ExportError(f"engines {engines!r} are not a choice of {', '.join(ENGINES)}")
    if plan.engine not in engines:
        raise ExportError(
            f"the plan runs engine {plan.engine!r}, but the bundle is exported for {', '.join(engines)}: add it"
        )
    _check_exits(model, plan, engines)
    _check_encoding(plan.encoding)
    if plan.batch_size < 1:
        raise ExportError(f"the plan's batch size is {plan.batch_size}: it must be 1 or more")
    if len(label_names) != model.num_classes:
        raise ExportError(f"{len(label_names)} label names given for a model with {model.num_classes} classes")
    if not is_free(out_dir):
        raise ExportError(f"{out_dir} already exists: remove it or choose another output folder")
    trainable = model.trainable_part(plan.train_from, plan.cut)
    if not any(True for _ in trainable.parameters()):
        raise ExportError(
            f"the plan trains blocks [{plan.train_from}, {plan.cut}) of {model.model_id} on the phone, which hold no "
            "parameters, so nothing would train there: train at least one block (--train-blocks 1 or more)"
        )
    if (
        "numpy" in engines
        and linear_layer(
            [TensorSpec(n, tuple(p.shape)) for n, p in trainable.named_parameters()], _mode(model, plan) != "classify"
        )
        is None
    ):
        raise ExportError(
            "the numpy engine trains one linear layer at the end of the model (the classifier): "
            "export the whole model (no --cut) with --train-blocks 1, or use --engine ort"
        )
    if "executorch" in engines:
        # Imported only when asked for: executorch takes seconds to import and logs on the way.
        from exporters.executorch import check_trainable_on_executorch

        if _mode(model, plan) == "splitfed":
            raise ExportError(
                "the executorch engine cannot train a SplitFed part "
                f"(cut {plan.cut} < {len(model.block_names)} blocks): "
                "it cannot back-propagate the edge's gradient; use --engine ort"
            )
        check_trainable_on_executorch(trainable)
    return trainable


def _check_exits(model: SplittableModel, plan: DevicePlan, engines: tuple[str, ...]) -> None:
    # A plan and a model agree on the exits: the phone holds every branch up to its cut, no other.
    if not plan.exits and not model.exits:
        return
    if not model.exits:
        raise ExportError(
            f"the plan holds exits at {list(plan.exits)}, but {model.model_id} has none: "
            f"load the model with exits ({model.model_id}+exits, or {model.model_id}+exits:P,Q,…)"
        )
    if plan.cut not in model.exits:
        raise ExportError(
            f"{model.model_id} has exits at {', '.join(map(str, model.exits))}: "
            f"a phone's cut must be one of them, not {plan.cut}"
        )
    held = tuple(p for p in model.exits if p <= plan.cut)
    if not plan.exits:
        raise ExportError(
            f"{model.model_id} has exits: plan the phone with exits={list(held)} (those up to its cut) and their "
            "loss weights (fedkit plan does), or export the model without exits"
        )
    if plan.exits != held:
        raise ExportError(
            f"a phone of {model.model_id} whose cut is {plan.cut} holds the exits at {list(held)}, "
            f"but the plan names {list(plan.exits)}: plan it with exits={list(held)} (fedkit plan does)"
        )
    if engines != ("ort",):
        raise ExportError(
            f"an early-exit bundle trains with the ort engine only, not {', '.join(e for e in engines if e != 'ort')}: "
            "executorch cannot take the multi-exit loss and numpy trains one linear layer; use --engine ort"
        )


def _mode(model: SplittableModel, plan: DevicePlan) -> str:
    """The trainable part's loss (``exporters.ort_training.MODES``)."""
    if plan.exits:
        return "exits"
    return "splitfed" if plan.cut < len(model.block_names) else "classify"


def _check_encoding(encoding: str) -> None:
    # The phone's trainer reads the same two forms; layered_encodings needs at least 1 bit.
    kind, _, bits = encoding.partition(":")
    if encoding in ENCODINGS or (kind == "layered" and _at_least_one(bits)):
        return
    raise ExportError(
        f"update encoding {encoding!r} is unknown: use one of {', '.join(ENCODINGS)}, or layered:BITS "
        "for per-layer bits averaging BITS >= 1 (e.g. layered:4)"
    )


def _at_least_one(text: str) -> bool:
    try:
        return float(text) >= 1
    except ValueError:
        return False


def _steps(
    model: SplittableModel,
    plan: DevicePlan,
    engines: tuple[str, ...],
    frozen: nn.Module | None,
    fed: nn.Module | None,
    trainable: nn.Module,
) -> list[Step]:
    # Example inputs: zeros, so the trace is the same every time; the exporters make the batch dynamic.
    x = torch.zeros(plan.batch_size, *model.input_shape)
    with torch.no_grad():
        f = frozen.eval()(x) if frozen is not None else x
        h = fed.eval()(f) if fed is not None else f
    mode = _mode(model, plan)

    steps = []
    if frozen is not None:
        steps.append(Step("frozen part → ONNX", lambda d: {"frozen.onnx": export_onnx(frozen, x, d / "frozen.onnx")}))
    if fed is not None:
        names = [name for name, _ in fed.named_parameters()]
        steps.append(Step("fed part → ONNX", lambda d: {"fed.onnx": export_onnx(fed, f, d / "fed.onnx", fed=names)}))
    steps.append(
        Step("trainable part → ONNX", lambda d: {"trainable.onnx": export_onnx(trainable, h, d / "trainable.onnx")})
    )
    if "ort" in engines:
        steps.append(Step("ONNX Runtime training artifacts", lambda d: export_ort_training(trainable, h, d, mode=mode)))
    if "executorch" in engines:
        from exporters.executorch import export_executorch_inference, export_executorch_training

        if frozen is not None:
            steps.append(
                Step(
                    "frozen part → ExecuTorch",
                    lambda d: {
                        "executorch.frozen": export_executorch_inference(frozen, x, d / "executorch" / "frozen.pte")
                    },
                )
            )
        steps.append(
            Step(
                "trainable part → ExecuTorch",
                lambda d: {
                    "executorch.train": export_executorch_training(trainable, h, d / "executorch" / "train.pte")
                },
            )
        )
    steps.append(Step("initial weights", lambda d: {"weights": _write_weights(trainable, d / "weights.bin")}))
    return steps


def _write_weights(trainable: nn.Module, path: Path) -> Path:
    # fp32, so the phone starts from exactly the exported weights (round 0, model version 0).
    header = UpdateHeader(device_id="exporter", round=0, base_version=0, num_samples=0, kind="weights")
    tensors = {name: p.detach().cpu().numpy().copy() for name, p in trainable.named_parameters()}
    path.write_bytes(encode(header, tensors, "fp32"))
    return path


def _file_entry(root: Path, path: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), sha256=sha256_file(path), size=path.stat().st_size)
