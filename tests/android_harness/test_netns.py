from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from android_harness.netns import NamespaceNetwork, NetnsError, available

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_phone_namespace_is_shaped_with_tbf_reachable_and_removed():
    with NamespaceNetwork() as network:
        net = network.add_phone(uplink_mbps=2.0, downlink_mbps=8.0, rtt_ms=40.0)
        shown = network.qdiscs(net)
        assert "tbf" in shown and "2Mbit" in shown and "8Mbit" in shown
        with socket.socket() as listener:  # the host end is reachable from inside the namespace
            listener.bind((net.host_ip, 0))
            listener.listen()
            code = f"import socket; socket.create_connection(({net.host_ip!r}, {listener.getsockname()[1]}), timeout=5)"
            assert subprocess.run([*net.command_prefix(), sys.executable, "-c", code], timeout=30).returncode == 0
        assert net.namespace in namespaces()
    assert net.namespace not in namespaces()
    assert subprocess.run(["ip", "link", "show", net.host_if], capture_output=True).returncode != 0


def test_close_removes_what_a_failed_setup_left():
    network = NamespaceNetwork()
    taken = f"fh{network.tag}0"  # the host end's name is taken: creating the veth pair fails
    subprocess.run(["ip", "link", "add", taken, "type", "veth", "peer", "name", f"fx{network.tag}0"], check=True)
    try:
        with pytest.raises(NetnsError, match="failed"):
            network.add_phone(1.0, 1.0)
        assert f"fk-{network.tag}-0" in namespaces()
    finally:
        network.close()
    assert f"fk-{network.tag}-0" not in namespaces()
    assert subprocess.run(["ip", "link", "show", taken], capture_output=True).returncode != 0


def test_available_is_none_as_root():
    assert available() is None
