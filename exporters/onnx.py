"""A part of a model → one self-contained ONNX file that ONNX Runtime 1.19 runs.

The pipeline is a straight chain of named steps:
``_trace`` (PyTorch → ONNX in eval mode) → ``_unshare_initializers`` (every tensor under its own
name) → ``_canonicalise`` (strip what differs between runs) → ``_check`` (the ONNX checker, full)
→ ``_write`` (bytes to the file).

We use the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``), not the
``torch.export`` one: it keeps every parameter and buffer as an initializer under the whole
model's name (the ORT training artifacts and the manifest key tensors by those names), emits
plain opset-17 ops (Conv, BatchNormalization, Clip, GlobalAveragePool, Gemm) that ONNX Runtime
has gradients for, writes IR version 8 (ORT 1.19 reads ≤ 10), and takes ~0.1 s per part.
The dynamo exporter (tried: torch 2.13, onnxscript 0.7.2) folds BatchNorm into the convolutions
by default (so its weight and bias vanish as trainable tensors), reaches opset 17 only through a
version-conversion fallback, and takes seconds per part.

Export is deterministic: the same module and example give the same bytes.

``fed`` names tensors that become graph inputs as well as initializers (ONNX's overridable
initializers): the phone feeds them the global model's values, which other phones of the run
train, instead of keeping the exported ones. ONNX Runtime does not constant-fold them (BatchNorm
is not fused into those convolutions), so only the blocks that need it should be fed. (Tried
first: ``SessionOptions.add_initializer`` is ignored by ORT 1.19 at any optimization level
above "disable all", which makes the whole frozen part 5-10x slower.)
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import onnx
import torch
from torch import nn

from exporters.errors import ExportError

OPSET = 17
MAX_IR_VERSION = 10  # the newest ONNX IR version ONNX Runtime 1.19 loads
INPUT_NAME = "input"
OUTPUT_NAME = "output"


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, *, for_training: bool = False, fed: Collection[str] = ()
) -> Path:
    """Writes ``module`` (in eval mode) as ONNX to ``path``: input "input", output "output",
    the batch dimension dynamic. ``example`` is one batch of inputs (any batch size).

    ``for_training`` writes every BatchNorm as an elementwise affine of its running statistics:
    ONNX Runtime's training graph switches BatchNormalization nodes to batch statistics, and
    fedkit trains with the running statistics (see DESIGN: BatchNorm stays in eval mode), so
    the training artifacts are built from this form. Both forms compute the same function.
    """
    model = _feed(export_model(module, example, for_training=for_training), fed)
    return _write(model, Path(path))


def export_model(module: nn.Module, example: torch.Tensor, *, for_training: bool = False) -> onnx.ModelProto:
    """The checked, canonical ONNX model of ``module``, not written anywhere."""
    model = _trace(module, example, for_training)
    model = _unshare_initializers(model, set(module.state_dict()))
    model = _canonicalise(model)
    _check(model)
    return model


def _trace(module: nn.Module, example: torch.Tensor, for_training: bool) -> onnx.ModelProto:
    # PyTorch → ONNX. No constant folding, so parameters stay initializers under their names.
    buffer = io.BytesIO()
    with _eval_mode(module), _batchnorm_as_affine(module, for_training), warnings.catch_warnings():
        # the TorchScript exporter is deprecated in favour of dynamo; see the module docstring
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(
                module,
                (example,),
                buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object too
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=OPSET,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                export_params=True,
            )
        except Exception as exc:  # the exporter raises many unrelated types
            raise ExportError(
                f"PyTorch could not export {type(module).__name__} to ONNX ({type(exc).__name__}: {exc}); "
                "check that the part runs on the example input and uses only standard layers"
            ) from exc
    return onnx.load_from_string(buffer.getvalue())


def _unshare_initializers(model: onnx.ModelProto, tensor_names: set[str]) -> onnx.ModelProto:
    # In eval mode the TorchScript exporter keeps one copy of initializers with equal values
    # and turns the others into ``Identity(kept) -> dropped``: a fresh BatchNorm's bias and
    # running mean are both zeros. Training would then share one tensor between them (or
    # lose a parameter), so every module tensor gets its own initializer back.
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in initializers and node.output[0] in tensor_names:
            copy = onnx.TensorProto()
            copy.CopyFrom(initializers[node.input[0]])
            copy.name = node.output[0]
            model.graph.initializer.append(copy)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def _feed(model: onnx.ModelProto, names: Collection[str]) -> onnx.ModelProto:
    initializers = {init.name: init for init in model.graph.initializer}
    unknown = sorted(set(names) - set(initializers))
    if unknown:
        raise ExportError(f"cannot feed {unknown[:5]}: the part has no such tensors")
    for name in sorted(names):
        init = initializers[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return model


def _canonicalise(model: onnx.ModelProto) -> onnx.ModelProto:
    # Drop everything that may differ between two exports of the same module: doc strings
    # (which can hold source locations) and metadata; keep the rest as PyTorch wrote it.
    model.doc_string = ""
    model.graph.doc_string = ""
    del model.metadata_props[:]
    for node in model.graph.node:
        node.doc_string = ""
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        value.doc_string = ""
    return model


def _check(model: onnx.ModelProto) -> None:
    # The full ONNX checker, shape inference included, and the IR version ORT 1.19 reads.
    if model.ir_version > MAX_IR_VERSION:
        raise ExportError(
            f"the exported model has ONNX IR version {model.ir_version}, ONNX Runtime 1.19 reads at most "
            f"{MAX_IR_VERSION}: install onnx==1.17.0 as pinned in pyproject.toml"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(
            f"the exported ONNX model is invalid ({exc}); this part cannot run on the ort engine"
        ) from exc


def _write(model: onnx.ModelProto, path: Path) -> Path:
    # Deterministic serialisation, written in one go.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the export, then every submodule's own mode back (parts share modules
    with the whole model, so the caller's model must come out as it went in)."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def _batchnorm_as_affine(module: nn.Module, enabled: bool) -> Iterator[None]:
    """While active, each BatchNorm computes ``(x - running_mean) * weight / sqrt(running_var + eps) + bias``
    from its own parameters and buffers, so the ONNX graph holds that arithmetic under the
    same tensor names instead of a BatchNormalization node."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    for norm in norms:
        # an instance attribute shadows the class method; nn.Module's __setattr__ would set a function the same way
        object.__setattr__(norm, "forward", _affine_forward(norm))
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward


def _affine_forward(norm: nn.modules.batchnorm._BatchNorm) -> Callable[[torch.Tensor], torch.Tensor]:
    mean, var = norm.running_mean, norm.running_var  # None when the layer was built without them
    if not norm.affine or not norm.track_running_stats or mean is None or var is None:
        raise ExportError(
            f"{norm} has no affine weight or no running statistics; fedkit trains only BatchNorm layers that have both"
        )

    def forward(x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over the channel dimension
        scale = norm.weight / torch.sqrt(var + norm.eps)
        return (x - mean.reshape(shape)) * scale.reshape(shape) + norm.bias.reshape(shape)

    return forward
