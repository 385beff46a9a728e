"""Real network shaping for emulated phones (root only): one network namespace per phone,
joined to the host by a veth pair, with tc qdiscs on both ends.

    host  fh<tag><i> 10.231.K.(4i+1)/30  ◄── veth ──►  fp<tag><i> 10.231.K.(4i+2)/30  in netns fk-<tag>-<i>
          egress: tbf at the downlink rate                 egress: tbf at the uplink rate
          (+ netem delay RTT/2 and loss, when the kernel has netem)

The addresses are private and live only on the veth pairs this module creates; every name
carries a per-run tag, and ``close`` deletes all of it (the namespace takes its veth end, and
the pair goes with it). When the kernel lacks netem (``sch_netem``), ``netem_available`` says
so and the caller applies delay and loss in-process instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from device_runtime.errors import FedkitError

SUBNET = "10.231"


class NetnsError(FedkitError):
    """Network namespaces or tc could not be set up."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(
            f"`{' '.join(cmd)}` failed: {proc.stderr.strip() or proc.stdout.strip()}; "
            "run as root with iproute2 installed"
        )
    return proc


def available() -> str | None:
    """None when namespaces can be used here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (run as root, or drop --netem)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed: apt-get install iproute2"
    return None


def netem_available() -> bool:
    """Whether the kernel has the netem qdisc; tried on the loopback of a scratch namespace."""
    name = f"fk-probe-{os.getpid()}"
    if _run("ip", "netns", "add", name, check=False).returncode != 0:
        return False
    try:
        return (
            _run(
                "ip",
                "netns",
                "exec",
                name,
                "tc",
                "qdisc",
                "add",
                "dev",
                "lo",
                "root",
                "netem",
                "delay",
                "1ms",
                check=False,
            ).returncode
            == 0
        )
    finally:
        _run("ip", "netns", "del", name, check=False)


@dataclass(frozen=True)
class PhoneNet:
    namespace: str
    host_if: str
    host_ip: str  # the aggregator's address as this phone sees it
    phone_ip: str

    def command_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.namespace]


class NamespaceNetwork:
    """The namespaces of one run; use as a context manager so they are always removed."""

    def __init__(self, netem: bool | None = None):
        why = available()
        if why:
            raise NetnsError(why)
        self.tag = f"{os.getpid():x}"[-5:]
        self.octet = os.getpid() % 250
        self.netem = netem_available() if netem is None else netem
        self.phones: list[PhoneNet] = []

    def add_phone(self, uplink_mbps: float, downlink_mbps: float, rtt_ms: float = 0.0, loss: float = 0.0) -> PhoneNet:
        i = len(self.phones)
        if i >= 63:
            raise NetnsError("at most 63 phones per run fit the namespace subnet")
        net = PhoneNet(
            f"fk-{self.tag}-{i}",
            f"fh{self.tag}{i}",
            f"{SUBNET}.{self.octet}.{4 * i + 1}",
            f"{SUBNET}.{self.octet}.{4 * i + 2}",
        )
        peer = f"fp{self.tag}{i}"
        self.phones.append(net)  # before creating anything: close() removes what exists
        ns = ["ip", "netns", "exec", net.namespace]
        _run("ip", "netns", "add", net.namespace)
        _run("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", net.namespace)
        _run("ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if)
        _run("ip", "link", "set", net.host_if, "up")
        _run(*ns, "ip", "addr", "add", f"{net.phone_ip}/30", "dev", peer)
        _run(*ns, "ip", "link", "set", peer, "up")
        _run(*ns, "ip", "link", "set", "lo", "up")
        self._shape([], net.host_if, downlink_mbps, rtt_ms, loss)
        self._shape(ns, peer, uplink_mbps, rtt_ms, loss)
        return net

    def _shape(self, prefix: list[str], dev: str, mbps: float, rtt_ms: float, loss: float) -> None:
        rate = f"{max(mbps, 0.01):.3f}mbit"
        burst = f"{max(32, int(mbps * 1e6 / 8 / 100 / 1024))}kb"  # at least one 10 ms tick at the rate
        tbf = ["tbf", "rate", rate, "burst", burst, "latency", "400ms"]
        if self.netem and (rtt_ms > 0 or loss > 0):
            _run(
                *prefix,
                "tc",
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "handle",
                "1:",
                "netem",
                "delay",
                f"{rtt_ms / 2:.1f}ms",
                "loss",
                f"{loss * 100:.2f}%",
            )
            _run(*prefix, "tc", "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", *tbf)
        else:
            _run(*prefix, "tc", "qdisc", "add", "dev", dev, "root", *tbf)

    def qdiscs(self, net: PhoneNet) -> str:
        """`tc qdisc show` of both ends, for the report."""
        host = _run("tc", "qdisc", "show", "dev", net.host_if).stdout
        phone = _run(*net.command_prefix(), "tc", "qdisc", "show").stdout
        return host + phone

    def close(self) -> None:
        for net in self.phones:
            _run("ip", "netns", "del", net.namespace, check=False)
            _run("ip", "link", "del", net.host_if, check=False)
        self.phones = []

    def __enter__(self) -> NamespaceNetwork:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
