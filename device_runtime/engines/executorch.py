"""The ``executorch`` engine: the bundle's ExecuTorch programs behind the Engine protocol.

``features`` runs the XNNPACK inference program ``"executorch.frozen"``; ``forward`` and
``gradients`` run the forward-backward program ``"executorch.train"`` through ExecuTorch's
``TrainingModule``; the weights are that program's own parameter tensors, written in place.
SplitFed is not possible here: the training program starts from a loss, not from a gradient
at the cut (use the ort engine); nor are early-exit bundles, whose multi-exit loss the program
does not compute.

Host-only in this Python form: ExecuTorch 1.5's Python runtime bindings link libtorch, import
torch and executorch.exir when loaded (about 6 s and 360 MB), and take and return only torch
tensors. So they, and torch with them, are imported lazily when this engine opens a bundle,
never when ``device_runtime`` is imported. A phone runs the same ``.pte`` files with
ExecuTorch's Android ``TrainingModule``, without Python.

Who runs what. fedkit's Python phone runtime (this package on a torch-free phone: Termux with
a Debian userland) trains with the ``ort`` engine only: ``fedkit profile`` lists only ``ort``
for it, every catalogue class assumes it (``catalog.json``, each class's ``runtime``), and the
planner plans no engine a profile does not list. The ``.pte`` export stays in bundles exported
with ``fedkit export --engine executorch`` (or ``both``): it is what a native Android app loads
through ExecuTorch's ``TrainingModule``. This engine is the host-side reference for those
files, on hosts with torch: the B5 engines benchmark and the tests train with it to check the
``.pte`` programs against ``ort``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np

from device_runtime.bundle import Bundle
from device_runtime.errors import EngineError

FROZEN = "executorch.frozen"
TRAIN = "executorch.train"
_METHOD = "forward"  # the method name of both programs


def _load_runtime() -> SimpleNamespace:
    """ExecuTorch's runtime bindings, and the torch they need, imported on first use."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "experimental API" notices
            import torch  # the bindings accept nothing but torch tensors
            from executorch.extension.pybindings.portable_lib import _load_for_executorch
            from executorch.extension.training import _load_for_executorch_for_training
    except ImportError as exc:
        raise EngineError(
            "the executorch engine needs ExecuTorch's Python runtime and the torch it imports; "
            f"they do not import here ({exc}): pip install executorch==1.5.1, or use --engine ort"
        ) from exc
    return SimpleNamespace(torch=torch, load=_load_for_executorch, load_for_training=_load_for_executorch_for_training)


class ExecuTorchEngine:
    name = "executorch"

    def __init__(self, bundle: Bundle):
        if bundle.manifest.has_exits:
            raise EngineError(
                f"bundle {bundle.root} holds early exits {list(bundle.manifest.plan.exits)}: the executorch training "
                "program computes one cross-entropy, not the multi-exit loss; train it with --engine ort"
            )
        self._rt = _load_runtime()
        self._frozen = self._load(bundle, FROZEN, self._rt.load) if bundle.has(FROZEN) else None
        self._train = self._load(bundle, TRAIN, self._rt.load_for_training)
        self._frozen_shape = _input_shape(self._frozen) if self._frozen is not None else None
        self._train_shape = _input_shape(self._train.model)
        # TrainingModule hands out its parameter tensors only after a first forward_backward
        self._run_train(np.zeros((1, *self._train_shape[1:]), np.float32), np.zeros(1, np.int64))
        self._params = self._train.named_parameters()
        expected = {t.name: tuple(t.shape) for t in bundle.manifest.trainable}
        actual = {name: tuple(p.shape) for name, p in self._params.items()}
        if actual != expected:
            raise EngineError(
                f"{bundle.path(TRAIN)} trains {sorted(actual.items())}, the manifest says {sorted(expected.items())}: "
                "re-export the bundle"
            )

    @staticmethod
    def _load(bundle: Bundle, role: str, load: Callable[[str], Any]) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return load(str(bundle.path(role)))
        except RuntimeError as exc:
            raise EngineError(
                f"ExecuTorch cannot load {bundle.path(role)} ({role}): {exc}; re-export the bundle"
            ) from exc

    # -- Engine protocol ---------------------------------------------------------------------
    def features(self, x: np.ndarray) -> np.ndarray:
        if self._frozen is None or self._frozen_shape is None:  # both or neither
            return np.asarray(x, np.float32)
        x = _checked(x, self._frozen_shape, "features input")
        chunks = []
        for part in _chunks(len(x), self._frozen_shape[0]):
            with _run_errors():
                out = self._frozen.forward((self._rt.torch.from_numpy(x[part]),))
            chunks.append(out[0].numpy())
        return np.concatenate(chunks)

    def forward(self, h: np.ndarray) -> np.ndarray:
        # The training program is the only copy of the trainable weights, so inference runs it
        # too (with placeholder labels) and keeps the logits; a head's backward costs little.
        _, logits, _ = self._run_train(h, np.zeros(len(h), np.int64))
        return logits

    def gradients(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        loss, _, grads = self._run_train(h, labels)
        return loss, grads

    def backward_from(self, h: np.ndarray, grad_out: np.ndarray) -> dict[str, np.ndarray]:
        raise EngineError(
            "the executorch engine cannot train a SplitFed part: its training program starts from a loss, "
            "not from the edge's gradient at the cut; use --engine ort"
        )

    def get_weights(self) -> dict[str, np.ndarray]:
        return {name: p.numpy().copy() for name, p in self._params.items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        if set(weights) != set(self._params):
            raise EngineError(
                f"set_weights needs exactly the trainable tensors {sorted(self._params)}, got {sorted(weights)}"
            )
        for name, p in self._params.items():
            w = np.ascontiguousarray(weights[name], dtype=np.float32)
            if w.shape != tuple(p.shape):
                raise EngineError(f"weight {name!r} has shape {w.shape}, the program's is {tuple(p.shape)}")
            # these tensors are the program's parameter memory: writing them retrains the program
            p.copy_(self._rt.torch.from_numpy(w))

    # -- helpers -------------------------------------------------------------------------------
    def _run_train(self, h: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray, dict[str, np.ndarray]]:
        """Mean loss, logits and mean gradients over the whole batch, run in chunks the
        program takes; a chunk's mean counts by its share of the samples."""
        h = _checked(h, self._train_shape, "forward/gradients input")
        labels = np.ascontiguousarray(labels, dtype=np.int64)
        if labels.shape != (len(h),):
            raise EngineError(f"labels must be one integer per sample, shape ({len(h)},), got {labels.shape}")
        torch = self._rt.torch
        loss = 0.0
        logits: list[np.ndarray] = []
        grads: dict[str, np.ndarray] = {}
        for part in _chunks(len(h), self._train_shape[0]):
            share = (part.stop - part.start) / len(h)
            inputs = (torch.from_numpy(h[part]), torch.from_numpy(labels[part]))
            with _run_errors():
                outs = self._train.forward_backward(_METHOD, inputs)
            loss += share * float(outs[0])
            logits.append(outs[1].numpy())
            for name, g in self._train.named_gradients().items():
                grads[name] = grads.get(name, 0.0) + share * g.numpy()
        return loss, np.concatenate(logits), grads


@contextmanager
def _run_errors() -> Iterator[None]:
    try:
        yield
    except RuntimeError as exc:
        raise EngineError(f"ExecuTorch failed to run the program ({exc}); re-export the bundle") from exc


def _input_shape(module: Any) -> tuple[int, ...]:
    """The first input's planned shape: (largest batch, *sample shape)."""
    return tuple(module.method_meta(_METHOD).input_tensor_meta(0).sizes())


def _checked(x: np.ndarray, planned: tuple[int, ...], what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != len(planned) or x.shape[1:] != planned[1:] or len(x) == 0:
        raise EngineError(f"{what} has shape {x.shape}; the program takes (batch, {', '.join(map(str, planned[1:]))})")
    return x


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]
