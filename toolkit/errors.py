"""Host-side errors. The base and the phone-side errors live in device_runtime.errors so the
phone and the host share one hierarchy; they are re-exported here.

    FedkitError
    ├── BundleError, CodecError, EngineError, CheckpointError, ProtocolError,
    │   DataError, DeployError  (device_runtime)
    ├── ModelError      an unknown model, missing or wrong pretrained weights, a bad cut
    ├── ExportError     a part of the model cannot be exported for the requested engine
    ├── PlanError       a plan or profile is invalid, or no choice fits a phone
    ├── ConfigError     a run configuration is invalid
    ├── StoreError      the aggregator's database cannot be opened or is inconsistent
    └── SimulationError a simulated run could not be set up or did not finish

The whole tree, the phone's and the harness's errors included, is drawn in device_runtime.errors.
"""

from typing import TYPE_CHECKING

from device_runtime.errors import (
    BundleError,
    CheckpointError,
    CodecError,
    DataError,
    DeployError,
    EngineError,
    FedkitError,
    InternalError,
    ProtocolError,
)

if TYPE_CHECKING:
    from pydantic import ValidationError

__all__ = [
    "BundleError",
    "CheckpointError",
    "CodecError",
    "ConfigError",
    "DataError",
    "DeployError",
    "EngineError",
    "ExportError",
    "FedkitError",
    "InternalError",
    "ModelError",
    "PlanError",
    "ProtocolError",
    "SimulationError",
    "StoreError",
    "describe",
]


class ModelError(FedkitError):
    """An unknown model, missing or mismatched pretrained weights, or an invalid cut."""


class ExportError(FedkitError):
    """A part of the model cannot be exported for the requested engine."""


class PlanError(FedkitError):
    """A plan or profile is invalid, or no choice fits a phone."""


class ConfigError(FedkitError):
    """A run configuration is invalid."""


class StoreError(FedkitError):
    """The aggregator's database cannot be opened or is inconsistent."""


class SimulationError(FedkitError):
    """A simulated run could not be set up or did not finish."""


def describe(exc: "ValidationError") -> str:
    """A pydantic validation error in one line: each field that is wrong and why, ``a.b: msg; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
