"""``fedkit simulate`` and ``fedkit demo``: a federation of emulated phones on one host.

``run`` is the orchestrator (the by-hand fleet path, automated), ``phones`` the emulated
phones, ``monitor`` follows the run over the aggregator's HTTP API, ``summary`` is what a run
leaves for the CLI, the report and the benchmarks."""

from toolkit.errors import SimulationError
from toolkit.simulation.config import (
    Fault,
    PhoneGroup,
    SimulationConfig,
    demo_config,
    load_simulation,
    parse_simulation,
)
from toolkit.simulation.run import simulate
from toolkit.simulation.summary import RunSummary, Tick

__all__ = [
    "Fault",
    "PhoneGroup",
    "RunSummary",
    "SimulationConfig",
    "SimulationError",
    "Tick",
    "demo_config",
    "load_simulation",
    "parse_simulation",
    "simulate",
]
