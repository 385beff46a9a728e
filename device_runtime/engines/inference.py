"""ONNX Runtime inference, the part of it every phone has: the frozen part (``frozen.onnx``) and
the fed part (``fed.onnx``) run here, whichever engine trains. It needs only an inference build
of ONNX Runtime (``onnxruntime``, which installs on arm64) or the training build
(``onnxruntime-training-cpu``, x86-64 only), and never torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from device_runtime.errors import EngineError


class _HideTorch(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` fail, for as long as it sits on ``sys.meta_path``."""

    def find_spec(self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None) -> None:
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is hidden while device_runtime loads ONNX Runtime")
        return None


def load_onnxruntime() -> Any:  # Any: onnxruntime ships no types
    """``onnxruntime``, imported with torch hidden: the training build's ``import onnxruntime``
    probes ``onnxruntime.training.ortmodule``, which imports torch (and carries on without it on
    ImportError). A phone has no torch; an emulated phone on the host would pay ~285 MB for it.
    A process that already imported torch keeps it: nothing to save there."""
    if "onnxruntime" not in sys.modules:
        hide = _HideTorch()
        sys.meta_path.insert(0, hide)
        try:
            importlib.import_module("onnxruntime")
        finally:
            sys.meta_path.remove(hide)
    return sys.modules["onnxruntime"]


onnxruntime = load_onnxruntime()
_C = onnxruntime.capi.onnxruntime_pybind11_state

# What ONNX Runtime raises for bad files and bad inputs: its own pybind11 classes (not
# RuntimeError subclasses), and RuntimeError / ValueError from its Python wrappers.
ORT_ERRORS = (
    RuntimeError,
    ValueError,
    _C.EPFail,
    _C.Fail,
    _C.InvalidArgument,
    _C.InvalidGraph,
    _C.InvalidProtobuf,
    _C.NoModel,
    _C.NoSuchFile,
    _C.NotImplemented,
    _C.RuntimeException,
)


class FedPart:
    """``fed.onnx`` on ONNX Runtime: the frozen blocks of a bundle that other phones of the run
    train (see exporters.bundle, ``fed_from``). Its parameters are inputs of the model, run with
    the values last given to ``feed`` (the exported ones until then). Inference only, whichever
    engine trains."""

    def __init__(self, path: Path) -> None:
        options = inference_options()
        options.log_severity_level = 3  # ORT warns once per input tensor that it cannot fold it: by design
        self._session = load_session(path, options)
        self.shapes = {arg.name: tuple(arg.shape) for arg in self._session.get_overridable_initializers()}
        self._values: dict[str, np.ndarray] = {}

    def feed(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Takes the values of its parameters from ``tensors`` (others are ignored) and returns
        the values now in use; a parameter ``tensors`` lacks keeps its value."""
        for name, shape in self.shapes.items():
            if name in tensors:
                if tuple(np.shape(tensors[name])) != shape:
                    raise EngineError(
                        f"the fed part's {name!r} is {shape}, the global model's {tuple(np.shape(tensors[name]))}"
                    )
                self._values[name] = float32(tensors[name])
        return dict(self._values)

    def run(self, f: np.ndarray) -> np.ndarray:
        return run("the fed part", lambda: self._session.run(None, {"input": float32(f), **self._values})[0])


class FrozenPart:
    """``frozen.onnx`` on ONNX Runtime: the blocks no phone of the run trains."""

    def __init__(self, path: Path) -> None:
        self._session = load_session(path, inference_options())

    def run(self, x: np.ndarray) -> np.ndarray:
        return run("the frozen part", lambda: self._session.run(None, {"input": float32(x)})[0])


def load_session(path: Path, options: Any) -> Any:
    """An inference session of a bundle's ONNX file; a file ONNX Runtime refuses is an EngineError."""
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise EngineError(
            f"ONNX Runtime cannot load {path} ({exc}); re-export the bundle with this fedkit version"
        ) from exc


def run(what: str, call: Callable[[], np.ndarray]) -> np.ndarray:
    try:
        return call()
    except ORT_ERRORS as exc:
        raise EngineError(
            f"ONNX Runtime failed running {what} ({exc}); check the input's shape and dtype against the bundle"
        ) from exc


def session_options() -> Any:
    # ORT's worker threads spin for a while after each run by default; between runs the phone
    # does numpy work (the optimizer step, the codec) on the same cores, so spinning only steals it.
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def inference_options() -> Any:
    # The frozen and fed parts run a few images at a time (trainer.FEATURE_BATCH): without ORT's
    # arena and memory-pattern planning a MobileNetV2 phone peaks 11 MB lower (137 MB instead of
    # 148 on a 4968-image shard), at the same speed.
    options = session_options()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def float32(x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(x, dtype=np.float32)
