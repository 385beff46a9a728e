"""The simulation's phones: who they are (a config's phone groups, each a profile), how each is
shaped (``android_harness.phone.PhoneSpec``: compute, memory, link, churn, faults) and its OS
process (``python -m android_harness.phone``)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from android_harness.availability import churn
from android_harness.link import LinkShape, LinkWindow
from android_harness.phone import PhoneSpec
from toolkit.child import ChildProcess
from toolkit.errors import InternalError
from toolkit.profiling import DeviceProfile, catalog_profiles
from toolkit.simulation.config import SimulationConfig

if TYPE_CHECKING:
    from android_harness.arm64 import Arm64Phone


@dataclass(frozen=True)
class Phone:
    device_id: str
    profile: DeviceProfile  # its name is what the fleet plan knows the phone as
    churn: tuple[float, float] | None  # (mean online s, mean offline s)
    cut: int | None = None  # SplitFed: the group's pinned cut instead of the planner's
    arm64: bool = False  # runs inside the emulated arm64 phone
    left_out: bool = False  # holds its shard of the split, never joins (PhoneGroup.left_out)


def fleet_phones(config: SimulationConfig) -> list[Phone]:
    """phone-1 … phone-N from the config's groups. A group's profile keeps its class name, or
    gets ``@cutN`` when the group pins a cut (so a class planned two ways is two profiles);
    ``engine`` other than "plan" narrows what the profile may run to that engine. An arm64
    group's profile gets ``@arm64`` and the engine its runtime has there, numpy."""
    phones: list[Phone] = []
    for group in config.phones:
        if group.phone_class:
            profile = catalog_profiles([group.phone_class])[0]
        elif group.profile is not None:
            profile = DeviceProfile.load(group.profile)
        else:  # the config requires one of the two
            raise InternalError(f"phone group {group} names neither a class nor a profile")
        if group.cut is not None:
            profile = profile.model_copy(update={"name": f"{profile.name}@cut{group.cut}"})
        if group.arch == "arm64":
            profile = profile.model_copy(update={"name": f"{profile.name}@arm64", "engines": ("numpy",)})
        elif group.engine != "plan":
            profile = profile.model_copy(update={"engines": (group.engine,)})
        ch = (group.churn_online_s, group.churn_offline_s) if group.churn_online_s else None
        for _ in range(group.count):
            phones.append(
                Phone(f"phone-{len(phones) + 1}", profile, ch, group.cut, group.arch == "arm64", group.left_out)
            )
    return phones


def phone_spec(
    config: SimulationConfig,
    phone: Phone,
    index: int,
    phone_dir: Path,
    fastest_gflops: float,
    t0: float,
    shape: LinkShape,
) -> PhoneSpec:
    """How ``phone`` is emulated: its compute slowed to its class's speed relative to the
    fastest, its memory capped, its link shaped, its offline windows and faults. An arm64
    phone's compute is its real emulated compute, unshaped and uncapped."""
    offline = churn(config.seed * 1000 + index, config.timeout_s, *phone.churn) if phone.churn else ()
    relative = config.compute == "relative" and not phone.arm64
    return PhoneSpec(
        phone_dir=str(phone_dir),
        device_id=phone.device_id,
        phone_class=phone.profile.name,
        compute_factor=round(fastest_gflops / phone.profile.gflops, 3) if relative else 1.0,
        memory_mb=phone.profile.memory_mb if config.memory_cap and not phone.arm64 else None,
        link=shape,
        offline=offline,
        t0=t0,
        duplicate_posts=any(f.kind == "duplicate_pushes" and f.phone == phone.device_id for f in config.faults),
    )


def link_windows(config: SimulationConfig, device_id: str, t0: float) -> tuple[LinkWindow, ...]:
    """The config's link faults that hit ``device_id`` (or every phone), in unix time."""
    return tuple(
        LinkWindow(t0 + f.after_s, t0 + f.after_s + f.duration_s, f.delay_ms, f.loss)
        for f in config.faults
        if f.kind == "link" and f.phone in (None, device_id)
    )


class PhoneProcess(ChildProcess):
    """An emulated phone on this host (``python -m android_harness.phone SPEC``), restartable."""

    def __init__(self, spec_path: Path, phone_dir: Path, prefix: list[str]):
        self.command = [*prefix, sys.executable, "-m", "android_harness.phone", str(spec_path)]
        self.phone_dir = phone_dir
        self.env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.starts = 0

    def start(self) -> None:
        with open(self.phone_dir / "phone.log", "ab") as log:
            self.proc = self._spawn(log)
        self.starts += 1

    def _spawn(self, log) -> subprocess.Popen:
        return subprocess.Popen(self.command, stdout=log, stderr=log, env=self.env, start_new_session=True)


class Arm64PhoneProcess(PhoneProcess):
    """A phone inside the emulated arm64 phone: device_runtime's own loop on its phone folder
    (``phone_path`` in the phone, ``phone_dir`` on this host), its compute the real emulated one."""

    def __init__(self, phone: Arm64Phone, phone_path: PurePosixPath, phone_dir: Path):
        self.phone, self.phone_dir, self.starts = phone, phone_dir, 0
        self.command = ["python3", "-m", "device_runtime.phone_loop", str(phone_path)]

    def _spawn(self, log) -> subprocess.Popen:
        return self.phone.start(self.command, stdout=log, stderr=log, start_new_session=True)
