"""``fedkit simulate``: the by-hand fleet path, automated, plus emulated phones and faults.

It calls the same library functions as the commands a user types, in order, and owns nothing
else:

1. ``fedkit plan``       — ``toolkit.planning.Planner`` with the simulation's policy as a
   ``PlanConfig`` (the edge: a profile file, or this host profiled like `fedkit plan` does);
2. ``fedkit export``     — ``toolkit.planning.export_plan_bundles`` (one cache, one naming);
3. ``fedkit shards``     — ``toolkit.data.write_shards``;
4. ``fedkit run-config`` — ``toolkit.runs.run_config`` / ``write_run``;
5. ``fedkit enrol-token``, ``fedkit serve`` — the aggregator as a child process;
6. ``fedkit deploy``     — ``android_harness.deploy.deploy`` per phone, each with a credential
   holding its enrolment token (``Credential.save``);
7. then one OS process per phone (``android_harness.phone``: compute, memory, link, churn),
   the ``Monitor`` on the aggregator's HTTP API, and the report.

The run folder holds ``config.json``, ``plan.json``, ``bundles/`` (with ``phones.json``),
``shards/``, ``run/`` (``run.toml``, ``weights.bin``), ``aggregator.sqlite``,
``metrics.jsonl``, ``faults.jsonl``, ``summary.json``, ``phones/<id>/`` (each phone's folder,
its ``events.jsonl`` and log) and ``report/``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from android_harness.deploy import deploy
from android_harness.link import LinkShape
from device_runtime.phone_loop import Credential
from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.process import AggregatorProcess
from toolkit.aggregator.status import against_plan
from toolkit.aggregator.store import Store
from toolkit.data import write_shards
from toolkit.errors import ConfigError
from toolkit.planning import FleetPlan, Pin, PlanConfig, Planner, export_plan_bundles
from toolkit.planning.export import phone_bundles, read_index
from toolkit.profiling import DeviceProfile, measure_local
from toolkit.runs import has_splitfed, run_config, write_run
from toolkit.simulation.config import SimulationConfig
from toolkit.simulation.monitor import Monitor
from toolkit.simulation.phones import Arm64PhoneProcess, Phone, PhoneProcess, fleet_phones, link_windows, phone_spec
from toolkit.simulation.summary import PhoneSummary, RunSummary, Tick, central_reference

if TYPE_CHECKING:
    from android_harness.arm64 import Arm64Phone
    from android_harness.netns import NamespaceNetwork


def plan_config(config: SimulationConfig, num_phones: int) -> PlanConfig:
    """The simulation's planning policy, as `fedkit plan` options would give it. ``depth`` is
    for whole-model phones: with depth "head" a federated run trains exactly ``train_blocks``; a
    SplitFed or mixed run is capped by ``max_train_blocks`` alone (a SplitFed phone's depth
    counts the edge's blocks too)."""
    # an exit run trains train_blocks on every phone, whatever its depth policy; its exit is the planner's
    head_only = config.mode == "federated" and (config.depth == "head" or config.has_exits)
    return PlanConfig(
        samples=max(1, config.train_images // num_phones),
        batch_size=config.batch_size,
        encodings=(config.encoding,),
        slack=config.planner_slack,
        mode=config.mode,
        max_train_blocks=None if head_only else config.max_train_blocks,
        train_blocks=config.train_blocks if head_only else None,
        stage_depths=(config.train_blocks,) if config.depth == "plan" and not config.has_exits else (),
        exit_policy=config.exit_policy,
        exit_weights=config.exit_weights,
        exit_accuracy=config.exit_accuracy,
        seed=config.seed,
    )


def plan_fleet(config: SimulationConfig, phones: list[Phone], on_step: Callable[[str], None]) -> tuple[FleetPlan, str]:
    """The fleet plan of the phones' distinct profiles, and where the edge's profile came from."""
    from toolkit.models import load_model

    if config.edge is not None:
        edge, where = DeviceProfile.load(config.edge), f"{config.edge.name} (pinned in the config)"
    else:
        on_step("profiling this host as the edge")
        edge, where = measure_local(quick=True, name="edge (this host)"), "this host, profiled at the start"
    profiles = list({p.profile.name: p.profile for p in phones}.values())
    pins = {p.profile.name: Pin(cut=p.cut) for p in phones if p.cut is not None}
    fleet = Planner(load_model(config.model), edge, plan_config(config, config.num_phones)).plan(profiles, pins)
    for p in fleet.infeasible:
        raise ConfigError(f"the planner found nothing that fits {p.profile}: {p.reason}")
    return fleet, f"{edge.name}: {edge.gflops:.0f} GFLOP/s, {where}"


def simulate(
    config: SimulationConfig,
    run_dir: str | Path,
    on_tick: Callable[[Tick], None] = lambda t: None,
    on_step: Callable[[str], None] = lambda s: None,
) -> RunSummary:
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


def _run(config: SimulationConfig, run_dir: Path, network: NamespaceNetwork | None, on_tick, on_step) -> RunSummary:
    from toolkit.evaluation import Evaluator
    from toolkit.models import load_model
    from toolkit.report import build_report

    t_setup = time.time()
    on_step("planning")
    everyone = fleet_phones(config)
    phones = [p for p in everyone if not p.left_out]  # the left-out keep their shards, unused
    fleet, edge_note = plan_fleet(config, phones, on_step)
    fleet.save(run_dir / "plan.json")
    on_step("exporting bundles")
    export_plan_bundles(fleet, run_dir / "bundles", lambda step, done, total: on_step(f"exporting: {step}"))
    bundles = read_index(run_dir / "bundles")
    on_step("splitting the data")
    shards = write_shards(
        run_dir / "shards",
        [p.device_id for p in everyone],
        config.partition,
        alpha=config.alpha,
        seed=config.seed,
        train_images=config.train_images,
    )
    on_step("writing the run config")
    sections = {"seed": config.seed, "fedavg": {"deadline_s": config.deadline_s, "min_reports": config.min_reports}}
    if has_splitfed(fleet):  # every phone may have a batch at the edge at once; one copy per phone
        sections["splitfed"] = {"workers": config.edge_workers, "queue": len(phones), "max_copies": len(phones)}
    run_toml = write_run(
        run_config(fleet, config.name, [s.model_dump(exclude_none=True) for s in config.stages], **sections),
        fleet,
        run_dir / "run",
    )

    on_step("test-set features for evaluation")
    model = load_model(config.model)
    plans = [p for phone_plans in phone_bundles(fleet, model).values() for p in phone_plans]
    # an exit model's λ: the weight the plans give each exit (1 where no phone holds it)
    weights = {e: w for p in plans for e, w in zip(p.exits, p.exit_weights, strict=True)}
    evaluator = Evaluator(
        model, min(p.train_from for p in plans), config.test_images, [weights.get(e, 1.0) for e in model.exits]
    )

    db = run_dir / "aggregator.sqlite"
    store = Store(db)
    try:
        tokens = issue_tokens(store, len(phones), "enrol")
        admin_token = issue_tokens(store, 1, "admin")[0]
    finally:
        store.close()
    aggregator = AggregatorProcess(run_toml, db, run_dir / "aggregator.log", host="0.0.0.0" if network else "127.0.0.1")
    on_step("starting the aggregator")
    aggregator.start()

    fastest = max((p.profile.gflops for p in phones if not p.arm64), default=1.0)
    t0 = time.time()
    procs: dict[str, PhoneProcess] = {}
    specs, link_modes = {}, {}
    inside = {}  # arm64 phones: their folder in the emulated phone, moved into the run folder at the end
    try:
        arm64_phone = _arm64_phone(phones, network, on_step)
        on_step("deploying the phones")
        for i, phone in enumerate(phones):
            phone_dir = run_dir / "phones" / phone.device_id
            on_arm64 = arm64_phone if phone.arm64 else None  # the emulated phone it runs in
            if on_arm64 is not None:
                phone_path = (
                    PurePosixPath("/opt/fedkit/sim") / f"{config.name}-{int(t0)}-{os.getpid()}" / phone.device_id
                )
                phone_dir = inside[phone.device_id] = on_arm64.host_path(phone_path)
            url, prefix, shape, link_modes[phone.device_id] = _link(config, phone, aggregator, network, t0)
            credential = run_dir / "credentials" / f"{phone.device_id}.json"
            credential.parent.mkdir(exist_ok=True)
            Credential(url, phone.device_id, enrol_token=tokens[i]).save(credential)
            deploy(
                bundles[phone.profile.name],
                f"local:{phone_dir}",
                run_dir / "shards" / f"{phone.device_id}.npz",
                credential,
            )
            specs[phone.device_id] = phone_spec(config, phone, i, phone_dir, fastest, t0, shape)
            specs[phone.device_id].save(phone_dir / "spec.json")
            procs[phone.device_id] = (
                Arm64PhoneProcess(on_arm64, phone_path, phone_dir)
                if on_arm64 is not None
                else PhoneProcess(phone_dir / "spec.json", phone_dir, prefix)
            )
        setup_s = time.time() - t_setup
        on_step("training")
        t_train = time.time()
        for proc in procs.values():
            proc.start()
        monitor = Monitor(config, run_dir, aggregator, procs, evaluator, admin_token, on_tick)
        monitor.run()
        train_s = time.time() - t_train
        outcome = monitor.outcome()
    finally:
        with _uninterrupted():  # a second Ctrl-C must not leave phones or the aggregator running
            for proc in procs.values():
                proc.kill()
            aggregator.stop()
            for device, folder in inside.items():  # the run folder holds every phone's folder
                shutil.move(folder, run_dir / "phones" / device)

    predicted = {p.profile: p.plan.predicted for p in fleet.phones if p.plan is not None}
    by_device = {p.device_id: p for p in phones}
    measured = {}
    if monitor.final_status is not None:
        device_predictions = {d: predicted[by_device[d].profile.name] for d in by_device}
        measured = {row.device_id: row for row in against_plan(monitor.final_status, device_predictions)}
    summary = RunSummary(
        name=config.name,
        model=config.model,
        mode=config.mode,
        depth=config.depth,
        test_images=config.test_images,
        edge=edge_note,
        phones=[
            PhoneSummary(
                device_id=d,
                phone_class=s.phone_class,
                compute_factor=s.compute_factor,
                address_space_mb=s.address_space_mb(),
                link=link_modes[d],
                bundles=[b.name for b in bundles[by_device[d].profile.name]],
                samples=shards[d]["images"],
                starts=procs[d].starts,
                exit_code=procs[d].returncode,
                offline_windows=len(s.offline),
                peak_rss_mb=monitor.peak_rss.get(d),
                predicted=predicted[s.phone_class],
                measured_round_s=measured[d].measured_s if d in measured else None,
                measured_up_bytes=measured[d].measured_up if d in measured else None,
                measured_down_bytes=measured[d].measured_down if d in measured else None,
            )
            for d, s in specs.items()
        ],
        compute_note=(
            "each phone's local round is slowed to (fastest class GFLOP/s / its GFLOP/s) x the time this host took"
            if config.compute == "relative"
            else "phones run at host speed"
        ),
        setup_s=round(setup_s, 1),
        train_s=round(train_s, 1),
        wall_s=round(time.time() - t_setup, 1),
        netem=network is not None and network.netem,
        reference=central_reference(config.model),
        **outcome,
    )
    summary.save(run_dir)
    on_step("writing the report")
    summary = summary.model_copy(update={"report": str(build_report(run_dir).resolve())})
    summary.save(run_dir)
    return summary


def _link(
    config: SimulationConfig, phone: Phone, aggregator: AggregatorProcess, network: NamespaceNetwork | None, t0: float
) -> tuple[str, list[str], LinkShape, str]:
    """The phone's aggregator URL, its command prefix (a network namespace), its in-process link
    shape, and how its link is shaped, in words."""
    if phone.arm64:  # the phone shares this host's network namespace: loopback reaches the aggregator
        return aggregator.url, [], LinkShape(), "none: an arm64 phone under qemu, unshaped"
    link = phone.profile.link
    windows = link_windows(config, phone.device_id, t0)
    if not config.shape_links or link is None:
        return aggregator.url, [], LinkShape(windows=windows), "none"
    if network is None:
        return (
            aggregator.url,
            [],
            LinkShape(link.uplink_mbps, link.downlink_mbps, link.rtt_ms, windows=windows),
            "in-process",
        )
    net = network.add_phone(link.uplink_mbps, link.downlink_mbps, link.rtt_ms)
    shape = LinkShape(rtt_ms=0.0 if network.netem else link.rtt_ms, windows=windows)
    mode = "netns + tc tbf" + (" + netem" if network.netem else ", RTT in-process (no netem in this kernel)")
    return f"http://{net.host_ip}:{aggregator.port}", net.command_prefix(), shape, mode


def _arm64_phone(phones: list[Phone], network: NamespaceNetwork | None, on_step) -> Arm64Phone | None:
    """The emulated arm64 phone the arm64 groups run in (built or reused), or None without them."""
    if not any(p.arm64 for p in phones):
        return None
    if network is not None:
        raise ConfigError("arm64 phones run in this host's network namespace: drop --netem, or the arm64 groups")
    from android_harness.arm64 import ensure_phone

    on_step("the emulated arm64 phone (built once: minutes)")
    return ensure_phone()


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
