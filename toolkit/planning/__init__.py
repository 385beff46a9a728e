"""Per-phone planning: the cost model (`cost`) and the planner (`planner`) that picks each
phone's cut, trainable depth, engine, update encoding and batch size."""

from toolkit.planning.cost import Calibration, Choice, CostModel, fit_calibration, shipped_calibration
from toolkit.planning.export import PlannedBundle, export_plan_bundles, phone_bundles, read_index
from toolkit.planning.planner import FleetPlan, PhonePlan, Pin, PlanConfig, Planner, load_plan, plan_fleet

__all__ = [
    "Calibration",
    "Choice",
    "CostModel",
    "FleetPlan",
    "PhonePlan",
    "Pin",
    "PlanConfig",
    "PlannedBundle",
    "Planner",
    "export_plan_bundles",
    "fit_calibration",
    "load_plan",
    "phone_bundles",
    "plan_fleet",
    "read_index",
    "shipped_calibration",
]
