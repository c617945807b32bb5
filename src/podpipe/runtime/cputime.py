"""How much of a core a process wanted: the time it ran plus the time it was ready
to run but waited for a core (`/proc/PID/schedstat`). A process waiting on I/O
wants none; one waiting for a core is not taken for one waiting on I/O. What
`workers: auto` judges a node by (the conductor per tick, an agent per task)."""

from __future__ import annotations

import os


def wanted(pid: int | str = "self") -> float | None:
    """Seconds `pid` has run or waited to run (on a kernel without schedstat: its CPU
    time, from `/proc/PID/stat`); None if it is gone."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ran, waited, _ = f.read().split()
        return (int(ran) + int(waited)) / 1e9
    except FileNotFoundError:
        if not os.path.exists(f"/proc/{pid}"):
            return None
    except (OSError, ValueError):
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
