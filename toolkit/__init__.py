"""fedkit's host side: CLI, model zoo, data, profiling, planning, aggregator, simulation."""

__version__ = "0.1.0"
