"""The ``ort`` engine: ONNX Runtime runs the frozen part, ONNX Runtime training the trainable one.

Files it reads from the bundle: ``frozen.onnx`` (absent when nothing is frozen), and the
training artifacts ``ort.training_model``, ``ort.eval_model`` and ``ort.checkpoint`` written by
``exporters.ort_training``. The checkpoint state holds the trainable parameters and, after each
training step, their gradients; the optimizer step is fedkit's numpy SGD, outside the engine.
It needs ONNX Runtime's training build (``onnxruntime-training-cpu``, x86-64 only); where only
the inference build installs (arm64), a phone trains its head with the ``numpy`` engine.

An early-exit bundle (``manifest.has_exits``) is trained by this engine alone: ``forward``
gives every held exit's logits, (batch, exits, classes), and ``gradients`` the weighted
multi-exit loss ``sum_e exit_weights[e] * mean CE(exit e)`` (the plan's weights) and its
gradients, through the training graph's ``targets`` input (``exporters.ort_training``).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.engines.contract import check_weights
from device_runtime.engines.inference import ORT_ERRORS, FrozenPart, float32, onnxruntime, run, session_options
from device_runtime.errors import EngineError


def load_training_api() -> ModuleType:
    """``onnxruntime.training.api``, loaded without torch.

    ``onnxruntime/training/__init__.py`` imports ORT's PyTorch integration (amp, optim,
    ortmodule). So, unless the real ``onnxruntime.training`` is loaded already (a host process
    that exported artifacts), an empty stand-in package is registered under that name, with the
    real folder as its search path, and ``api`` is imported through it: the ``api`` modules need
    only ``onnxruntime.capi`` and numpy. The stand-in stays registered, so ORT's torch-dependent
    top level never runs in this process."""
    name = "onnxruntime.training"
    folder = Path(onnxruntime.__file__).parent / "training"
    if name not in sys.modules:
        if not (folder / "api").is_dir():
            raise EngineError(
                "this ONNX Runtime is an inference build (no training API): the ort engine needs "
                "onnxruntime-training-cpu (x86-64); on this phone plan the numpy engine (fedkit profile lists what it "
                "can run)"
            )
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(folder)]
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        onnxruntime.training = package
    return importlib.import_module("onnxruntime.training.api")


class OrtEngine:
    """The Engine protocol (``device_runtime.engines.Engine``) on ONNX Runtime."""

    name = "ort"

    def __init__(self, bundle: Bundle):
        manifest = bundle.manifest
        self._splitfed = manifest.is_splitfed
        self._exits = manifest.has_exits
        # per exit, its loss weight: the training graph's targets are weight * onehot(label) / batch
        self._exit_weights = np.asarray(manifest.plan.exit_weights, np.float32)
        self._num_classes = len(manifest.label_names)
        self._shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
        training_api = load_training_api()
        self._frozen = FrozenPart(bundle.path("frozen.onnx")) if bundle.has("frozen.onnx") else None
        try:
            self._state = training_api.CheckpointState.load_checkpoint(str(bundle.path("ort.checkpoint")))
            self._module = training_api.Module(
                str(bundle.path("ort.training_model")),
                self._state,
                str(bundle.path("ort.eval_model")),
                device="cpu",
                session_options=session_options(),
            )
        except ORT_ERRORS as exc:
            raise EngineError(
                f"ONNX Runtime cannot load bundle {bundle.root} ({exc}); re-export it with this fedkit version"
            ) from exc
        missing = sorted(name for name in self._shapes if name not in self._state.parameters)
        if missing:
            raise EngineError(
                f"bundle {bundle.root}: the ORT checkpoint lacks trainable tensors {missing[:5]} named in the "
                "manifest; re-export it"
            )

    def features(self, x: np.ndarray) -> np.ndarray:
        return float32(x) if self._frozen is None else self._frozen.run(x)

    def forward(self, h: np.ndarray) -> np.ndarray:
        self._module.eval()
        return run("the trainable part", lambda: self._module(float32(h)))

    def gradients(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        if self._splitfed:
            raise EngineError(
                "this bundle is SplitFed: its loss is computed on the edge, call backward_from with the edge's gradient"
            )
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        loss = self._train_step(float32(h), self._targets(labels) if self._exits else labels)
        return float(loss), self._gradients()

    def backward_from(self, h: np.ndarray, grad_out: np.ndarray) -> dict[str, np.ndarray]:
        if not self._splitfed:
            raise EngineError(
                "this bundle's loss is computed on the phone (it holds the whole model, or stops at an early exit): "
                "call gradients with labels, not backward_from"
            )
        self._train_step(float32(h), float32(grad_out))
        return self._gradients()

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: self._state.parameters[name].data.copy() for name in self._shapes}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, self._shapes)
        for name, value in weights.items():
            self._state.parameters[name].data = float32(value)

    def _targets(self, labels: np.ndarray) -> np.ndarray:
        # (batch, exits, classes): -sum(log_softmax(logits) * targets) = sum_e w_e * mean CE(exit e)
        if labels.ndim != 1 or labels.min(initial=0) < 0 or labels.max(initial=0) >= self._num_classes:
            raise EngineError(
                f"labels must be one integer in 0..{self._num_classes - 1} per sample, shape (batch,); "
                f"got shape {labels.shape} with values in {labels.min(initial=0)}..{labels.max(initial=0)}"
            )
        onehot = np.eye(self._num_classes, dtype=np.float32)[labels]
        return float32(self._exit_weights[None, :, None] * onehot[:, None, :] / np.float32(len(labels)))

    def _train_step(self, *inputs: np.ndarray) -> np.ndarray:
        # Gradients accumulate across ORT train steps unless reset: every call starts from zero.
        self._module.train()
        self._module.lazy_reset_grad()
        return run("the training step", lambda: self._module(*inputs))

    def _gradients(self) -> dict[str, np.ndarray]:
        # Copies: ORT reuses the gradient buffers at the next step.
        return {name: self._state.parameters[name].grad.copy() for name in self._shapes}
