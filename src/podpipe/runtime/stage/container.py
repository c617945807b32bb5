"""A node's workers inside its one container: `podpipe agent --workers N`.

On Kubernetes each node is a container the kubelet starts, and the container stays
the unit of a swap (a new image); a node with `workers: N` runs its N agent
processes inside it. This process imports what they import, forks them (each its
worker number in `PODPIPE_WORKER`), starts again one that ends with an error, after
a backoff, as the kubelet restarts a container (the conductor redoes only that
worker's batch), and ends them all when the pod goes (SIGTERM). In a Job's pod
(`--restart`), whose containers the kubelet does not restart, a node's one worker
runs under it too; there the run's end (0, or 1 when it failed) ends the container.
A `workers: auto` node's container (`--workers auto`) starts with one worker and
starts or ends more as the conductor asks (`Auto`), up to its CPU limit's worth.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from podpipe.engine.lifecycle import backoff
from podpipe.engine.workers import MOST_PER_CPU
from podpipe.model import spec as specs
from podpipe.runtime.plumbing import cputime, lifetime, logline, protocol, sockets
from podpipe.runtime.stage.forkserver import preload
from podpipe.runtime.plumbing.lifetime import die_with_parent


FINAL = (1, 2)  # a worker's exit codes that end the container: the run failed, bad input


@dataclass
class Auto:
    """A `workers: auto` node's container: its connection to the conductor, which
    asks for workers (`Fork`) and takes them back (`Shrink`), and the most it may run
    (its CPU limit's `MOST_PER_CPU` per core, as auto allows a node locally)."""

    node: str
    socket_path: str
    most: int
    wait: float = 60.0

    @classmethod
    def of(cls, spec_path: str, overrides: list[str], node: str, socket_path: str,
           wait: float) -> Auto:
        """Its most: `MOST_PER_CPU` workers per core of the container's CPU limit (its
        cgroup's quota; without one, the spec's `cpus`, else CONTAINER_CPUS: what
        render set the limit to)."""
        cores, limited = cputime.cores()
        if not limited:
            cores = specs.load(spec_path, overrides).container_cpus
        return cls(node, socket_path, max(1, int(MOST_PER_CPU * cores)), wait)

    def connect(self) -> socket.socket | None:
        try:
            sock = sockets.connect(self.socket_path, self.wait)
            protocol.send(sock, protocol.Supervising(node=self.node, most=self.most))
            return sock
        except OSError as exc:
            sys.stderr.write(logline.line(f"auto workers: cannot reach the conductor: {exc}",
                                          "warning"))
            return None


def supervise(workers: int, serve: Callable[[], int], auto: Auto | None = None) -> int:
    """Run `serve` in `workers` processes until each has ended well or SIGTERM came;
    one that ends with a FINAL code ends the others, and the container with its code
    (a Job's pod fails with it). With `auto`, the conductor starts more of them and
    takes them back."""
    preload()
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, worker)
    failures: dict[int, int] = {}
    ending: set[int] = set()  # workers taken back: not started again
    stopping, final = False, 0

    def start(worker: int) -> None:
        if stopping:  # (the conductor may ask for a worker as SIGTERM comes)
            return
        pid = _start(worker, serve)
        children[os.pidfd_open(pid)] = (pid, worker)
        if stopping:  # SIGTERM came as it was forked: `stop` did not see it
            _signal(pid, signal.SIGTERM)

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True
        for pid, _worker in children.values():
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the conductor decides when we stop
    for worker in range(workers):
        start(worker)
    control = auto.connect() if auto is not None else None
    while children:
        watched: list[Any] = [*children, *([control] if control else [])]
        for fd in select.select(watched, [], [])[0]:
            if isinstance(fd, socket.socket):  # (the conductor's connection)
                assert auto is not None
                control = _asked(fd, auto, children, ending, start)
                continue
            pid, worker = children.pop(fd)
            os.close(fd)
            code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            if code in FINAL and not stopping:
                final = code
                stop()
            if code == 0 or stopping or worker in ending:
                continue
            failures[worker] = failures.get(worker, 0) + 1
            time.sleep(backoff(failures[worker]))  # as the conductor restarts a process
            if not stopping:
                start(worker)
    return final


def _asked(control: socket.socket, auto: Auto, children: dict[int, tuple[int, int]],
           ending: set[int], start: Callable[[int], None]) -> socket.socket | None:
    """What the conductor asks of an auto container: a worker more, or one less. None
    once it has gone (a restarted conductor's workers reconnect; this connects again
    only when asked to grow: it is not)."""
    try:
        message = protocol.recv(control)
    except (protocol.Closed, OSError):
        control.close()
        return None
    running = {worker for _pid, worker in children.values()}
    if isinstance(message, protocol.Fork) and message.worker not in running \
            and len(running) < auto.most:
        ending.discard(message.worker)
        start(message.worker)
    elif isinstance(message, protocol.Shrink):
        ending.add(message.worker)
        for pid, worker in children.values():
            if worker == message.worker:
                _signal(pid, signal.SIGTERM)
    return control


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
