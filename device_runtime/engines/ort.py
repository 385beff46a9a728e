"""The ``ort`` engine: ONNX Runtime runs the frozen part, ONNX Runtime training the trainable one.

Files it reads from the bundle: ``frozen.onnx`` (absent when nothing is frozen), and the
training artifacts ``ort.training_model``, ``ort.eval_model`` and ``ort.checkpoint`` written by
``exporters.ort_training``. The checkpoint state holds the trainable parameters and, after each
training step, their gradients; the optimizer step is fedkit's numpy SGD, outside the engine.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.errors import EngineError


class _HideTorch(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` fail, for as long as it sits on ``sys.meta_path``."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is hidden while device_runtime loads ONNX Runtime")
        return None


def load_onnxruntime() -> tuple[ModuleType, ModuleType]:
    """``onnxruntime`` and ``onnxruntime.training.api``, loaded without torch.

    The one place device_runtime imports ONNX Runtime. The ``onnxruntime-training-cpu`` wheel
    pulls torch in twice: ``import onnxruntime`` probes ``onnxruntime.training.ortmodule`` (and
    carries on without it on ImportError), and ``onnxruntime/training/__init__.py`` imports
    ORT's PyTorch integration (amp, optim, ortmodule). A phone has no torch; an emulated phone
    on the host would pay ~285 MB for it. So:

    1. ``import onnxruntime`` runs with torch hidden, so its probe finds no ortmodule
       (a process that already imported torch keeps it: nothing to save there);
    2. unless the real ``onnxruntime.training`` is loaded already (a host process that
       exported artifacts), an empty stand-in package is registered under that name, with
       the real folder as its search path, and ``api`` is imported through it: the ``api``
       modules need only ``onnxruntime.capi`` and numpy. The stand-in stays registered, so
       ORT's torch-dependent top level never runs in this process.
    """
    if "onnxruntime" not in sys.modules:
        hide = _HideTorch()
        sys.meta_path.insert(0, hide)
        try:
            importlib.import_module("onnxruntime")
        finally:
            sys.meta_path.remove(hide)
    ort = sys.modules["onnxruntime"]
    name = "onnxruntime.training"
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(Path(ort.__file__).parent / "training")]
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        ort.training = package
    return ort, importlib.import_module("onnxruntime.training.api")


onnxruntime, training_api = load_onnxruntime()
_C = onnxruntime.capi.onnxruntime_pybind11_state

# What ONNX Runtime raises for bad files and bad inputs: its own pybind11 classes (not
# RuntimeError subclasses), and RuntimeError / ValueError from its Python wrappers.
_ORT_ERRORS = (
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

    def __init__(self, path: Path):
        options = _inference_options()
        options.log_severity_level = 3  # ORT warns once per input tensor that it cannot fold it: by design
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except _ORT_ERRORS as exc:
            raise EngineError(f"ONNX Runtime cannot load {path} ({exc}); re-export the bundle with this fedkit version") from exc
        self.shapes = {arg.name: tuple(arg.shape) for arg in self._session.get_overridable_initializers()}
        self._values: dict[str, np.ndarray] = {}

    def feed(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Takes the values of its parameters from ``tensors`` (others are ignored) and returns
        the values now in use; a parameter ``tensors`` lacks keeps its value."""
        for name, shape in self.shapes.items():
            if name in tensors:
                if tuple(np.shape(tensors[name])) != shape:
                    raise EngineError(f"the fed part's {name!r} is {shape}, the global model's {tuple(np.shape(tensors[name]))}")
                self._values[name] = _float32(tensors[name])
        return dict(self._values)

    def run(self, f: np.ndarray) -> np.ndarray:
        return _run("the fed part", lambda: self._session.run(None, {"input": _float32(f), **self._values})[0])


class OrtEngine:
    """The Engine protocol (``device_runtime.engines.Engine``) on ONNX Runtime."""

    name = "ort"

    def __init__(self, bundle: Bundle):
        manifest = bundle.manifest
        self._splitfed = manifest.is_splitfed
        self._shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
        try:
            self._frozen = (
                onnxruntime.InferenceSession(
                    str(bundle.path("frozen.onnx")), _inference_options(), providers=["CPUExecutionProvider"]
                )
                if bundle.has("frozen.onnx")
                else None
            )
            self._state = training_api.CheckpointState.load_checkpoint(str(bundle.path("ort.checkpoint")))
            self._module = training_api.Module(
                str(bundle.path("ort.training_model")),
                self._state,
                str(bundle.path("ort.eval_model")),
                device="cpu",
                session_options=_session_options(),
            )
        except _ORT_ERRORS as exc:
            raise EngineError(
                f"ONNX Runtime cannot load bundle {bundle.root} ({exc}); re-export it with this fedkit version"
            ) from exc
        missing = sorted(name for name in self._shapes if name not in self._state.parameters)
        if missing:
            raise EngineError(
                f"bundle {bundle.root}: the ORT checkpoint lacks trainable tensors {missing[:5]} named in the manifest; re-export it"
            )

    def features(self, x: np.ndarray) -> np.ndarray:
        x = _float32(x)
        if self._frozen is None:
            return x
        return _run("the frozen part", lambda: self._frozen.run(None, {"input": x})[0])

    def forward(self, h: np.ndarray) -> np.ndarray:
        self._module.eval()
        return _run("the trainable part", lambda: self._module(_float32(h)))

    def gradients(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        if self._splitfed:
            raise EngineError("this bundle is SplitFed: its loss is computed on the edge, call backward_from with the edge's gradient")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        loss = self._train_step(_float32(h), labels)
        return float(loss), self._gradients()

    def backward_from(self, h: np.ndarray, grad_out: np.ndarray) -> dict[str, np.ndarray]:
        if not self._splitfed:
            raise EngineError("this bundle trains the whole model on the phone: call gradients with labels, not backward_from")
        self._train_step(_float32(h), _float32(grad_out))
        return self._gradients()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: self._state.parameters[name].data.copy() for name in self._shapes}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        if set(weights) != set(self._shapes):
            missing, extra = sorted(set(self._shapes) - set(weights)), sorted(set(weights) - set(self._shapes))
            raise EngineError(f"set_weights needs exactly the bundle's trainable tensors: missing {missing[:5]}, unknown {extra[:5]}")
        for name, value in weights.items():
            if tuple(np.shape(value)) != self._shapes[name]:
                raise EngineError(f"weight {name!r} has shape {tuple(np.shape(value))}, the bundle says {self._shapes[name]}")
        for name, value in weights.items():
            self._state.parameters[name].data = _float32(value)

    def _train_step(self, *inputs: np.ndarray) -> np.ndarray:
        # Gradients accumulate across ORT train steps unless reset: every call starts from zero.
        self._module.train()
        self._module.lazy_reset_grad()
        return _run("the training step", lambda: self._module(*inputs))

    def _gradients(self) -> dict[str, np.ndarray]:
        # Copies: ORT reuses the gradient buffers at the next step.
        return {name: self._state.parameters[name].grad.copy() for name in self._shapes}



def _run(what: str, call):
    try:
        return call()
    except _ORT_ERRORS as exc:
        raise EngineError(f"ONNX Runtime failed running {what} ({exc}); check the input's shape and dtype against the bundle") from exc


def _session_options():
    # ORT's worker threads spin for a while after each run by default; between runs the phone
    # does numpy work (the optimizer step, the codec) on the same cores, so spinning only steals it.
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _inference_options():
    # The frozen and fed parts run a few images at a time (trainer.FEATURE_BATCH): without ORT's
    # arena and memory-pattern planning a MobileNetV2 phone peaks 11 MB lower (137 MB instead of
    # 148 on a 4968-image shard), at the same speed.
    options = _session_options()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


def _float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
