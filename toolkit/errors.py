"""Host-side errors (ModelError, PlanError, ConfigError, StoreError, SimulationError), and the
rest of fedkit's one error tree re-exported, so host code imports every error from here. The
tree, every fedkit error in it, is drawn once: in device_runtime.errors' docstring."""

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
from exporters.errors import ExportError

if TYPE_CHECKING:
    from fastapi.exceptions import RequestValidationError
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


class PlanError(FedkitError):
    """A plan or profile is invalid, or no choice fits a phone."""


class ConfigError(FedkitError):
    """A run configuration is invalid."""


class StoreError(FedkitError):
    """The aggregator's database cannot be opened or is inconsistent."""


class SimulationError(FedkitError):
    """A simulated run could not be set up or did not finish."""


def describe(exc: "ValidationError | RequestValidationError") -> str:
    """A validation error (pydantic's, or FastAPI's of a request) in one line: each field that is
    wrong and why, ``a.b: msg; ...``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors())
