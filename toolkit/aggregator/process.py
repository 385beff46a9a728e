"""The aggregator as a child process (``python -m toolkit.aggregator.server``) on a run's config
and database: what ``fedkit simulate``, the B3 benchmark and the recovery tests start, kill with
SIGKILL mid-round and start again on the same database."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from toolkit.aggregator.admin import issue_tokens
from toolkit.aggregator.store import Store
from toolkit.child import ChildProcess
from toolkit.errors import ConfigError

HEALTH_TIMEOUT_S = 60.0


class AggregatorProcess(ChildProcess):
    """One aggregator process at a time on ``db``; ``kill()`` then ``start()`` resumes the run.
    Without a ``port``, the first start binds port 0 (no free port guessed here, which another
    process could take before the server binds it); a restart binds the port it got again, so
    phones keep their URL. The server writes its port to ``port_file`` once it accepts
    connections: that, not a connection that anything on the port would accept, says it is up."""

    def __init__(
        self,
        config: str | Path,
        db: str | Path,
        log: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
    ):
        self.db, self.log, self.port = Path(db), Path(log), port
        self.port_file = self.log.with_name(self.log.name + ".port")
        self._args = ["--config", str(config), "--db", str(db), "--host", host, *extra_args]

    @property
    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "toolkit.aggregator.server",
            *self._args,
            "--port",
            str(self.port or 0),
            "--port-file",
            str(self.port_file),
        ]

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the aggregator's port is known once it has started: call start() first")
        return f"http://127.0.0.1:{self.port}"

    def issue_tokens(self, count: int, role: str = "enrol") -> list[str]:
        """Tokens written straight to the database (the server need not be running)."""
        store = Store(self.db)
        try:
            return issue_tokens(store, count, role)
        finally:
            store.close()

    def start(self) -> float:
        """Starts the process and returns the seconds until it accepts connections (uvicorn
        listens only once the app has started: database open, round open; TLS or not)."""
        t0 = time.perf_counter()
        self.port_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            # its own session: a Ctrl-C meant for the parent must not kill it out of turn
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=log, start_new_session=True)
        while time.perf_counter() - t0 < HEALTH_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise ConfigError(f"the aggregator exited with code {self.proc.returncode} at start; see {self.log}")
            if self.port_file.is_file():
                self.port = int(self.port_file.read_text())
                return time.perf_counter() - t0
            time.sleep(0.02)
        self.kill()
        raise ConfigError(f"the aggregator did not listen within {HEALTH_TIMEOUT_S:.0f} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def peak_rss_mb(self) -> float:
        """VmHWM of the running process (ru_maxrss is inherited across exec, so it is not used)."""
        if self.proc is None:
            raise RuntimeError("the aggregator has not been started: call start() first")
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc: peak memory is measured on Linux only")
