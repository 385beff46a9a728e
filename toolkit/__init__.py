"""fedkit's host side: CLI, model zoo, data, profiling, planning, aggregator, simulation."""

from device_runtime import __version__  # the one version source (pyproject reads it too)

__all__ = ["__version__"]
