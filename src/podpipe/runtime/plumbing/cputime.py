"""How much of a core a process wanted: the CPU time of all its threads plus the
time each of them was ready to run but waited for a core (`schedstat`, per
thread). A process waiting on I/O wants none; one waiting for a core is not taken
for one waiting on I/O, nor is one whose main thread waits for its own helper
threads, computing or waiting for a core themselves (a pyarrow `group_by` computes
on pyarrow's thread pool: on two shared cores its main thread sleeps while the
pool waits its turn). What `workers: auto` judges a node by (the conductor per
tick, an agent per task)."""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_OWN: dict[str, int] = {}  # this process's threads: thread id -> its schedstat, open


def _forget_own() -> None:
    for fd in _OWN.values():
        os.close(fd)
    _OWN.clear()


os.register_at_fork(after_in_child=_forget_own)  # a child's threads are its own


def wanted(pid: int | str = "self") -> float | None:
    """Seconds `pid` ran or waited to run, over all its threads; None if it is gone."""
    if pid == "self":
        return time.process_time() + _own_wait()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    ran = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime, all threads
    waited = 0.0
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                waited += int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or a kernel without schedstat
    return ran + waited


def ran_and_resident(pid: int) -> tuple[float, int] | None:
    """Seconds `pid` ran (all its threads) and its resident bytes, from one read of
    its `stat` (what a report samples: cheaper than `wanted`, which reads a file per
    thread); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[21]) * _PAGE


def _own_wait() -> float:
    """What this process's threads waited for a core: their schedstat files are kept
    open and read again in place (an agent asks twice a task: 10 µs, not 70)."""
    try:
        threads = set(os.listdir("/proc/self/task"))
    except OSError:
        return 0.0
    for tid in [t for t in _OWN if t not in threads]:
        os.close(_OWN.pop(tid))
    waited = 0
    for tid in threads:
        try:
            if tid not in _OWN:
                _OWN[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
            waited += int(os.pread(_OWN[tid], 64, 0).split()[1])
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile, or a kernel without schedstat
    return waited / 1e9


def cores() -> tuple[float, bool]:
    """The cores this process may use: its CPU affinity, and its cgroup's CPU quota (a
    container's CPU limit); whether a quota said so."""
    count = float(len(os.sched_getaffinity(0)))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            return min(count, int(quota) / int(period)), True
    except (OSError, ValueError):
        pass
    return count, False


GPUS_ENV = "CUDA_VISIBLE_DEVICES"


def gpus(stated: int | None) -> list[str]:
    """The pod's GPUs, as device names for CUDA_VISIBLE_DEVICES: the ones visible to
    this process (CUDA_VISIBLE_DEVICES, else the /dev/nvidiaN devices); `stated`
    (`spec.gpus`): that many — the first visible ones, or 0..N-1 when fewer are."""
    listed = os.environ.get(GPUS_ENV)
    if listed is not None:
        visible = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        try:
            visible = sorted((n[len("nvidia"):] for n in os.listdir("/dev")
                              if n.startswith("nvidia") and n[len("nvidia"):].isdigit()),
                             key=int)
        except OSError:
            visible = []
    if stated is None:
        return visible
    return visible[:stated] if len(visible) >= stated else [str(i) for i in range(stated)]
