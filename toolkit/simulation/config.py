"""The simulation's configuration: a TOML file validated by pydantic.

    name = "demo"
    model = "mobilenet_v2"         # or "efficientnet_lite0", "efficientnet_lite1", "small_cnn", or
                                   # "nas:NAME" (a network saved by fedkit search); "NAME+exits" (or
                                   # "NAME+exits:P,Q") adds early exits: the planner chooses each
                                   # phone's exit (mode federated)
    # exit_policy = "plan"         # exits: "plan" (the planner's rule) or "random" (the baseline)
    # exit_weights = [0.5, 1, 1, 1, 1]   # exits: each exit's loss weight, or {7 = 0.5} (others 1)
    # exit_accuracy = {7 = 0.81, 11 = 0.85, 14 = 0.84, 17 = 0.82, 21 = 0.80}  # stop where deeper adds nothing
    mode = "federated"             # or "splitfed" (each phone's cut from the planner, the edge on the
                                   # aggregator), or "auto" (the planner decides per phone)
    # edge = "edge.json"           # the edge's profile; default: this host, profiled at the start
    depth = "plan"                 # "head": train_blocks only; "plan": then the planner's depth per phone
    train_blocks = 1               # blocks every phone's first bundle trains (1: the classifier)
    encoding = "int8"              # the plan's update encoding (a stage may name another)
    train_images = 60000           # the first N Fashion-MNIST training images are split
    test_images = 10000            # the global model is evaluated on the first N test images
    partition = "dirichlet"        # or "iid"
    alpha = 0.5

    [[phones]]                     # a group of phones of one catalogue class (or a profile file)
    class = "flagship-2023"
    count = 2
    engine = "plan"                # the profile's engines (catalogue: ort), or "ort" / "executorch" only
    # cut = 3                      # splitfed: pin this group's cut (else the planner's)
    # arch = "arm64"               # run in the emulated arm64 phone (qemu; root): the numpy engine
    # left_out = true              # its phones keep their shards of the split but never join

    [[stages]]                     # toolkit.aggregator.config.Stage
    name = "head"
    rounds = 2
    lr = 0.01
    trainable_blocks = 1

    [[faults]]                     # see Fault
    kind = "kill_phone"
    phone = "phone-3"
    round = 2

A bad file raises ConfigError naming the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.aggregator.config import Stage, load_toml
from toolkit.errors import ConfigError, ModelError, describe
from toolkit.models import MODELS
from toolkit.models.exits import split_spec
from toolkit.models.saved import PREFIX as SAVED_PREFIX
from toolkit.models.saved import read_architecture


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PhoneGroup(_Strict):
    phone_class: str | None = Field(default=None, alias="class")  # a catalogue class
    profile: Path | None = None  # or a DeviceProfile JSON (from fedkit profile)
    count: int = Field(default=1, ge=1)
    # plan: the engines the profile lists (a catalogue class: ort); else only this engine
    engine: Literal["ort", "executorch", "numpy", "plan"] = "plan"
    cut: int | None = Field(default=None, ge=1)  # splitfed: pin the group's cut (the planner picks the rest)
    churn_online_s: float | None = Field(default=None, gt=0)  # mean online period; None: always online
    churn_offline_s: float = Field(default=10.0, gt=0)  # mean offline period
    # arm64: each phone runs device_runtime's loop inside the emulated arm64 phone (qemu user
    # mode, android_harness.arm64) with its real emulated compute: no slowdown, no link shaping,
    # no memory cap; it trains with what its runtime has, the numpy engine (a linear head)
    arch: Literal["x86_64", "arm64"] = "x86_64"
    # left_out: the group's phones get their shards of the split (it is the whole fleet's) but
    # are never planned, deployed or run: the same run without them, on the same data (e.g.
    # weak phones left out, against weak phones at an early exit)
    left_out: bool = False

    @model_validator(mode="after")
    def _arm64_phones_run_what_they_have(self):
        if self.arch == "arm64" and (
            self.engine not in ("plan", "numpy") or self.cut is not None or self.churn_online_s
        ):
            raise ValueError(
                "an arm64 group trains its head with the numpy engine, whole model on the phone, always online: "
                "drop its engine, cut and churn"
            )
        return self

    @model_validator(mode="after")
    def _one_source(self):
        if (self.phone_class is None) == (self.profile is None):
            raise ValueError("give exactly one of 'class' (a catalogue class) or 'profile' (a profile JSON file)")
        return self


class Fault(_Strict):
    """A fault on demand.

    - kill_phone: SIGKILL ``phone`` ``after_s`` after it starts training ``round``; restart it
      ``down_s`` later (it resumes from its checkpoint).
    - kill_aggregator: SIGKILL the aggregator ``after_s`` after ``round`` has its first
      accepted update; restart it on the same database ``down_s`` later.

    Times are lower bounds: the simulation notices events at its next poll (every 0.25 s, later
    when the host is saturated).
    - link: ``after_s`` after the phones start, for ``duration_s``, ``phone``'s link (every
      phone's when no phone is named) adds ``delay_ms`` and loses ``loss`` of its requests.
    - duplicate_pushes: ``phone`` sends every push twice.
    """

    kind: Literal["kill_phone", "kill_aggregator", "link", "duplicate_pushes"]
    phone: str | None = None
    round: int = Field(default=1, ge=1)
    after_s: float = Field(default=0.5, ge=0)
    down_s: float = Field(default=2.0, ge=0)
    delay_ms: float = Field(default=0.0, ge=0)
    loss: float = Field(default=0.0, ge=0, lt=1)
    duration_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _needs_phone(self):
        if self.kind in ("kill_phone", "duplicate_pushes") and self.phone is None:
            raise ValueError(f"a {self.kind} fault names its 'phone' (e.g. phone-1)")
        return self


class SimulationConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    model: str = "mobilenet_v2"  # a zoo name or nas:NAME, or either +exits[:P,Q,…] with early exits
    # The planning policy (toolkit.planning.PlanConfig.mode). federated: every phone holds the
    # whole model (depth below); splitfed: every phone runs the planner's best SplitFed choice (a
    # cut before the last block, depth capped at max_train_blocks); auto: the planner's choice
    # per phone, SplitFed or not (a mixed fleet).
    mode: Literal["federated", "splitfed", "auto"] = "federated"
    # The edge the planner prices SplitFed against: a profile JSON (fedkit profile), or this
    # host profiled at the start, as `fedkit plan` does.
    edge: Path | None = None
    edge_workers: int = Field(default=2, ge=1)  # splitfed: the edge's training threads
    # head: every phone trains train_blocks; plan: the planner's depth per phone (capped at
    # max_train_blocks), and a bundle of train_blocks too for stages that name that depth
    depth: Literal["head", "plan"] = "head"
    train_blocks: int = Field(default=1, ge=1)  # blocks the first bundle trains, the classifier included
    planner_slack: float = Field(default=0.10, ge=0)  # the planner's rule: rounds within (1 + slack) x the fastest
    max_train_blocks: int | None = Field(default=None, ge=1)  # caps the planner's depth (deeper can diverge)
    encoding: Literal["fp32", "fp16", "int8", "int4", "sign1", "topk"] = "int8"  # the plan's (a stage may name another)
    # A model with exits (toolkit.planning.PlanConfig): how each phone's exit is chosen, each
    # exit's loss weight (position → weight, others 1, or one per exit; default 1 each), and
    # each exit's validation accuracy (fractions, every exit; the planner stops a phone where a
    # deeper exit adds under half a point).
    exit_policy: Literal["plan", "random"] = "plan"
    exit_weights: dict[int, float] | tuple[float, ...] | None = None
    exit_accuracy: dict[int, float] | tuple[float, ...] | None = None
    batch_size: int = Field(default=32, ge=1)
    seed: int = 0
    train_images: int = Field(default=60000, ge=10, le=60000)
    test_images: int = Field(default=10000, ge=10, le=10000)
    partition: Literal["dirichlet", "iid"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0)
    compute: Literal["relative", "none"] = "relative"  # relative: the fastest class runs at host speed
    memory_cap: bool = True  # RLIMIT_AS per phone from its class's memory budget
    shape_links: bool = True  # bandwidth, RTT and loss of each phone's link
    netem: bool = False  # namespaces + tc (root only) instead of in-process shaping where tc can
    deadline_s: float = Field(default=120.0, gt=0)
    min_reports: int = Field(default=1, ge=1)
    timeout_s: float = Field(default=1800.0, gt=0)  # the whole run
    phones: list[PhoneGroup] = Field(min_length=1)
    stages: list[Stage] = Field(min_length=1)
    faults: list[Fault] = []

    @property
    def num_phones(self) -> int:
        """Every phone of the data split, the left-out ones too."""
        return sum(g.count for g in self.phones)

    @model_validator(mode="after")
    def _someone_takes_part(self):
        joining = sum(g.count for g in self.phones if not g.left_out)
        if joining == 0:
            raise ValueError("every phone group is left_out: at least one group must take part")
        if self.min_reports > joining:
            raise ValueError(
                f"min_reports = {self.min_reports}, but only {joining} phones take part (left_out ones do not)"
            )
        left = {f"phone-{i}" for i, g in enumerate(self._phone_groups(), 1) if g.left_out}
        for f in self.faults:
            if f.phone in left:
                raise ValueError(f"fault {f.kind} names {f.phone}, which is in a left_out group and never runs")
        return self

    def _phone_groups(self) -> list[PhoneGroup]:
        """The group of phone-1, phone-2, … in order."""
        return [g for g in self.phones for _ in range(g.count)]

    @property
    def has_exits(self) -> bool:
        return split_spec(self.model)[1] is not None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        try:
            base, _ = split_spec(model)
        except ModelError as exc:
            raise ValueError(str(exc)) from exc
        if base.startswith(SAVED_PREFIX):
            try:  # a searched network: it must be saved already, so a typo fails here, not mid-run
                read_architecture(base.removeprefix(SAVED_PREFIX))
            except ModelError as exc:
                raise ValueError(str(exc)) from exc
        elif base not in MODELS:
            raise ValueError(
                f"unknown model {base!r}: choose one of {', '.join(MODELS)}, or nas:NAME (a searched network), "
                "optionally with +exits"
            )
        return model

    @model_validator(mode="after")
    def _exits_are_federated(self):
        if self.has_exits and self.mode != "federated":
            raise ValueError(
                f"mode {self.mode!r} with {self.model}: SplitFed + exits is not supported, since the edge would need "
                'the blocks and branches past each phone\'s exit, where its model ends; set mode = "federated"'
            )
        if not self.has_exits and (self.exit_policy, self.exit_weights, self.exit_accuracy) != ("plan", None, None):
            raise ValueError(
                f"exit_policy, exit_weights and exit_accuracy are for a model with exits: "
                f'set model = "{self.model}+exits", or drop them'
            )
        return self

    @model_validator(mode="after")
    def _splitfed_engines(self):
        if self.mode != "federated" and any(g.engine == "executorch" for g in self.phones):
            raise ValueError(
                "SplitFed phones back-propagate the edge's gradient, which only the ort engine does: "
                'set engine = "ort" (or "plan") for every phone group'
            )
        if self.mode == "federated" and any(g.cut is not None for g in self.phones):
            raise ValueError("a phone group's 'cut' is for SplitFed runs: set mode = \"splitfed\" or drop the cut")
        return self

    @model_validator(mode="after")
    def _faults_name_phones(self):
        known = {f"phone-{i}" for i in range(1, self.num_phones + 1)}
        for f in self.faults:
            if f.phone is not None and f.phone not in known:
                raise ValueError(f"fault {f.kind} names {f.phone!r}; phones are phone-1 … phone-{self.num_phones}")
        return self


def parse_simulation(data: dict, base_dir: Path | None = None) -> SimulationConfig:
    try:
        config = SimulationConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{describe(exc)} (fix these fields in the simulation config)") from exc
    if base_dir is not None:
        groups = [
            g.model_copy(update={"profile": base_dir / g.profile}) if g.profile and not g.profile.is_absolute() else g
            for g in config.phones
        ]
        edge = base_dir / config.edge if config.edge and not config.edge.is_absolute() else config.edge
        config = config.model_copy(update={"phones": groups, "edge": edge})
    return config


def load_simulation(path: str | Path) -> SimulationConfig:
    return load_toml(path, "simulation config", parse_simulation)


def demo_config() -> SimulationConfig:
    """``fedkit demo``: 8 phones of 4 catalogue classes, MobileNetV2 on Fashion-MNIST, int8
    updates, two stages (head only, then the planner's depth per phone), one phone crash."""
    text = (Path(__file__).parent / "demo.toml").read_text()
    return parse_simulation(tomllib.loads(text))
