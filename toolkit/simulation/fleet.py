"""``fedkit simulate``: a federation of emulated phones against the real aggregator, on one host.

The orchestration, in order:

1. plan every phone (``toolkit.planning``) and export one bundle per distinct plan (cached);
2. split the training images (Dirichlet or IID) and write each phone's shard;
3. start the aggregator (``python -m toolkit.aggregator.server``) on a free loopback port,
   issue one enrolment token per phone, enrol each phone, deploy its bundles, shard and
   credential into its folder (``android_harness.deploy``);
4. start one process per phone (``python -m android_harness.phone``), shaped by its profile
   (with ``netem``, each phone in its own network namespace; the aggregator then listens on
   every address, as the phones reach it over their veth pairs);
5. watch the aggregator's database: evaluate every new global model version on the test
   images (frozen features cached on this host, the trainable part in PyTorch), post the
   accuracy to the aggregator's evaluator hook, inject the configured faults;
6. when the run is done, stop everything and write the report.

The run folder holds ``config.json``, ``plan.json``, ``aggregator.toml``, ``aggregator.sqlite``,
``metrics.jsonl`` (one line per model version), ``faults.jsonl``, ``summary.json``,
``phones/<id>/`` (each phone's folder, its ``events.jsonl`` and log) and ``report/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import httpx
import numpy as np

from android_harness.availability import churn
from android_harness.deploy import LocalTarget
from android_harness.link import LinkShape, LinkWindow
from android_harness.phone import PhoneSpec
from device_runtime.bundle import Bundle
from device_runtime.client import SyncClient
from device_runtime.manifest import DevicePlan
from toolkit.aggregator.process import AggregatorProcess
from toolkit.child import ChildProcess
from toolkit.errors import ConfigError, FedkitError
from toolkit.simulation.config import SimulationConfig

if TYPE_CHECKING:
    from android_harness.netns import NamespaceNetwork
    from toolkit.models import SplittableModel
    from toolkit.planning import FleetPlan, PhonePlan, Planner
    from toolkit.profiling import DeviceProfile

SCHEMA_VERSION = 1
POLL_S = 0.5
PHONE_EXIT_GRACE_S = 30.0


@dataclass(frozen=True)
class Phone:
    device_id: str
    phone_class: str
    profile: "DeviceProfile"
    engine: str
    churn: tuple[float, float] | None  # (mean online s, mean offline s)
    cut: int | None = None  # SplitFed: the group's fixed cut instead of the planner's


@dataclass
class Tick:
    """What the live display shows, refreshed every poll."""

    elapsed_s: float
    stage: str | None
    round: int | None
    reports: int
    assigned: int
    accuracy: float | None
    versions: int
    bytes_up: int
    phones_running: int
    faults: list[str] = field(default_factory=list)
    done: bool = False


class SimulationError(FedkitError):
    """The simulated run could not be set up or did not finish."""


# -- setup -----------------------------------------------------------------------------------
def fleet_phones(config: SimulationConfig) -> list[Phone]:
    from toolkit.profiling import DeviceProfile, catalog_profiles

    phones = []
    for group in config.phones:
        profile = catalog_profiles([group.phone_class])[0] if group.phone_class else DeviceProfile.load(group.profile)
        ch = (group.churn_online_s, group.churn_offline_s) if group.churn_online_s else None
        for _ in range(group.count):
            phones.append(Phone(f"phone-{len(phones) + 1}", profile.name, profile, group.engine, ch, group.cut))
    return phones


def plan_phones(config: SimulationConfig, phones: list[Phone], model: "SplittableModel") -> tuple["FleetPlan", dict[str, list[DevicePlan]]]:
    """The fleet plan, and per phone the plans of the bundles it gets.

    Federated (``mode = "federated"``): the bundle training the last ``train_blocks`` blocks
    first, then (``depth = "plan"``) the planner's depth, capped at ``max_train_blocks``; a
    SplitFed choice (cut before the end) is run as the same depth with the whole model on the
    phone. SplitFed (``mode = "splitfed"``): one bundle, the planner's rule applied to the
    SplitFed choices alone (cut before the last block, trainable depth, phone and edge
    together, capped at ``max_train_blocks``): a class the planner would give the whole model
    still runs SplitFed, at the best cut the rule finds for it."""
    from toolkit.planning import FleetPlan, PlanConfig, Planner
    from toolkit.profiling import DeviceProfile

    n = len(model.block_names)
    unique = list({p.profile.name: p.profile for p in phones}.values())
    # The host that runs the aggregator is the edge: what the planner prices SplitFed choices against.
    edge = DeviceProfile(name="edge", source="local", cpu_cores=os.cpu_count() or 1, gflops=50.0, memory_mb=8192)
    plan_config = PlanConfig(samples=max(1, config.train_images // len(phones)), batch_size=config.batch_size,
                             encodings=(config.encoding,) if config.encoding in ("fp32", "fp16", "int8", "int4") else ("int8",),
                             slack=config.planner_slack)
    planner = Planner(model, edge, plan_config)
    if config.mode == "splitfed":
        chosen_for = {(p.profile.name, p.cut): p.profile for p in phones}  # a group may pin its cut
        by_phone = {key: splitfed_choice(planner, profile, config.max_train_blocks, key[1]) for key, profile in chosen_for.items()}
        fleet = FleetPlan(model_id=model.model_id, block_names=model.block_names, edge=edge.name, config=plan_config,
                          phones=list(by_phone.values()))
        out = {}
        for phone in phones:
            chosen = by_phone[(phone.phone_class, phone.cut)]
            if chosen.plan is None:
                raise SimulationError(f"no SplitFed choice for {phone.phone_class}: {chosen.reason}")
            out[phone.device_id] = [replace(chosen.plan, predicted={}, encoding=config.encoding)]
        return fleet, out
    fleet = planner.plan(unique)
    by_class = {p.profile: p for p in fleet.phones}
    out: dict[str, list[DevicePlan]] = {}
    for phone in phones:
        chosen = by_class[phone.phone_class]
        if chosen.plan is None:
            raise SimulationError(f"the planner found nothing that fits {phone.phone_class}: {chosen.reason}")
        engine = chosen.plan.engine if phone.engine == "plan" else phone.engine
        head = DevicePlan(cut=n, train_from=model.train_from(n, config.train_blocks), engine=engine,
                          encoding=config.encoding, batch_size=config.batch_size)
        plans = [head]
        if config.depth == "plan":
            depth = min(chosen.trainable_blocks or 1, config.max_train_blocks or n)
            train_from = model.train_from(n, depth)
            deep = DevicePlan(cut=n, train_from=train_from, engine=engine, encoding=config.encoding,
                              batch_size=chosen.plan.batch_size)
            if deep.train_from < head.train_from:
                plans.append(deep)
        out[phone.device_id] = plans
    return fleet, out


def splitfed_choice(planner: "Planner", profile: "DeviceProfile", max_depth: int | None, cut: int | None = None) -> "PhonePlan":
    """The planner's rule over its SplitFed choices for ``profile``: a cut before the last block
    (``cut`` when given), engine ort (only it back-propagates the edge's gradient), trainable
    depth (phone and edge together) at most ``max_depth``."""
    from toolkit.planning import PhonePlan

    evaluated = [
        e for e in planner.evaluate_all(profile, planner.candidates(profile))
        if e.choice.cut < planner.n and e.choice.engine == "ort" and (max_depth is None or e.depth <= max_depth)
        and (cut is None or e.choice.cut == cut)
    ]
    if not evaluated:
        at = f" at cut {cut}" if cut is not None else ""
        within = f" within max_train_blocks = {max_depth}" if max_depth is not None else ""
        return PhonePlan(profile=profile.name, plan=None, reason=(
            f"no SplitFed choice{at}{within} fits it on the ort engine (the phone trains at least one block before "
            f"the cut, the edge every block after it): raise max_train_blocks, or pin a cut between 1 and {planner.n - 1}"))
    return planner.choose(profile, evaluated)


def bundle_name(model: "SplittableModel", plan: DevicePlan) -> str:
    # No encoding in the name: every task names the encoding the phone uses for that round.
    cut = f"-cut{plan.cut}" if plan.cut < len(model.block_names) else ""  # SplitFed
    return f"{model.model_id}{cut}-from{plan.train_from}-{plan.engine}-b{plan.batch_size}"


def export_bundles(model: "SplittableModel", plans: list[DevicePlan], progress: Callable[[str], None] = lambda s: None) -> dict[str, Path]:
    """One bundle per distinct plan, exported once into the host cache and reused after. Each
    frozen part is fed the global values of every block some plan trains (``fed_from``)."""
    from exporters.bundle import EXPORT_FORMAT, export_bundle
    from toolkit.central import cache_dir
    from toolkit.data import LABEL_NAMES

    out = {}
    fed_from = min(plan.train_from for plan in plans)
    for plan in plans:
        name = bundle_name(model, plan)
        if name in out:
            continue
        fed = f"-fed{fed_from}" if fed_from < plan.train_from else ""
        path = cache_dir() / "bundles" / f"{name}{fed}-x{EXPORT_FORMAT}-{model.content_hash()[:12]}"
        try:
            Bundle.load(path)
        except FedkitError:
            if path.exists():
                shutil.rmtree(path)
            progress(f"exporting {name}")
            export_bundle(model, plan, path, (plan.engine,), label_names=LABEL_NAMES, fed_from=fed_from)
        out[name] = path
    return out


def split_data(config: SimulationConfig, n_phones: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from toolkit.data import load_fashion_mnist, partition_dirichlet, partition_iid

    train = load_fashion_mnist("train")
    images, labels = train.images[: config.train_images], train.labels[: config.train_images]
    if config.partition == "dirichlet":
        parts = partition_dirichlet(labels, n_phones, config.alpha, config.seed)
    else:
        parts = partition_iid(labels, n_phones, config.seed)
    small = [i + 1 for i, p in enumerate(parts) if len(p) < 10]
    if small:
        raise ConfigError(
            f"phone(s) {', '.join(f'phone-{i}' for i in small)} get fewer than 10 images from the split: "
            "raise alpha or train_images, or use fewer phones"
        )
    return [(images[p], labels[p]) for p in parts]


class Evaluator:
    """Accuracy of a global model version on the test images: the frozen part's features are
    computed once (and cached on disk), the trainable part runs in PyTorch."""

    def __init__(self, model: "SplittableModel", stop_block: int, test_images: int):
        import torch

        from toolkit.central import features
        from toolkit.data import load_fashion_mnist

        test = load_fashion_mnist("test")
        self.labels = torch.from_numpy(test.labels[:test_images].astype(np.int64))
        self.h = torch.from_numpy(features(model, test.images[:test_images], stop_block))
        self.part = model.part(stop_block, len(model.block_names)).eval()

    def accuracy(self, tensors: dict[str, np.ndarray]) -> float:
        import torch

        state = self.part.state_dict()
        state.update({k: torch.from_numpy(np.array(v)) for k, v in tensors.items() if k in state})
        self.part.load_state_dict(state)
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(self.labels), 1000):
                correct += int((self.part(self.h[i : i + 1000]).argmax(1) == self.labels[i : i + 1000]).sum())
        return correct / len(self.labels)


# -- processes -------------------------------------------------------------------------------
class PhoneProcess(ChildProcess):
    def __init__(self, spec_path: Path, phone_dir: Path, prefix: list[str]):
        self.command = [*prefix, sys.executable, "-m", "android_harness.phone", str(spec_path)]
        self.phone_dir = phone_dir
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.starts = 0

    def start(self) -> None:
        with open(self.phone_dir / "phone.log", "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, env=self.env, start_new_session=True)
        self.starts += 1


    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def _events(path: Path, offset: int) -> tuple[list[dict], int]:
    """New complete JSON lines of an events file from ``offset``."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [json.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


# -- the run ---------------------------------------------------------------------------------
def simulate(config: SimulationConfig, run_dir: str | Path, on_tick: Callable[[Tick], None] = lambda t: None,
             on_step: Callable[[str], None] = lambda s: None) -> dict:
    """Runs the simulation into ``run_dir`` (must not exist, or be empty); returns the summary."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} is not empty: pass a new --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2, by_alias=True) + "\n")
    network = None
    if config.netem:
        from android_harness.netns import NamespaceNetwork

        network = NamespaceNetwork()
    try:
        return _run(config, run_dir, network, on_tick, on_step)
    finally:
        if network is not None:
            with _uninterrupted():
                network.close()


def _run(config: SimulationConfig, run_dir: Path, network: "NamespaceNetwork | None", on_tick, on_step) -> dict:
    from toolkit.aggregator.admin import issue_tokens
    from toolkit.aggregator.store import Store
    from toolkit.data import write_shard
    from toolkit.models import load_model
    from toolkit.report import build_report

    t_setup = time.time()
    on_step("planning")
    model = load_model(config.model)
    phones = fleet_phones(config)
    fleet, plans = plan_phones(config, phones, model)
    fleet.save(run_dir / "plan.json")
    all_plans = [p for ps in plans.values() for p in ps]
    on_step("exporting bundles")
    bundles = export_bundles(model, all_plans, on_step)
    deepest = min(all_plans, key=lambda p: p.train_from)
    initial = run_dir / "initial_weights.bin"
    if config.mode == "splitfed":  # the edges' blocks too: every block from the deepest phone's train_from
        from toolkit.splitfed import initial_weights

        initial.write_bytes(initial_weights(model, deepest.train_from))
    else:
        initial.write_bytes(Bundle.load(bundles[bundle_name(model, deepest)]).path("weights").read_bytes())

    on_step("splitting the data")
    shards = split_data(config, len(phones))

    on_step("test-set features for evaluation")
    evaluator = Evaluator(model, min(p.train_from for p in all_plans), config.test_images)

    db = run_dir / "aggregator.sqlite"
    agg_config = {
        "schema_version": 1, "name": config.name, "weights": initial.name, "model": config.model,
        "run_dir": ".", "mode": "fedavg", "seed": config.seed,
        "fedavg": {"deadline_s": config.deadline_s, "min_reports": config.min_reports},
        "stages": [s.model_dump() for s in config.stages],
    }
    if config.mode == "splitfed":
        # every phone may have a batch at the edge at once; one copy per phone
        agg_config["splitfed"] = {"workers": config.edge_workers, "queue": len(phones), "max_copies": len(phones)}
    (run_dir / "aggregator.toml").write_text(_toml(agg_config))
    store = Store(db)
    tokens = issue_tokens(store, len(phones), "enrol")
    admin_token = issue_tokens(store, 1, "admin")[0]
    aggregator = AggregatorProcess(run_dir / "aggregator.toml", db, run_dir / "aggregator.log",
                                   host="0.0.0.0" if network else "127.0.0.1")
    on_step("starting the aggregator")
    aggregator.start()

    fastest = max(p.profile.gflops for p in phones)
    t0 = time.time()
    specs, procs, link_modes = {}, {}, {}
    try:
        on_step("deploying the phones")
        for i, phone in enumerate(phones):
            phone_dir = run_dir / "phones" / phone.device_id
            phone_dir.mkdir(parents=True)
            link = phone.profile.link
            url, prefix, link_mode = aggregator.url, [], "none"
            shape = LinkShape()
            windows = tuple(
                LinkWindow(t0 + f.after_s, t0 + f.after_s + f.duration_s, f.delay_ms, f.loss)
                for f in config.faults if f.kind == "link" and f.phone in (None, phone.device_id)
            )
            if config.shape_links and link is not None:
                if network is not None:
                    net = network.add_phone(link.uplink_mbps, link.downlink_mbps, link.rtt_ms)
                    url, prefix = f"http://{net.host_ip}:{aggregator.port}", net.command_prefix()
                    rtt = 0.0 if network.netem else link.rtt_ms
                    shape = LinkShape(rtt_ms=rtt, windows=windows)
                    link_mode = "netns + tc tbf" + (" + netem" if network.netem else ", RTT in-process (no netem in this kernel)")
                else:
                    shape = LinkShape(link.uplink_mbps, link.downlink_mbps, link.rtt_ms, windows=windows)
                    link_mode = "in-process"
            else:
                shape = LinkShape(windows=windows)
            link_modes[phone.device_id] = link_mode
            with SyncClient(url) as client:
                token = client.enrol(tokens[i], phone.device_id)
            credential = run_dir / "credentials" / f"{phone.device_id}.json"
            credential.parent.mkdir(exist_ok=True)
            credential.write_text(json.dumps({"url": url, "device_id": phone.device_id, "token": token}) + "\n")
            shard = write_shard(run_dir / "shards" / f"{phone.device_id}.npz", *shards[i])
            names = [bundle_name(model, p) for p in plans[phone.device_id]]
            LocalTarget(phone_dir).install([bundles[n] for n in names], shard, credential)
            offline = churn(config.seed * 1000 + i, config.timeout_s, *phone.churn) if phone.churn else ()
            spec = PhoneSpec(
                phone_dir=str(phone_dir), device_id=phone.device_id, phone_class=phone.phone_class,
                compute_factor=round(fastest / phone.profile.gflops, 3) if config.compute == "relative" else 1.0,
                memory_mb=phone.profile.memory_mb if config.memory_cap else None, link=shape, offline=offline, t0=t0,
                duplicate_posts=any(f.kind == "duplicate_pushes" and f.phone == phone.device_id for f in config.faults),
            )
            spec.save(phone_dir / "spec.json")
            specs[phone.device_id] = spec
            procs[phone.device_id] = PhoneProcess(phone_dir / "spec.json", phone_dir, prefix)
        setup_s = time.time() - t_setup
        on_step("training")
        t_train = time.time()
        for proc in procs.values():
            proc.start()
        monitor = Monitor(config, run_dir, store, aggregator, procs, evaluator, admin_token, on_tick)
        monitor.run()
        train_s = time.time() - t_train
        outcome = monitor.summary()
    finally:
        with _uninterrupted():  # a second Ctrl-C must not leave phones or the aggregator running
            for proc in procs.values():
                proc.kill()
            aggregator.stop()
            store.close()

    summary = {
        "schema_version": SCHEMA_VERSION,
        "name": config.name,
        "model": config.model,
        "mode": config.mode,
        "depth": config.depth,
        "test_images": config.test_images,
        "phones": [
            {"device_id": s.device_id, "class": s.phone_class, "compute_factor": s.compute_factor,
             "address_space_mb": s.address_space_mb(), "link": link_modes[s.device_id],
             "bundles": [bundle_name(model, p) for p in plans[s.device_id]],
             "samples": int(len(shards[i][1])), "starts": procs[s.device_id].starts,
             "exit_code": procs[s.device_id].returncode, "offline_windows": len(s.offline),
             "peak_rss_mb": monitor.peak_rss.get(s.device_id)}
            for i, s in enumerate(specs.values())
        ],
        "compute_note": ("each phone's local round is slowed to (fastest class GFLOP/s / its GFLOP/s) x the time this host took"
                         if config.compute == "relative" else "phones run at host speed"),
        "setup_s": round(setup_s, 1),
        "train_s": round(train_s, 1),
        "wall_s": round(time.time() - t_setup, 1),
        "netem": network is not None and network.netem,
        "reference": central_reference(config.model),
        **outcome,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    on_step("writing the report")
    summary["report"] = str(build_report(run_dir).resolve())
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


class Monitor:
    """Watches the run until it is done: evaluates versions, injects faults, tracks phones."""

    def __init__(self, config, run_dir, store, aggregator: AggregatorProcess, procs: dict[str, PhoneProcess], evaluator: Evaluator,
                 admin_token: str, on_tick):
        self.config, self.run_dir, self.store, self.aggregator = config, run_dir, store, aggregator
        self.procs, self.evaluator, self.admin_token, self.on_tick = procs, evaluator, admin_token, on_tick
        self.evaluated = 0  # versions evaluated (version 0 first)
        self.pending_evals: list[tuple[int, float]] = []  # posted once the aggregator answers
        self.offsets = {d: 0 for d in procs}
        self.training: dict[str, tuple[int, float]] = {}  # phone → (round, when it started training)
        self.accepted: set[tuple[str, int]] = set()  # (phone, round) the phones were told "accepted"
        self.fault_log: list[dict] = []
        self.todo = list(config.faults)
        self.restarts: list[tuple[float, Callable[[], None], str]] = []
        self.metrics = open(run_dir / "metrics.jsonl", "a", buffering=1)
        self.faults_file = open(run_dir / "faults.jsonl", "a", buffering=1)
        self.t0 = time.time()
        self.accuracy: float | None = None
        self.crashed: dict[str, int] = {}
        self.armed: dict[int, float] = {}
        self.peak_rss: dict[str, float] = {}
        self.trained: dict[int, dict[str, dict]] = {}  # round → phone → its "train" event

    def run(self) -> None:
        done_at = None
        while True:
            now = time.time()
            if now - self.t0 > self.config.timeout_s:
                raise SimulationError(f"the run did not finish within timeout_s = {self.config.timeout_s:.0f} s; see {self.run_dir}")
            self._read_events()
            self._faults(now)
            self._evaluate()
            self._watch_processes()
            done = self.store.get_meta("done") == "1"
            self.on_tick(self._tick(done))
            if done and self.evaluated > (self.store.latest_version().version) and not self.pending_evals:
                done_at = done_at or now
                if not any(p.alive() for p in self.procs.values()) or now - done_at > PHONE_EXIT_GRACE_S:
                    break
            if not self.aggregator.alive() and not self.restarts:
                raise SimulationError(f"the aggregator exited on its own (code {self.aggregator.proc.returncode}); see {self.run_dir}/aggregator.log")
            if not any(p.alive() for p in self.procs.values()) and not self.restarts and not done:
                raise SimulationError(f"every phone has stopped before the run was done; see {self.run_dir}/phones/*/phone.log")
            time.sleep(POLL_S)
        self._read_events()

    def _tick(self, done: bool) -> Tick:
        rnd = self.store.current_round()
        return Tick(
            elapsed_s=time.time() - self.t0,
            stage=self.config.stages[rnd.stage].name if rnd else None,
            round=rnd.round if rnd else None,
            reports=len(self.store.updates(round_=rnd.round)) if rnd else 0,
            assigned=self.store.count_assigned(rnd.round) if rnd else 0,
            accuracy=self.accuracy,
            versions=self.evaluated,
            bytes_up=self.store.traffic()[1],
            phones_running=sum(p.alive() for p in self.procs.values()),
            faults=[f"{f['kind']} {f.get('phone') or ''}".strip() for f in self.fault_log],
            done=done,
        )

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate(self) -> None:
        from device_runtime.codec import decode

        latest = self.store.latest_version()
        while latest is not None and self.evaluated <= latest.version:
            v = self.store.get_version(self.evaluated)
            accuracy = self.evaluator.accuracy(decode(self.store.version_blob(v.version)).tensors)
            self.accuracy = accuracy
            stage = self.config.stages[v.stage].name if v.stage is not None else None
            rnd = self.store.get_round(v.round) if v.round is not None else None
            self.metrics.write(json.dumps({
                "version": v.version, "round": v.round, "stage": stage, "accuracy": accuracy, "updates": v.num_updates,
                "samples": sum(u.num_samples for u in self.store.updates(version=v.version)) if v.version else 0,
                "elapsed_s": round(v.created - self.t0, 2),
                "round_s": round(rnd.closed - rnd.opened, 2) if rnd and rnd.closed else None,
                **self._round_costs(v.round),
            }) + "\n")
            self.pending_evals.append((v.version, accuracy))
            self.evaluated += 1
        if self.pending_evals and self.aggregator.alive():
            try:
                for version, accuracy in list(self.pending_evals):
                    r = httpx.post(self.aggregator.url + "/v1/evaluations", json={"version": version, "accuracy": accuracy,
                                   "source": "simulation"}, headers={"Authorization": f"Bearer {self.admin_token}"}, timeout=10)
                    r.raise_for_status()
                    self.pending_evals.remove((version, accuracy))
            except httpx.HTTPError:
                pass  # the aggregator is restarting: posted on a later poll

    def _round_costs(self, round_: int | None) -> dict:
        """Each phone's own compute in the round (its "train" event) and, SplitFed, the bytes of
        activations up and gradients down and the edge's compute."""
        trained = self.trained.get(round_, {}) if round_ is not None else {}
        costs = {"phone_compute_s": {d: e.get("compute_s") for d, e in sorted(trained.items())}}
        if self.config.mode == "splitfed" and round_ is not None:
            costs["activation_bytes"] = sum(e.get("activation_bytes", 0) for e in trained.values())
            costs["gradient_bytes"] = sum(e.get("gradient_bytes", 0) for e in trained.values())
            costs["exchange_s"] = {d: e.get("exchange_s") for d, e in sorted(trained.items())}
            status = self.edge_status()
            costs["edge_s"] = status["edge_seconds"].get(str(round_)) if status else None
        return costs

    def edge_status(self) -> dict | None:
        """The SplitFed edge's status (GET /v1/splitfed/status), or None when it cannot be had now."""
        try:
            r = httpx.get(self.aggregator.url + "/v1/splitfed/status", headers={"Authorization": f"Bearer {self.admin_token}"},
                          timeout=10)
            r.raise_for_status()
            return r.json()
        except httpx.HTTPError:
            return None  # restarting: the figure is missing from this line

    # -- phones ----------------------------------------------------------------------------
    def _read_events(self) -> None:
        for device, proc in self.procs.items():
            events, self.offsets[device] = _events(proc.phone_dir / "events.jsonl", self.offsets[device])
            for e in events:
                if e["event"] == "round":
                    self.training[device] = (e["round"], e["t"])
                elif e["event"] == "train":
                    self.trained.setdefault(e["round"], {})[device] = e
                elif e["event"] == "done":
                    self.peak_rss[device] = e.get("peak_rss_mb")
                elif e["event"] == "upload" and e.get("status") == "accepted":
                    self.accepted.add((device, e["round"]))
                    self.training.pop(device, None)

    def _watch_processes(self) -> None:
        for device, proc in self.procs.items():
            code = proc.returncode
            if code not in (None, 0, -signal.SIGKILL) and device not in self.crashed:
                self.crashed[device] = code
                self._log_fault({"kind": "phone_exit", "phone": device, "detail": f"exited with code {code}; see its phone.log"})

    # -- faults ----------------------------------------------------------------------------
    def _faults(self, now: float) -> None:
        for when, action, what in list(self.restarts):
            if now >= when:
                self.restarts.remove((when, action, what))
                action()
                self._log_fault({"kind": "restart", "detail": what})
        for f in list(self.todo):
            if f.kind == "kill_phone":
                started = self.training.get(f.phone)
                if started and started[0] >= f.round and now >= started[1] + f.after_s and self.procs[f.phone].alive():
                    self.todo.remove(f)
                    self.procs[f.phone].kill()
                    self._log_fault({"kind": "kill_phone", "phone": f.phone, "round": started[0],
                                     "detail": f"SIGKILL {now - started[1]:.1f} s into training round {started[0]}"})
                    self.restarts.append((now + f.down_s, self.procs[f.phone].start, f"{f.phone} restarted"))
            elif f.kind == "kill_aggregator":
                rnd = self.store.current_round()
                if rnd and rnd.round >= f.round and rnd.closed is None and self.store.updates(round_=rnd.round):
                    first = min(u.id for u in self.store.updates(round_=rnd.round))
                    seen = self.armed.setdefault(id(f), now)  # when the round's first update was seen
                    if now >= seen + f.after_s:
                        self.todo.remove(f)
                        accepted = self.store.traffic()[0]
                        self.aggregator.kill()
                        self._log_fault({"kind": "kill_aggregator", "round": rnd.round,
                                         "detail": f"SIGKILL mid-round with {accepted} updates accepted (first of the round: #{first})",
                                         "accepted_before": accepted})
                        self.restarts.append((now + f.down_s, self.aggregator.start, "aggregator restarted on the same database"))

    def _log_fault(self, entry: dict) -> None:
        entry = {"t": round(time.time(), 3), "elapsed_s": round(time.time() - self.t0, 2), **entry}
        self.fault_log.append(entry)
        self.faults_file.write(json.dumps(entry) + "\n")

    def summary(self) -> dict:
        in_db = {(u.device_id, u.round) for u in self.store.updates()}
        lost = sorted(self.accepted - in_db)
        latest = self.store.latest_version()
        self.metrics.close()
        self.faults_file.close()
        return {
            "rounds": latest.round if latest else 0,
            "final_accuracy": self.accuracy,
            "updates_accepted": self.store.traffic()[0],
            "bytes_accepted": self.store.traffic()[1],
            "accepted_told_phones": len(self.accepted),
            "accepted_lost": len(lost),
            "faults": self.fault_log,
            "crashed_phones": self.crashed,
            **({"splitfed": self.edge_status()} if self.config.mode == "splitfed" else {}),
        }


@contextlib.contextmanager
def _uninterrupted():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def central_reference(model: str) -> dict | None:
    """The centralized reference (benchmarks/results/central.json of this checkout), if it is there
    and was trained for this model."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "central.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("config", {}).get("model", model) != model:
        return None
    return {"final_accuracy": data["figures"]["final_accuracy"], "test_accuracy": data["figures"]["test_accuracy"],
            "source": "benchmarks/results/central.json"}


def _toml(data: dict) -> str:
    """A small TOML writer for the aggregator's config: scalars, tables and arrays of tables."""

    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(str(v))

    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append(f"\n[{k}]\n" + "".join(f"{kk} = {value(vv)}\n" for kk, vv in v.items() if vv is not None))
        elif isinstance(v, list):
            for item in v:
                tables.append(f"\n[[{k}]]\n" + "".join(f"{kk} = {value(vv)}\n" for kk, vv in item.items() if vv is not None))
        elif v is not None:
            lines.append(f"{k} = {value(v)}")
    return "\n".join(lines) + "\n" + "".join(tables)
