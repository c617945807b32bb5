"""The seam between whoever runs a pod's processes and what starts them.

The conductor asks a `Launcher` for one process per agent (a node's worker) and
gets a `Process` it can watch, wait for and signal. The launchers are in
`runs.launcher` (a fork server, or `python -m podpipe agent`); tests use a fake.
Light on purpose: `podpipe run` imports it before it forks its fork server.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Launcher(Protocol):
    """What starts a pod's stage processes: the seam between the conductor and the
    fork server or `python -m podpipe agent` (`runs.launcher`); tests use a fake."""

    @property
    def answers(self) -> socket.socket | None:
        """What to watch for `answered` to have something (None: `ask` starts at once)."""

    def early(self, name: str) -> None:
        """Ask for `name` before the run is planned, as soon as it can be started."""

    def serve(self, spec_path: Path, overrides: list[str], log_dir: Path) -> None:
        """Processes started from now on serve this spec and log to `log_dir` (a
        standing line's next job)."""

    def ask(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> None:
        """Start the agent `name` (a node's worker) soon: `answered` will have it."""

    def answered(self) -> list[Process]:
        """The processes asked for that have started since, without waiting."""

    def start(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> Process:
        """Start the agent `name` now; `overrides`: its node's own, after the pod's."""

    def poll(self, process: Process) -> int | None: ...

    def wait(self, process: Process, timeout: float | None) -> int | None: ...

    def close(self) -> None: ...


@dataclass
class Process:
    """A stage process a launcher started, watched through its launcher."""

    node: str
    pid: int
    log: Path
    launcher: Launcher = field(repr=False)
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.poll(self)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if it is still running after `timeout` seconds."""
        if self.returncode is None:
            self.returncode = self.launcher.wait(self, timeout)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass
