"""Training engines on the phone, behind one small protocol.

An engine runs the bundle's frozen part in inference (``features``) and computes the
trainable part's forward and parameter gradients; the optimizer step is shared numpy code
(``device_runtime.optim``), so both engines train identically and their state checkpoints
the same way. Weights are keyed by the whole model's parameter names.
"""

from __future__ import annotations

from device_runtime.bundle import Bundle
from device_runtime.engines.contract import Engine
from device_runtime.errors import EngineError

__all__ = ["Engine", "open_engine"]


def open_engine(bundle: Bundle, name: str | None = None) -> Engine:
    """The named engine (default: the plan's) loaded on a verified bundle."""
    name = name or bundle.manifest.plan.engine
    if name not in bundle.manifest.engines:
        raise EngineError(
            f"bundle {bundle.root} has no files for engine {name!r} "
            f"(it has: {', '.join(bundle.manifest.engines) or 'none'}); re-export it with --engine {name}"
        )
    if name == "ort":
        from device_runtime.engines.ort import OrtEngine

        return OrtEngine(bundle)
    if name == "executorch":
        from device_runtime.engines.executorch import ExecuTorchEngine

        return ExecuTorchEngine(bundle)
    if name == "numpy":
        from device_runtime.engines.linear import NumpyEngine

        return NumpyEngine(bundle)
    raise EngineError(f"unknown engine {name!r}: use ort, executorch or numpy")
