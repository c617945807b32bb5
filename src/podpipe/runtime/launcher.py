"""Starting stage processes: the local stand-in for a pod's containers.

The conductor asks a launcher for one process per node. `LocalLauncher` starts
`python -m podpipe agent`, the same entry point a container runs on Kubernetes,
with its output in the run's log directory. Each process dies with the conductor
(PR_SET_PDEATHSIG), so a killed conductor leaves no orphans.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


@dataclass
class Process:
    node: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid


class LocalLauncher:
    def __init__(self, spec_path: Path, overrides: list[str], socket_path: Path,
                 log_dir: Path, pod: str) -> None:
        self.spec_path, self.overrides = spec_path, overrides
        self.socket_path, self.log_dir, self.pod = socket_path, log_dir, pod

    def start(self, node: str) -> Process:
        log = self.log_dir / f"{node}.log"
        argv = [sys.executable, "-m", "podpipe", "agent", "--node", node,
                "--spec", str(self.spec_path), "--socket", str(self.socket_path)]
        for item in self.overrides:
            argv += ["--set", item]
        env = {**os.environ, "PODPIPE_POD": self.pod}
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        return Process(node, popen, log)
