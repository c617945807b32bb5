"""How much of a core a process wanted: the CPU time of all its threads plus the
time its main thread was ready to run but waited for a core (`/proc/PID/schedstat`).
A process waiting on I/O wants none; one waiting for a core is not taken for one
waiting on I/O, nor is one whose main thread waits for its own helper threads (a
pyarrow `group_by` computes on pyarrow's thread pool: its main thread alone used a
tenth of what the task did). What `workers: auto` judges a node by (the conductor
per tick, an agent per task)."""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")


def wanted(pid: int | str = "self") -> float | None:
    """Seconds `pid` ran (every thread) or its main thread waited to run; None if
    it is gone. Only the main thread's wait is read: a thread's is one file, and a
    stage's helpers wait for a core when its main thread does."""
    if pid == "self":
        ran = time.process_time()
    else:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        ran = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            waited = int(f.read().split()[1]) / 1e9
    except FileNotFoundError:
        if pid != "self" and not os.path.exists(f"/proc/{pid}"):
            return None
        waited = 0.0  # a kernel without schedstat: what it ran
    except (OSError, ValueError, IndexError):
        waited = 0.0
    return ran + waited
