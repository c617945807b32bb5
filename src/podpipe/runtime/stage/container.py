"""A node's workers inside its one container: `podpipe agent --workers N`.

On Kubernetes each node is a container the kubelet starts, and the container stays
the unit of a swap (a new image); a node with `workers: N` runs its N agent
processes inside it. This process imports what they import, forks them (each its
worker number in `PODPIPE_WORKER`), starts again one that ends with an error, after
a backoff, as the kubelet restarts a container (the conductor redoes only that
worker's batch), and ends them all when the pod goes (SIGTERM). In a Job's pod
(`--restart`), whose containers the kubelet does not restart, a node's one worker
runs under it too; there the run's end (0, or 1 when it failed) ends the container.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any, Callable

from podpipe.engine.lifecycle import backoff
from podpipe.runtime.plumbing import lifetime, protocol
from podpipe.runtime.stage.forkserver import preload
from podpipe.runtime.plumbing.lifetime import die_with_parent


FINAL = (1, 2)  # a worker's exit codes that end the container: the run failed, bad input


def supervise(workers: int, serve: Callable[[], int]) -> int:
    """Run `serve` in `workers` processes until each has ended well or SIGTERM came;
    one that ends with a FINAL code ends the others, and the container with its code
    (a Job's pod fails with it)."""
    preload()
    children: dict[int, int] = {}  # pid -> worker
    failures = [0] * workers
    stopping, final = False, 0

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the conductor decides when we stop
    for worker in range(workers):
        children[_start(worker, serve)] = worker
    while children:
        pid, status = os.wait()
        worker, code = children.pop(pid), os.waitstatus_to_exitcode(status)
        if code in FINAL and not stopping:
            final = code
            stop()
        if code == 0 or stopping:
            continue
        failures[worker] += 1
        time.sleep(backoff(failures[worker]))  # as the conductor restarts a process
        if not stopping:
            children[_start(worker, serve)] = worker
    return final


def _start(worker: int, serve: Callable[[], int]) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid

    def worker_serves() -> int:
        die_with_parent()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.environ[protocol.WORKER_ENV] = str(worker)
        return serve()
    lifetime.child(worker_serves)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
