"""The ``numpy`` engine: the transfer-learned head (one linear layer) trained in numpy, the frozen
part on ONNX Runtime's inference build.

It is how a phone without ONNX Runtime's training build trains: on arm64 only ``onnxruntime``
(inference) installs, and a Python phone has no torch. It reads ``frozen.onnx`` (absent when
nothing is frozen) and the initial weights; it trains exactly one linear layer at the end of the
model (the classifier: ``W`` out × in and ``b``), so the plan must cut at the end and train one
block. The loss is the mean cross-entropy of the logits ``h Wᵀ + b``; its gradients are exact
(``(softmax − onehot) / N`` back through the layer), in float32 like the other engines. The
optimizer step is fedkit's numpy SGD, outside the engine, as for every engine.
"""

from __future__ import annotations

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.codec import decode
from device_runtime.engines.contract import check_weights
from device_runtime.engines.inference import FrozenPart, float32
from device_runtime.errors import EngineError
from device_runtime.manifest import linear_layer


class NumpyEngine:
    """The Engine protocol (``device_runtime.engines.Engine``) for a linear head, in numpy."""

    name = "numpy"

    def __init__(self, bundle: Bundle):
        manifest = bundle.manifest
        if manifest.has_exits:
            raise EngineError(
                f"bundle {bundle.root} holds early exits {list(manifest.plan.exits)}: their multi-exit loss trains on "
                "the ort engine only; plan the ort engine for this phone"
            )
        shapes = {t.name: tuple(t.shape) for t in manifest.trainable}
        layer = linear_layer(manifest.trainable, manifest.is_splitfed)
        if layer is None:
            raise EngineError(
                f"bundle {bundle.root} trains {sorted(shapes)}: the numpy engine trains one linear layer at the end "
                "of the model (the classifier); plan the ort engine for deeper or SplitFed training"
            )
        self._weight, self._bias = f"{layer}.weight", f"{layer}.bias"
        self._frozen = FrozenPart(bundle.path("frozen.onnx")) if bundle.has("frozen.onnx") else None
        self._shapes = shapes
        self.set_weights(decode(bundle.path("weights").read_bytes()).tensors)

    def features(self, x: np.ndarray) -> np.ndarray:
        return float32(x) if self._frozen is None else self._frozen.run(x)

    def forward(self, h: np.ndarray) -> np.ndarray:
        h = float32(h)
        if h.ndim != 2 or h.shape[1] != self._w.shape[1]:
            raise EngineError(f"the head takes features of shape (N, {self._w.shape[1]}), got {h.shape}")
        return h @ self._w.T + self._b

    def gradients(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        logits = self.forward(h)
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (len(logits),) or labels.min(initial=0) < 0 or labels.max(initial=0) >= logits.shape[1]:
            raise EngineError(f"labels must be {len(logits)} integers in 0..{logits.shape[1] - 1}")
        shifted = logits - logits.max(axis=1, keepdims=True)  # log-sum-exp: no overflow
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(labels))
        loss = -log_p[rows, labels].mean()
        d_logits = np.exp(log_p)
        d_logits[rows, labels] -= 1
        d_logits /= len(labels)
        return float(loss), {self._weight: float32(d_logits.T @ float32(h)), self._bias: float32(d_logits.sum(axis=0))}

    def backward_from(self, h: np.ndarray, grad_out: np.ndarray) -> dict[str, np.ndarray]:
        raise EngineError("the numpy engine trains a whole-model phone's head; SplitFed needs the ort engine")

    def get_weights(self) -> dict[str, np.ndarray]:
        return {self._weight: self._w.copy(), self._bias: self._b.copy()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        check_weights(weights, self._shapes)
        self._w, self._b = float32(weights[self._weight]).copy(), float32(weights[self._bias]).copy()
