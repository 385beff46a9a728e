"""A child process that a fault, or a test, may kill with SIGKILL: no clean-up, as a crash or a
power cut would leave it."""

from __future__ import annotations

import signal
import subprocess


class ChildProcess:
    proc: subprocess.Popen | None = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
