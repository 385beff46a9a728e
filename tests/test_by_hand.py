"""The README's "Deploy a fleet by hand", run line by line as a user would: every line of its
command block as a subprocess in an empty folder (the server's port swapped for a free one),
then checks that the mixed fleet it plans is what ran."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_runtime.codec import decode
from toolkit.aggregator.status import read_status
from toolkit.planning import load_plan

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- by-hand: the test runs every line of this block -->"
RUN_TIMEOUT_S = 300


def readme_commands() -> list[str]:
    text = README.read_text()
    block = text[text.index(MARKER) :]
    block = block[block.index("```bash\n") + len("```bash\n") :]
    body = block[: block.index("\n```")]
    return [re.sub(r"\s+#.*$", "", line).strip() for line in body.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_readme_fleet_path_runs_by_hand_with_a_mixed_fleet(tmp_path):
    port = str(free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    server = None
    try:
        for line in readme_commands():
            line = line.replace("8080", port)
            if line.endswith("&"):  # the server: started, then waited for
                with open(tmp_path / "serve.log", "wb") as log:  # the server writes to its own copy
                    server = subprocess.Popen(
                        line.removesuffix("&"),
                        shell=True,
                        cwd=tmp_path,
                        env=env,
                        start_new_session=True,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                wait_until_listening(int(port), server)
                continue
            if line.startswith("fedkit status"):
                wait_until_done(tmp_path / "run" / "aggregator.sqlite")
            done = subprocess.run(line, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr, line
            if line.startswith("fedkit export-global"):
                accuracy = float(re.search(r"test accuracy on 10,000 .*: ([\d.]+)%", done.stdout).group(1)) / 100
    finally:
        if server is not None:
            os.killpg(server.pid, 9)

    # Assert: the plan is mixed, as the README says
    plan = load_plan(tmp_path / "plan.json")
    n = len(plan.block_names)
    by = {p.profile: p for p in plan.phones}
    assert by["weak"].plan.cut == 19 < n  # SplitFed
    assert by["small"].plan.cut == n and by["small"].trainable_blocks == 1  # the classifier alone
    assert by["strong"].plan.cut == n and by["strong"].trainable_blocks == 2  # deeper
    # ... every phone reported every round, and nothing it was told was accepted is missing
    status = read_status(tmp_path / "run" / "aggregator.sqlite")
    assert status.done and {p.device_id: p.rounds for p in status.phones} == {d: [1, 2, 3] for d in by}
    for phone in by:
        log = (tmp_path / "phones" / phone / "phone.log").read_text()
        assert log.count("push accepted") == 3, log
    # ... each phone pushed in its plan's encoding, and downloaded what the plan predicted
    with sqlite3.connect(tmp_path / "run" / "aggregator.sqlite") as db:
        rows = db.execute("SELECT device_id, blob FROM updates").fetchall()
    for phone in ("small", "strong"):  # the SplitFed phone's stored update holds the edge's part too
        encodings = {e for device, blob in rows if device == phone for e in decode(blob).encodings.values()}
        assert encodings == {by[phone].plan.encoding}, phone
    for p in status.phones:
        predicted = by[p.device_id].plan.predicted["down_bytes"]
        assert abs(p.bytes_down / len(p.rounds) - predicted) < 1024, p
    # ... and the global model learned: chance is 10 %
    assert accuracy > 0.3


def wait_until_listening(port: int, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "fedkit serve exited at start"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("fedkit serve did not listen within 60 s")


def wait_until_done(db: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        if read_status(db).done:
            return
        time.sleep(1)
    raise AssertionError(f"the run was not done within {RUN_TIMEOUT_S} s")


def test_the_readme_block_is_found_and_names_every_link_of_the_path():
    commands = [line.split()[1] for line in readme_commands() if line.startswith("fedkit")]
    assert commands == [
        "profile",
        "profile",
        "profile",
        "profile",
        "plan",
        "export",
        "shards",
        "run-config",
        "enrol-token",
        "serve",
        "deploy",
        "status",
        "export-global",
    ]
