"""The exporters' one error. It sits in fedkit's one tree (drawn in ``device_runtime.errors``)
and ``toolkit.errors`` re-exports it, so the host catches it like its own errors."""

from device_runtime.errors import FedkitError


class ExportError(FedkitError):
    """A part of the model cannot be exported for the requested engine."""
