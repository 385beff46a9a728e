"""PyTorch parts → ExecuTorch programs (``.pte``).

Two programs, one per bundle role:

- ``"executorch.frozen"``: the frozen part in inference, lowered to XNNPACK.
  ``export → to_edge_transform_and_lower(XNNPACK) → to_executorch → write``
- ``"executorch.train"``: the trainable part's forward and backward with a mean cross-entropy
  loss, run by ExecuTorch's ``TrainingModule`` (Android ``TrainingModule`` on a phone).
  ``check → export → _export_forward_backward → to_edge → to_executorch → write``

Both take a dynamic batch of at most ``max_batch`` samples. XNNPACK plans its memory for the
example's batch and refuses a larger one at run time, so the example is always the largest
batch; the bound is kept in the program itself (its input's planned size, read back with
``method_meta``), and the engine splits larger batches into chunks of it.

ExecuTorch 1.5 trains linear heads correctly, not every layer: max-pool backward gives wrong
gradients, avg-pool backward is missing, BatchNorm in training mode fails to lower and
trainable convolutions lowered to XNNPACK give NaN. ``check_trainable_on_executorch`` refuses
such a part before anything is written, so no program that trains wrongly reaches a phone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
from executorch.exir import ExecutorchProgramManager, to_edge, to_edge_transform_and_lower
from torch import nn
from torch.export import Dim
from torch.export.experimental import _export_forward_backward

from exporters.errors import ExportError

MAX_BATCH = 64  # samples: the largest batch one program call takes

# Layers whose training ExecuTorch 1.5 gets wrong, with the reason shown to the user.
_UNTRAINABLE: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.modules.conv._ConvNd, "trainable convolutions lowered to XNNPACK give NaN"),
    (nn.modules.batchnorm._BatchNorm, "BatchNorm does not lower in training mode"),
    (nn.modules.pooling._MaxPoolNd, "max-pool backward gives wrong gradients"),
    (nn.modules.pooling._AdaptiveMaxPoolNd, "max-pool backward gives wrong gradients"),
    (nn.modules.pooling._AvgPoolNd, "avg-pool backward is missing"),
    (nn.modules.pooling._AdaptiveAvgPoolNd, "avg-pool backward is missing"),
)


def check_trainable_on_executorch(module: nn.Module) -> None:
    """Raises ExportError naming every layer of ``module`` that ExecuTorch 1.5 cannot train
    correctly (convolutions, BatchNorm, pooling); returns when the part is safe to train."""
    found = [
        f"{name} ({type(layer).__name__}): {reason}"
        for name, layer in module.named_modules()
        for kind, reason in _UNTRAINABLE
        if isinstance(layer, kind)
    ]
    if found:
        shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
        raise ExportError(
            f"ExecuTorch 1.5 cannot train this part: {shown}. "
            "Train only the linear head on executorch (fewer --train-blocks), or use --engine ort"
        )
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        raise ExportError(
            f"parameters {', '.join(frozen)} have requires_grad=False, but every parameter of a "
            "trainable part trains: pass the part with all its parameters requiring grad"
        )


def export_executorch_inference(
    module: nn.Module, example_batch: torch.Tensor, path: str | Path, *, max_batch: int = MAX_BATCH
) -> Path:
    """Writes ``module`` (eval mode) as an XNNPACK inference program taking 1..``max_batch``
    samples shaped like ``example_batch``'s; returns the path written."""
    module.eval()
    example = _largest_batch(example_batch, max_batch)
    batch = Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            # capture the graph with a dynamic batch
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            # edge dialect, with every op XNNPACK runs delegated to it
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
            # the ExecuTorch program: memory planned for the largest batch
            executorch_program = edge.to_executorch()
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch could not export the inference part ({type(exc).__name__}: {exc}); use --engine ort"
        ) from exc
    return _write(executorch_program, path)


def export_executorch_training(
    module: nn.Module, example: torch.Tensor, path: str | Path, *, max_batch: int = MAX_BATCH
) -> Path:
    """Writes ``module``'s forward-backward program: inputs (features, int64 labels) of
    1..``max_batch`` samples; outputs the mean cross-entropy loss, the logits, every
    parameter's gradient, then the parameters, which ``TrainingModule`` splits into
    ``named_gradients()`` and ``named_parameters()`` under the part's own parameter names.
    Traced in eval mode (dropout off, BatchNorm would use running statistics). Refuses, with
    ExportError, a part that ExecuTorch cannot train correctly."""
    check_trainable_on_executorch(module)
    module.eval()
    features = _largest_batch(example, max_batch)
    labels = torch.zeros(max_batch, dtype=torch.int64)
    batch = Dim("batch", min=1, max=max_batch)
    try:
        # capture the forward graph; ExecuTorch's training flow wants the loss as first output
        program = torch.export.export(
            _TrainingStep(module), (features, labels), dynamic_shapes=({0: batch}, {0: batch})
        )
        # add the backward: the joint graph also returns each parameter's gradient and the parameters
        program = _export_forward_backward(program)
        # edge dialect, portable kernels (XNNPACK gives NaN on trained convs and adds nothing to a head)
        edge = to_edge(program)
        # the ExecuTorch program, with the metadata methods TrainingModule reads
        executorch_program = edge.to_executorch()
    except Exception as exc:
        raise ExportError(
            f"ExecuTorch could not export the training part ({type(exc).__name__}: {exc}); use --engine ort"
        ) from exc
    return _write(executorch_program, path)


class _TrainingStep(nn.Module):
    """The part and its mean cross-entropy loss. The part's children and own tensors are
    registered here under their own names (not under a wrapper attribute), so the program's
    parameter names are the whole model's (``classifier.weight``), as the manifest has them."""

    _part: nn.Module  # set past nn.Module's registration, so declared here

    def __init__(self, part: nn.Module):
        super().__init__()
        for name, child in part.named_children():
            self.add_module(name, child)
        for name, parameter in part.named_parameters(recurse=False):
            self.register_parameter(name, parameter)
        for name, buffer in part.named_buffers(recurse=False):
            self.register_buffer(name, buffer)
        object.__setattr__(self, "_part", part)  # called, not registered: its tensors are above

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._part(features)
        return F.cross_entropy(logits, labels), logits.detach()


def _largest_batch(example: torch.Tensor, max_batch: int) -> torch.Tensor:
    if max_batch < 2:
        raise ExportError(f"max_batch must be at least 2 (a batch of 1 cannot stay dynamic), got {max_batch}")
    return example[:1].detach().expand(max_batch, *example.shape[1:]).contiguous()


def _write(program: ExecutorchProgramManager, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(program.buffer)
    return path
