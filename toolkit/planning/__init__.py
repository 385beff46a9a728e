"""Per-phone planning: the cost model (`cost`) and the planner (`planner`) that picks each
phone's cut, trainable depth, engine, update encoding and batch size."""

from toolkit.planning.cost import Calibration, Choice, CostModel, fit_calibration, shipped_calibration
from toolkit.planning.export import PlannedBundle, export_plan_bundles
from toolkit.planning.planner import FleetPlan, PhonePlan, PlanConfig, Planner, distinct_choices, load_plan, plan_fleet

__all__ = [
    "Calibration",
    "Choice",
    "CostModel",
    "FleetPlan",
    "PhonePlan",
    "PlannedBundle",
    "PlanConfig",
    "Planner",
    "distinct_choices",
    "export_plan_bundles",
    "fit_calibration",
    "load_plan",
    "plan_fleet",
    "shipped_calibration",
]
