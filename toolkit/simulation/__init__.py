"""``fedkit simulate`` and ``fedkit demo``: a federation of emulated phones on one host."""

from toolkit.simulation.config import Fault, PhoneGroup, SimulationConfig, demo_config, load_simulation, parse_simulation
from toolkit.simulation.fleet import SimulationError, Tick, simulate

__all__ = [
    "Fault",
    "PhoneGroup",
    "SimulationConfig",
    "SimulationError",
    "Tick",
    "demo_config",
    "load_simulation",
    "parse_simulation",
    "simulate",
]
