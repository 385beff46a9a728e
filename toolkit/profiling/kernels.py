"""The probe's payload: small ONNX compute kernels and, when asked, the blocks of a model.

Built on the host (the phone has no onnx or torch) and timed by ``android_harness/probe.py``
with ONNX Runtime on the device. The kernels cover the op kinds a MobileNetV2 spends its time
in; their shapes are MobileNetV2-like but large enough to time reliably.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from toolkit.models import SplittableModel

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.19 reads up to IR 10; 8 also loads on older phone builds


def _conv_kernel(
    batch: int, cin: int, cout: int, size: int, kernel: int, groups: int
) -> tuple[onnx.ModelProto, list[int], int]:
    w = np.random.default_rng(0).standard_normal((cout, cin // groups, kernel, kernel)).astype(np.float32)
    pad = (kernel - 1) // 2
    node = helper.make_node(
        "Conv", ["input", "w"], ["output"], group=groups, pads=[pad] * 4, kernel_shape=[kernel, kernel]
    )
    shape = [batch, cin, size, size]
    graph = helper.make_graph(
        [node],
        "kernel",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    flops = 2 * kernel * kernel * (cin // groups) * cout * size * size * batch
    return _model(graph), shape, flops


def _matmul_kernel(rows: int, inner: int, cols: int) -> tuple[onnx.ModelProto, list[int], int]:
    w = np.random.default_rng(0).standard_normal((inner, cols)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["output"])],
        "kernel",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [rows, inner])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    return _model(graph), [rows, inner], 2 * rows * inner * cols


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model


def kernels() -> dict[str, tuple[onnx.ModelProto, list[int], int]]:
    """name -> (model, input shape, FLOPs per run)."""
    return {
        "conv": _conv_kernel(8, 32, 32, 32, 3, 1),
        "pointwise": _conv_kernel(8, 192, 192, 16, 1, 1),
        "depthwise": _conv_kernel(8, 192, 192, 16, 3, 192),
        "matmul": _matmul_kernel(256, 1280, 256),
    }


def export_part(model: SplittableModel, start: int, stop: int, batch: int, path: Path) -> list[int]:
    """Blocks [start, stop) as ONNX at a fixed batch (eval mode); returns the input shape."""
    shape = [batch, *(model.input_shape if start == 0 else model.stats[start - 1].out_shape)]
    with warnings.catch_warnings():
        # eval first: the exporter restores the part's training flag, recursively, afterwards.
        # The TorchScript exporter is deprecated but takes a fraction of a second per block,
        # the torch.export one several: timing needs only a faithful graph
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.part(start, stop).eval(),
            (torch.zeros(shape),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            opset_version=OPSET,
            dynamo=False,
        )
    return shape


def write_payload(folder: Path, model: SplittableModel | None = None, batch: int = 32) -> Path:
    """Writes probe.json and its ONNX files into ``folder``; with a model, one file per block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name, (proto, shape, flops) in kernels().items():
        onnx.save(proto, folder / f"kernel_{name}.onnx")
        items.append(
            {"name": name, "group": "kernel", "file": f"kernel_{name}.onnx", "input_shape": shape, "flops": flops}
        )
    if model is not None:
        for i, stats in enumerate(model.stats):
            file = f"block_{i:02d}.onnx"
            shape = export_part(model, i, i + 1, batch, folder / file)
            items.append(
                {"name": stats.name, "group": "block", "file": file, "input_shape": shape, "flops": stats.flops * batch}
            )
    (folder / "probe.json").write_text(
        json.dumps({"model_id": model.model_id if model else None, "batch": batch, "items": items})
    )
    return folder
