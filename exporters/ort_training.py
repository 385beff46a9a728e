"""A trainable part of a model → ONNX Runtime training artifacts for the phone's ``ort`` engine.

The pipeline is a straight chain of named steps:
``_base_model`` (the part as ONNX, BatchNorm as an affine of its running statistics)
→ ``_split_parameters`` (trainable tensors = the part's parameters; buffers frozen)
→ ``_training_model`` (forward + loss + gradient graph, built by ORT's onnxblock)
→ ``_eval_model`` (forward only, parameters fed from the same checkpoint)
→ ``_write`` (the two models and the checkpoint into ``out_dir``).

Three kinds of loss:

- ``"classify"``: mean cross-entropy of the part's logits against an int64 ``labels`` input;
- ``"splitfed"``: the phone's part of a split model. The edge sends the gradient of its loss
  with respect to the cut activation as a ``grad_output`` input, and the loss is
  ``sum(output * grad_output)``, whose gradient for each parameter is exactly the
  vector-Jacobian product the phone needs (the chain rule through the cut);
- ``"exits"``: an early-exit part, whose output is the logits of every exit it holds,
  (batch, exits, classes). The loss is ``-sum(log_softmax(output) * targets)`` with ``targets``
  a float input shaped like the output; the phone fills it with ``lambda_e * onehot(y) / batch``
  (``device_runtime.engines.ort``), so the loss is ``sum_e lambda_e * mean CE(exit e)``, and
  the exit weights stay the plan's, not baked into the graph.

No optimizer model is written: the optimizer step is fedkit's numpy SGD
(``device_runtime.optim``), shared by both engines.

ORT's onnxblock names the nodes it adds from a process-wide counter; we restart it for each
export so the same part always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch
from onnxruntime.training import onnxblock
from onnxruntime.training.onnxblock import _graph_utils
from torch import nn

from exporters.errors import ExportError
from exporters.onnx import MAX_IR_VERSION, OUTPUT_NAME, export_model

MODES = ("classify", "splitfed", "exits")
GRAD_OUTPUT_NAME = "grad_output"
TARGETS_NAME = "targets"
FILES = {
    "ort.training_model": "ort_training_model.onnx",
    "ort.eval_model": "ort_eval_model.onnx",
    "ort.checkpoint": "ort_checkpoint",
}


def export_ort_training(
    module: nn.Module, example: torch.Tensor, out_dir: Path, mode: str = "classify"
) -> dict[str, Path]:
    """Writes the ORT training artifacts of ``module`` (every parameter trains, BatchNorm uses its
    running statistics) into ``out_dir``; returns the file of each bundle role."""
    if mode not in MODES:
        raise ExportError(f"unknown ORT training mode {mode!r}: use one of {', '.join(MODES)}")
    base = _base_model(module, example)
    trainable, frozen = _split_parameters(module, base)
    training_model, parameters = _training_model(base, trainable, frozen, mode)
    eval_model = _eval_model(base, trainable | frozen)
    return _write(Path(out_dir), training_model, eval_model, parameters)


def _base_model(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    # The part as checked ONNX; BatchNorm as plain arithmetic so ORT cannot switch it to batch statistics.
    return export_model(module, example, for_training=True)


def _split_parameters(module: nn.Module, base: onnx.ModelProto) -> tuple[set[str], set[str]]:
    # Trainable: the part's parameters, by whole-model name. Frozen: every other initializer
    # (BatchNorm running statistics), so the checkpoint carries it and ORT never updates it.
    initializers = {init.name for init in base.graph.initializer}
    trainable = {name for name, _ in module.named_parameters()}
    if not trainable:
        raise ExportError(
            f"{type(module).__name__} has no parameters to train: choose a part with at least one trainable block"
        )
    missing = sorted(trainable - initializers)
    if missing:
        raise ExportError(
            f"the ONNX export of this part lost parameters {missing[:5]} (unused in the forward pass?); "
            "train only blocks whose parameters all take part in the output"
        )
    return trainable, initializers - trainable


def _training_model(
    base: onnx.ModelProto, trainable: set[str], frozen: set[str], mode: str
) -> tuple[onnx.ModelProto, tuple[list[onnx.TensorProto], list[onnx.TensorProto]]]:
    # Forward + loss + gradient graph with gradient accumulation, by ORT's onnxblock.
    _graph_utils._GRAPH_TOKEN = 0  # names of added nodes count from here: same part, same bytes
    losses = {"classify": onnxblock.loss.CrossEntropyLoss, "splitfed": _VectorJacobianLoss, "exits": _MultiExitLoss}
    block = _TrainingBlock(losses[mode]())
    for name in sorted(trainable):
        block.requires_grad(name, True)
    for name in sorted(frozen):
        block.requires_grad(name, False)
    try:
        with _native_log_silenced(), onnxblock.base(copy.deepcopy(base)):
            block(OUTPUT_NAME)
    except Exception as exc:  # onnxblock and the gradient builder raise bare RuntimeErrors
        raise ExportError(
            f"ONNX Runtime cannot build the training graph of this part ({type(exc).__name__}: {exc}); "
            "it may use an operator without a gradient in ORT 1.19: train fewer blocks or use another model"
        ) from exc
    training_model, _ = block.to_model_proto()
    return training_model, block.parameters()


@contextlib.contextmanager
def _native_log_silenced() -> Iterator[None]:
    """ORT's gradient builder logs each of its ~40 graph passes to the process's stderr at INFO
    level, whatever severity is configured; this sends file descriptor 2 to a discarded
    temporary file meanwhile (a failure still raises, with ORT's message)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _eval_model(base: onnx.ModelProto, parameters: set[str]) -> onnx.ModelProto:
    # The forward graph alone, its parameters turned into graph inputs as in the training model,
    # so ORT feeds both from the one checkpoint state (ORT's own eval model would add the loss
    # and its labels, grad_output or targets input, which inference does not have).
    model = copy.deepcopy(base)
    kept = []
    for init in model.graph.initializer:
        if init.name in parameters:
            model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
        else:
            kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _write(
    out_dir: Path,
    training_model: onnx.ModelProto,
    eval_model: onnx.ModelProto,
    parameters: tuple[list[onnx.TensorProto], list[onnx.TensorProto]],
) -> dict[str, Path]:
    # The two graphs and the checkpoint (trainable and frozen tensors), at fixed file names.
    for model in (training_model, eval_model):
        if model.ir_version > MAX_IR_VERSION:
            raise ExportError(
                f"ORT wrote a training graph with IR version {model.ir_version}, ONNX Runtime 1.19 reads at most "
                f"{MAX_IR_VERSION}: install onnx==1.17.0 as pinned in pyproject.toml"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {role: out_dir / name for role, name in FILES.items()}
    paths["ort.training_model"].write_bytes(training_model.SerializeToString(deterministic=True))
    paths["ort.eval_model"].write_bytes(eval_model.SerializeToString(deterministic=True))
    onnxblock.save_checkpoint(parameters, paths["ort.checkpoint"])
    return paths


class _TrainingBlock(onnxblock.TrainingBlock):
    """The part's output into the loss; onnxblock builds the gradient graph from the loss."""

    def __init__(self, loss: onnxblock.Block):
        super().__init__()
        self._loss = loss

    def build(self, output_name: str) -> str:
        return self._loss(output_name)


class _VectorJacobianLoss(onnxblock.Block):
    """``sum(output * grad_output)`` with ``grad_output`` a new input shaped like the output: the
    gradient of this scalar for a parameter p is grad_output · ∂output/∂p."""

    def build(self, output_name: str) -> str:
        grad_output = onnxblock.blocks.InputLike(output_name)(GRAD_OUTPUT_NAME)
        return onnxblock.blocks.ReduceSum(keepdims=False)(onnxblock.blocks.Mul()(output_name, grad_output))


class _MultiExitLoss(onnxblock.Block):
    """``-sum(log_softmax(output, axis=-1) * targets)`` with ``targets`` a new float input shaped
    like the output (batch, exits, classes): with ``targets = lambda_e * onehot(y) / batch`` it
    is the weighted sum of every exit's mean cross-entropy. LogSoftmax, Mul, ReduceSum and Neg
    all have gradients in ORT."""

    def build(self, output_name: str) -> str:
        targets = onnxblock.blocks.InputLike(output_name)(TARGETS_NAME)
        # onnxblock 1.19 has no LogSoftmax block; its _UnaryOp adds any one-input operator
        log_probs = onnxblock.blocks._UnaryOp("LogSoftmax", axis=-1)(output_name)
        weighted = onnxblock.blocks.ReduceSum(keepdims=False)(onnxblock.blocks.Mul()(log_probs, targets))
        return onnxblock.blocks.Neg()(weighted)
