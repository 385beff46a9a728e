"""The planner: per phone, the cut, trainable depth, engine, update encoding and batch size.

Search. Every cut from 1 (cut 0 only with ``allow_raw_upload``: it sends raw images off the
phone, which defeats federated learning, so it is a baseline, never a default) to the end;
every trainable depth on the phone from its last parameterised block before the cut (the
classifier alone when the cut is at the end; in SplitFed the edge trains everything behind
the cut) to every parameterised block before the cut — the phone always trains at least one
block, since a SplitFed phone with only frozen blocks would run inference alone;
``executorch`` where it can train what the phone trains (linear layers only, and no activation
gradients to back-propagate: it has no
``backward_from``), ``ort`` otherwise; each allowed encoding; the reference batch, halved
down to ``min_batch`` when it does not fit. The search is exhaustive (MobileNetV2 has 22
cuts); ``oracle`` is a separate brute force over the raw product, kept to check it.

Rule (accuracy against time). Deeper fine-tuning learns more; faithful encodings and the
reference batch keep the federated optimisation as designed. So among the choices that fit
the phone's memory, take those whose predicted round time is within ``slack`` (10%) of the
fastest (or, with ``budget_s``, within the budget; with ``energy_budget_j``, also within
that), and among them the one with, in order: the most trainable blocks, the most faithful
encoding, the largest batch, the shortest round, the least memory. A phone where nothing fits
is reported infeasible with the reason, never dropped.

Trainable depth counts parameterised blocks from ``train_from`` to the end of the model, on
the phone or on the edge: in SplitFed the edge trains every block behind the cut.

Early exits (a model with exits, ``toolkit.models.exits``). The candidates are the model's
exits, never SplitFed (the edge would need the blocks and branches past each phone's exit,
which is where that phone's model ends): a phone at exit ``p`` holds blocks ``[0, p)`` and the
branches up to it, and trains every branch it holds and blocks ``[min(T, p), p)`` for one
run-wide T, the first of the model's last ``train_blocks`` parameterised blocks (default 1:
the classifier; ``exit_train_from``). So no block before T is trained by anyone and no phone
needs a fed part. Exit bundles train with ``ort``. Each exit's loss weight is
``exit_weights`` (position → weight, the others 1; or one weight per exit; default 1 each:
every branch learns as if alone).

Rule for exits (``exit_policy = "plan"``). A phone's exit is the deepest exit that fits its
memory (and ``energy_budget_j``) and whose predicted round is within the fleet's round budget:
``budget_s`` if given, else (1 + ``slack``) × the round of the fleet's fastest phone at the
final exit. Deeper is more accurate until it is not: with ``exit_accuracy`` (position →
validation accuracy, e.g. a previous run's evaluations), the phone stops at the shallowest
exit within 0.5 point of the best exit it can afford, since deeper exits that add nothing are
not worth their compute. Within its exit, the usual preference (encoding, batch, round,
memory). A phone that no exit brings within the budget trains at its fastest exit, said so in
its reason: exits are there to let weak phones take part, and the round's deadline decides
whether a late update counts. A phone for which no exit fits memory is infeasible with the reason. ``exit_policy =
"random"`` is the patent's baseline: an exit drawn uniformly among those that fit the phone's
memory (and energy budget), seeded by ``seed`` and the phone's name (the same plan every
time), with no round budget.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from device_runtime.codec import ENCODINGS
from device_runtime.errors import BundleError
from device_runtime.manifest import ENGINES, DevicePlan
from toolkit.errors import PlanError, describe
from toolkit.models import SplittableModel, load_model
from toolkit.planning.cost import Calibration, Choice, CostModel
from toolkit.profiling.catalog import link
from toolkit.profiling.local import measure_local
from toolkit.profiling.profile import DeviceProfile, read_json

SCHEMA_VERSION: Final = 1  # Final: its type is Literal[1], as schema_version's
FIDELITY = ("fp32", "fp16", "int8", "int4", "topk", "sign1")  # most faithful first
ACCURACY_MARGIN = 0.005  # half a point: a deeper exit that adds less is not worth its compute


class PlanConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    samples: PositiveInt = 3000  # training samples per phone (B1: 60,000 over 20 phones)
    local_epochs: PositiveInt = 1
    batch_size: PositiveInt = 32  # the reference batch; smaller ones only to fit memory
    min_batch: PositiveInt = 8
    encodings: tuple[str, ...] = ("fp32", "fp16", "int8", "int4")
    slack: float = Field(default=0.10, ge=0)  # accept rounds up to (1 + slack) x the fastest
    budget_s: float | None = Field(default=None, gt=0)  # instead of slack: rounds up to this
    energy_budget_j: float | None = Field(default=None, gt=0)
    edge_load: PositiveInt = 1  # phones training on the edge at once
    allow_raw_upload: bool = False  # consider cut 0 (all on the edge: raw images leave the phone)
    # The run's policy. auto: any cut; federated: the whole model on every phone (transfer
    # learning, no edge training); splitfed: every phone cuts before the last block.
    mode: Literal["auto", "federated", "splitfed"] = "auto"
    max_train_blocks: PositiveInt | None = None  # caps the trainable depth (deeper training can diverge)
    train_blocks: PositiveInt | None = None  # trains exactly this many blocks; the planner picks the rest
    # Depths a stage may name (e.g. 1: a head-only warm-up stage): every whole-model phone also
    # gets a bundle training that many blocks, when it is shallower than its planned depth.
    stage_depths: tuple[PositiveInt, ...] = ()
    # A model with early exits: how each phone's exit is chosen (plan: the rule above; random:
    # the patent's baseline), each exit's loss weight (position → weight, others 1; or one per
    # exit of the model; None: 1 each), and each exit's validation accuracy (fractions, position
    # → accuracy for every exit or one per exit; None: deeper is better).
    exit_policy: Literal["plan", "random"] = "plan"
    exit_weights: dict[int, float] | tuple[float, ...] | None = None
    exit_accuracy: dict[int, float] | tuple[float, ...] | None = None
    seed: int = 0  # the random exit policy's

    def model_post_init(self, _context) -> None:
        unknown = [e for e in self.encodings if e not in ENCODINGS]
        if unknown or not self.encodings:
            raise PlanError(f"unknown or no update encodings {unknown}: choose from {', '.join(ENCODINGS)}")
        if not all(math.isfinite(w) and w >= 0 for w in _values(self.exit_weights)):
            raise PlanError(f"exit weights {self.exit_weights}: every weight must be a number of 0 or more")
        if not all(0 <= a <= 1 for a in _values(self.exit_accuracy)):
            raise PlanError(f"exit accuracies {self.exit_accuracy}: give fractions between 0 and 1 (0.85, not 85)")

    @property
    def batches(self) -> list[int]:
        sizes, b = [], self.batch_size
        while b >= self.min_batch:
            sizes.append(b)
            b //= 2
        return sizes or [self.batch_size]


def _values(per_exit: dict[int, float] | tuple[float, ...] | None) -> Iterable[float]:
    return per_exit.values() if isinstance(per_exit, dict) else per_exit or ()


class PhonePlan(BaseModel):
    """One phone's line in a fleet plan; ``plan`` is None when nothing fits it."""

    model_config = ConfigDict(frozen=True)

    profile: str
    plan: DevicePlan | None
    reason: str
    trainable_blocks: int | None = None
    memory_mb: float | None = None
    energy_j: float | None = None


class FleetPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    model_id: str
    block_names: list[str]
    edge: str  # the edge profile's name
    config: PlanConfig
    phones: list[PhonePlan]

    @property
    def infeasible(self) -> list[PhonePlan]:
        return [p for p in self.phones if p.plan is None]

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")


@dataclass(frozen=True)
class Pin:
    """What the user fixes for one phone; the planner chooses the rest."""

    cut: int | None = None  # blocks [0, cut) on the phone (a model with exits: its exit)
    depth: int | None = None  # trainable blocks (a SplitFed phone's count the edge's too)


@dataclass(frozen=True)
class Evaluated:
    choice: Choice
    predicted: dict[str, float]
    memory_mb: float
    energy_j: float | None
    depth: int  # trainable parameterised blocks, phone and edge together (an exit plan: the phone's)

    def key(self) -> tuple:
        """The rule's preference among acceptable choices: greater is better."""
        c = self.choice
        # on an exact tie, more blocks on the phone: fewer activations leave it
        return (self.depth, -FIDELITY.index(c.encoding), c.batch, -self.predicted["total"], -self.memory_mb, c.cut)


class Planner:
    """Plans phones for one model against one edge."""

    def __init__(
        self,
        model: SplittableModel,
        edge: DeviceProfile,
        config: PlanConfig | None = None,
        calibration: Calibration | None = None,
    ):
        self.model = model
        self.edge = edge
        self.config = config or PlanConfig()
        self.cost = CostModel(model, calibration)
        self.n = len(model.block_names)
        self.parameterised = model.parameterised_blocks()
        self._edge_fwd = {b: self.cost.forward_seconds(edge, b) for b in self.config.batches}
        # a model with exits: T, every exit's loss weight and, when given, its accuracy
        self.exit_from: int | None = None
        self.exit_weights: dict[int, float] = {}
        self.exit_accuracy: dict[int, float] | None = None
        if model.exits:
            _check_exit_policy(model, self.config)
            self.exit_from = exit_train_from(model, self.config)
            self.exit_weights = weights_by_exit(model, self.config.exit_weights)
            if self.config.exit_accuracy is not None:
                self.exit_accuracy = per_exit(model, self.config.exit_accuracy, "exit accuracies", complete=True)
        elif (self.config.exit_policy, self.config.exit_weights, self.config.exit_accuracy) != ("plan", None, None):
            raise PlanError(
                f"{model.model_id} has no early exits, so an exit policy, weights or accuracies do not apply: "
                f"plan {model.model_id}+exits, or drop them"
            )

    # -- the pieces ------------------------------------------------------------------------
    def depth(self, train_from: int, cut: int | None = None) -> int:
        """Trainable parameterised blocks from ``train_from`` to the end of the model (the
        edge's too); for an exit plan, to its exit ``cut``."""
        stop = cut if cut is not None and self.model.exits else self.n
        return sum(1 for i in self.parameterised if train_from <= i < stop)

    def engines(self, phone: DeviceProfile, cut: int, train_from: int) -> list[str]:
        """The engines that can train blocks ``train_from`` to ``cut`` on this phone: only those
        its profile lists (what its runtime trains with, torch-free), so none when it lists none.
        Exit bundles train with ort alone (its loss over several exits)."""
        engines: list[str] = [e for e in ENGINES if e in phone.engines]
        if self.model.exits:
            return [e for e in engines if e == "ort"]
        trains_linear_only = all(c.linear_only for c in self.cost.costs[train_from:cut])
        needs_backward_from = cut < self.n and train_from < cut
        if "executorch" in engines and not (trains_linear_only and not needs_backward_from):
            engines.remove("executorch")
        # numpy trains one linear layer at the end of the model: the classifier alone
        one_linear_head = cut == self.n and trains_linear_only and self.depth(train_from) == 1
        if "numpy" in engines and not one_linear_head:
            engines.remove("numpy")
        return engines

    def candidates(self, phone: DeviceProfile) -> Iterable[Choice]:
        for cut, train_from in self._spans():
            for engine in self.engines(phone, cut, train_from):
                for batch in self.config.batches:
                    for encoding in self.config.encodings:
                        yield Choice(cut, train_from, engine, encoding, batch)

    def _spans(self) -> Iterable[tuple[int, int]]:
        """Every (cut, train_from) to consider."""
        if self.exit_from is not None:
            # an exit whose held exits all weigh 0 would train on no loss
            for cut in self.model.exits:
                if sum(self.exit_weights[p] for p in self.model.exits if p <= cut) > 0:
                    yield cut, min(self.exit_from, cut)
            return
        first_cut = 0 if self.config.allow_raw_upload else 1
        for cut in range(first_cut, self.n + 1):
            with_params = self.model.parameterised_blocks(cut)
            # The phone trains at least one of its blocks: a SplitFed phone whose blocks were all
            # frozen would only run inference, and bundles always carry something to train.
            # Cut 0 (raw upload, a baseline) has no phone blocks at all.
            depths = range(0 if cut == 0 else 1, len(with_params) + 1)
            for train_from in sorted({self.model.train_from(cut, k) for k in depths}, reverse=True):
                yield cut, train_from

    def evaluate(self, choice: Choice, phone: DeviceProfile, phone_fwd=None, fed_from: int | None = None) -> Evaluated:
        """``fed_from``: the fleet's shallowest train_from, which sets the download (None: alone)."""
        c = self.config
        predicted = self.cost.round_time(
            choice,
            phone,
            self.edge,
            c.samples,
            c.local_epochs,
            c.edge_load,
            phone_fwd=phone_fwd,
            edge_fwd=self._edge_fwd.get(choice.batch),
            fed_from=fed_from,
        )
        return Evaluated(
            choice,
            predicted,
            self.cost.memory_mb(choice),
            self.cost.energy_j(predicted, phone),
            self.depth(choice.train_from, choice.cut),
        )

    def evaluate_all(
        self, phone: DeviceProfile, choices: Iterable[Choice], fed_from: int | None = None
    ) -> list[Evaluated]:
        fwd = {b: self.cost.forward_seconds(phone, b) for b in self.config.batches}
        return [self.evaluate(ch, phone, fwd.get(ch.batch), fed_from) for ch in choices]

    # -- the rule --------------------------------------------------------------------------
    def fitting(self, phone: DeviceProfile, evaluated: list[Evaluated]) -> tuple[list[Evaluated], str]:
        """The choices within the phone's memory and the energy budget, or none and why."""
        c = self.config
        if not evaluated:
            needs = "ort (exit bundles train with it alone)" if self.model.exits else "ort or executorch"
            return [], f"no engine: the profile lists {list(phone.engines) or 'none'}; fedkit needs {needs}"
        fits = [e for e in evaluated if e.memory_mb <= phone.memory_mb]
        if not fits:
            least = min(e.memory_mb for e in evaluated)
            return [], (
                f"nothing fits memory: the smallest choice needs {least:.0f} MB, the phone has {phone.memory_mb:.0f} MB"
            )
        if c.energy_budget_j is None:
            return fits, ""
        if any(e.energy_j is None for e in fits):
            return [], "an energy budget needs cpu_power_w in the profile and radio_power_w in its link"
        # every one has an energy_j: checked above
        fits = [e for e in fits if e.energy_j is not None and e.energy_j <= c.energy_budget_j]
        return fits, "" if fits else f"no choice within the energy budget of {c.energy_budget_j:g} J"

    def choose(self, phone: DeviceProfile, evaluated: list[Evaluated]) -> PhonePlan:
        c = self.config
        fits, why = self.fitting(phone, evaluated)
        if not fits:
            return PhonePlan(profile=phone.name, plan=None, reason=why)
        fastest = min(e.predicted["total"] for e in fits)
        limit = c.budget_s if c.budget_s is not None else fastest * (1 + c.slack)
        within = [e for e in fits if e.predicted["total"] <= limit]
        if not within:
            return PhonePlan(
                profile=phone.name,
                plan=None,
                reason=f"the fastest choice takes {fastest:.1f} s, over the round budget of {c.budget_s:g} s",
            )
        best = max(within, key=Evaluated.key)
        rule = (
            f"the budget of {c.budget_s:g} s"
            if c.budget_s is not None
            else f"{c.slack:.0%} of the fastest ({fastest:.1f} s)"
        )
        return PhonePlan(
            profile=phone.name,
            plan=self.device_plan(best),
            reason=f"deepest training ({best.depth} blocks) within {rule} that fits {phone.memory_mb:.0f} MB",
            trainable_blocks=best.depth,
            memory_mb=round(best.memory_mb, 1),
            energy_j=None if best.energy_j is None else round(best.energy_j, 1),
        )

    def choose_exit(
        self, phone: DeviceProfile, evaluated: list[Evaluated], reference: tuple[str, float] | None
    ) -> PhonePlan:
        """The exit rule (the module's doc) for one phone; ``reference``: the fleet's fastest
        phone at the final exit and its round (None: no phone of the fleet holds it)."""
        c = self.config
        fits, why = self.fitting(phone, evaluated)
        if not fits:
            return PhonePlan(profile=phone.name, plan=None, reason=why)
        memory = f"{phone.memory_mb:.0f} MB"
        if c.exit_policy == "random":
            held = sorted({e.choice.cut for e in fits})
            cut = random.Random(f"{c.seed}:{phone.name}").choice(held)
            return self._exit_plan(
                phone,
                fits,
                cut,
                f"exit {cut} drawn at random (seed {c.seed}) among the exits that fit {memory}: {held}",
            )
        if c.budget_s is not None:
            limit, rule = c.budget_s, f"the round budget of {c.budget_s:g} s"
        elif reference is not None:
            limit = (1 + c.slack) * reference[1]
            rule = f"{1 + c.slack:.2f} × the round of {reference[0]} at the final exit ({reference[1]:.1f} s)"
        else:
            return PhonePlan(
                profile=phone.name,
                plan=None,
                reason="no phone of the fleet holds the final exit, so there is no reference round: give a budget_s",
            )
        within = [e for e in fits if e.predicted["total"] <= limit]
        if not within:
            # Exits exist to let weak phones take part: one that no exit brings within the budget
            # still trains at its fastest exit (the round's deadline decides whether it counts).
            fastest = min(fits, key=lambda e: e.predicted["total"])
            return self._exit_plan(
                phone,
                fits,
                fastest.choice.cut,
                f"no exit within {rule}: its fastest exit ({fastest.choice.cut}) takes "
                f"{fastest.predicted['total']:.1f} s; fits {memory}",
            )
        affordable = sorted({e.choice.cut for e in within})
        cut, why = affordable[-1], f"deepest exit within {rule} that fits {memory}"
        if self.exit_accuracy is not None:
            accuracy = self.exit_accuracy
            best = max(affordable, key=lambda p: (accuracy[p], -p))
            enough = min(p for p in affordable if accuracy[p] >= accuracy[best] - ACCURACY_MARGIN)
            if enough != cut:
                cut = enough
                why = (
                    f"shallowest exit within {ACCURACY_MARGIN * 100:g} point of the best it can afford within {rule} "
                    f"(exit {best}, accuracy {accuracy[best]:.1%}; exit {cut}: {accuracy[cut]:.1%}), fits {memory}"
                )
        return self._exit_plan(phone, within, cut, why)

    def _exit_plan(self, phone: DeviceProfile, evaluated: list[Evaluated], cut: int, reason: str) -> PhonePlan:
        """The preferred of ``evaluated`` at exit ``cut``, as the phone's plan."""
        best = max((e for e in evaluated if e.choice.cut == cut), key=Evaluated.key)
        return PhonePlan(
            profile=phone.name,
            plan=self.device_plan(best),
            reason=reason,
            trainable_blocks=best.depth,
            memory_mb=round(best.memory_mb, 1),
            energy_j=None if best.energy_j is None else round(best.energy_j, 1),
        )

    def device_plan(self, e: Evaluated) -> DevicePlan:
        ch = e.choice
        exits = tuple(p for p in self.model.exits if p <= ch.cut)
        return DevicePlan(
            cut=ch.cut,
            train_from=min(ch.train_from, ch.cut),
            engine=ch.engine,
            encoding=ch.encoding,
            local_epochs=self.config.local_epochs,
            batch_size=ch.batch,
            predicted=dict(e.predicted),
            exits=exits,
            exit_weights=tuple(self.exit_weights[p] for p in exits),
        )

    # -- entry points ----------------------------------------------------------------------
    def plan_phone(self, phone: DeviceProfile, pin: Pin = Pin(), fed_from: int | None = None) -> PhonePlan:
        """The rule over the choices the run's policy (``mode``, ``max_train_blocks``,
        ``train_blocks``) and the phone's ``pin`` allow. A model with exits: the phone planned
        as a fleet of one (its download always starts at the run's T, whatever ``fed_from``)."""
        if self.exit_from is not None:
            return self._plan_exits([phone], {phone.name: pin})[0]
        evaluated = self.evaluate_all(phone, self.candidates(phone), fed_from)
        allowed = [e for e in evaluated if self._allowed(e.choice.cut, e.depth, pin)]
        if evaluated and not allowed:
            c = self.config
            pinned = "".join(f", {k} {v}" for k, v in (("cut", pin.cut), ("depth", pin.depth)) if v is not None)
            return PhonePlan(
                profile=phone.name,
                plan=None,
                reason=(
                    f"no choice fits the run's policy (mode {c.mode}, max_train_blocks {c.max_train_blocks}, "
                    f"train_blocks {c.train_blocks}{pinned}): relax it, or pin a cut between 1 and {self.n - 1}"
                ),
            )
        return self.choose(phone, allowed)

    def _allowed(self, cut: int, depth: int, pin: Pin) -> bool:
        c = self.config
        whole = cut == self.n
        return (
            (c.mode == "auto" or (c.mode == "federated") == whole)
            and (c.max_train_blocks is None or depth <= c.max_train_blocks)
            and (c.train_blocks is None or depth == c.train_blocks)
            and (pin.cut is None or cut == pin.cut)
            and (pin.depth is None or depth == pin.depth)
        )

    def _plan_exits(self, phones: list[DeviceProfile], pins: dict[str, Pin]) -> list[PhonePlan]:
        """The exit rule over a fleet: every choice priced with the run's blob (from T on), the
        fastest phone at the final exit found, then each phone's exit."""
        _check_exit_pins(self.model, pins)
        evaluated = {p.name: self.evaluate_all(p, self.candidates(p), self.exit_from) for p in phones}
        at_final = [
            (e.predicted["total"], p.name)
            for p in phones
            for e in evaluated[p.name]
            if e.choice.cut == self.n and e.memory_mb <= p.memory_mb
        ]
        reference = None
        if at_final:
            seconds, name = min(at_final)
            reference = (name, seconds)
        planned = []
        for phone in phones:
            pin = pins.get(phone.name, Pin())
            allowed = [e for e in evaluated[phone.name] if pin.cut is None or e.choice.cut == pin.cut]
            planned.append(self.choose_exit(phone, allowed, reference))
        return planned

    def oracle(self, phone: DeviceProfile) -> PhonePlan:
        """The same rule over the raw product of every field (any train_from, every engine the
        phone has where it can run): a brute force to check the planner's search against, for
        a model without exits."""
        first_cut = 0 if self.config.allow_raw_upload else 1
        raw = (
            Choice(cut, train_from, engine, encoding, batch)
            for cut, train_from, engine, encoding, batch in itertools.product(
                range(first_cut, self.n + 1), range(self.n + 1), ENGINES, self.config.encodings, self.config.batches
            )
            if (cut == 0 or any(i >= train_from for i in self.model.parameterised_blocks(cut)))
            and engine in self.engines(phone, cut, train_from)
        )
        return self.choose(phone, self.evaluate_all(phone, raw))

    def plan(self, phones: list[DeviceProfile], pins: dict[str, Pin] | None = None) -> FleetPlan:
        """Plans every phone; ``pins`` fixes what it names of the phones it names (by profile name)."""
        names = [p.name for p in phones]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PlanError(f"profile names must be unique, {', '.join(duplicates)} repeat: rename the profiles")
        pins = pins or {}
        if self.exit_from is not None:
            return self._fleet(self._plan_exits(phones, pins))
        # Every phone downloads the whole global blob: every block from the fleet's shallowest
        # train_from on. Plan each phone alone, then re-price every choice with the fleet's
        # download and choose again, until the shallowest train_from holds. It never moves up
        # (a choice starting at it costs the same again, shallower ones no more, the rest more),
        # so this ends within n passes.
        fed_from = None
        for _ in range(self.n + 1):
            planned = [self.plan_phone(p, pins.get(p.name, Pin()), fed_from) for p in phones]
            shallowest = min((pp.plan.train_from for pp in planned if pp.plan is not None), default=None)
            if shallowest is None or shallowest == fed_from:
                break
            fed_from = shallowest
        return self._fleet(planned)

    def _fleet(self, planned: list[PhonePlan]) -> FleetPlan:
        return FleetPlan(
            model_id=self.model.model_id,
            block_names=self.model.block_names,
            edge=self.edge.name,
            config=self.config,
            phones=planned,
        )


def exit_train_from(model: SplittableModel, config: PlanConfig) -> int:
    """T, the first block an exit run trains: the first of the model's last ``train_blocks``
    parameterised blocks (default 1: the classifier). A phone trains from min(T, its exit)."""
    return model.train_from(len(model.block_names), config.train_blocks or 1)


def weights_by_exit(model: SplittableModel, given: dict[int, float] | tuple[float, ...] | None) -> dict[int, float]:
    """Every exit's loss weight λ from ``given`` (``per_exit``'s forms; None: 1 each), not all 0:
    the plans' and the aggregator's evaluator's (its total loss)."""
    if given is None:
        return dict.fromkeys(model.exits, 1.0)
    weights = per_exit(model, given, "exit weights")
    if sum(weights.values()) <= 0:
        raise PlanError("exit_weights are all 0: at least one exit must carry the loss")
    return weights


def per_exit(
    model: SplittableModel, given: dict[int, float] | tuple[float, ...], what: str, complete: bool = False
) -> dict[int, float]:
    """``given`` (position → value, or one value per exit in order) as every exit's value,
    checked against the model's exits. A position a mapping leaves out gets 1, unless
    ``complete`` (then it may leave out none)."""
    exits = model.exits
    where = f"{model.model_id} has exits at {', '.join(map(str, exits))}"
    if not isinstance(given, dict):
        if len(given) != len(exits):
            raise PlanError(f"{len(given)} {what} for {len(exits)} exits: {where}; give one per exit")
        return dict(zip(exits, map(float, given), strict=True))
    unknown = sorted(set(given) - set(exits))
    if unknown:
        raise PlanError(f"{what} for positions {unknown}, which are no exits: {where}")
    missing = [p for p in exits if p not in given]
    if complete and missing:
        raise PlanError(f"{what} leave out exits {missing}: {where}; give one for each")
    return {p: float(given.get(p, 1.0)) for p in exits}


def _check_exit_policy(model: SplittableModel, config: PlanConfig) -> None:
    """What an exit run cannot do: SplitFed, or depths per phone."""
    if config.mode == "splitfed":
        raise PlanError(
            f"mode splitfed with {model.model_id}: SplitFed + exits is not supported, since the edge would need "
            "the blocks and branches past each phone's exit, where its model ends; use mode federated"
        )
    if config.max_train_blocks is not None or config.stage_depths:
        raise PlanError(
            "an exit run trains one depth on every phone: give train_blocks, not max_train_blocks or stage_depths"
        )


def _check_exit_pins(model: SplittableModel, pins: dict[str, Pin]) -> None:
    for phone, pin in pins.items():
        if pin.depth is not None:
            raise PlanError(
                f"{phone}: an exit run trains one depth on every phone (train_blocks): pin its exit (cut), not a depth"
            )
        if pin.cut is not None and pin.cut not in model.exits:
            raise PlanError(
                f"{phone}: cut {pin.cut} is no exit of {model.model_id}; pin one of {', '.join(map(str, model.exits))}"
            )


def load_plan(path: Path) -> FleetPlan:
    """A fleet plan written by `fedkit plan`, validated."""
    data = read_json(path, "plan", f"fedkit plan --out {path}")
    if isinstance(data, dict) and data.get("schema_version") != SCHEMA_VERSION:
        raise PlanError(
            f"plan {path} has schema version {data.get('schema_version')!r}, this fedkit reads {SCHEMA_VERSION}: "
            "re-run `fedkit plan`"
        )
    try:
        return FleetPlan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"plan {path} is invalid ({describe(exc)}): re-run `fedkit plan`") from exc
    except BundleError as exc:
        raise PlanError(f"plan {path} is invalid ({exc}): re-run `fedkit plan`") from exc


def plan_fleet(
    model: str,
    phones: list[DeviceProfile],
    edge: DeviceProfile | None = None,
    config: PlanConfig | None = None,
    link_name: str | None = None,
    pins: dict[str, Pin] | None = None,
) -> FleetPlan:
    """Plans every phone for the named model. ``edge`` defaults to this host, profiled quickly;
    ``link_name`` puts every phone on that catalogue link; ``pins`` fixes the cut or depth of
    the phones it names."""
    unknown = sorted(set(pins or {}) - {p.name for p in phones})
    if unknown:
        raise PlanError(f"pins name {', '.join(unknown)}, which no profile is: use the profiles' names")
    if link_name is not None:
        phones = [p.with_link(link(link_name)) for p in phones]
    edge = edge or measure_local(quick=True, name="edge (this host)")
    return Planner(load_model(model), edge, config).plan(phones, pins)
