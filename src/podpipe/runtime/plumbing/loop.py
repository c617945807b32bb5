"""Waiting on events: the one loop every podpipe process that waits is built on.

A process blocks in one `select` on everything that can happen to it: sockets and
pipes becoming readable, child processes exiting (a pidfd each), signals (a wakeup
fd, so a signal is an event like the others, not an exception in the middle of
work) and timers. Nothing polls with sleeps. Used by the conductor, a finished
pod's hold, the fork server and the process that watches local replicas.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable


@dataclass(frozen=True)
class Ready:
    """`fileobj` can be read (`tag`: what the caller registered it as)."""

    fileobj: Any
    tag: Any


@dataclass(frozen=True)
class ProcessExited:
    pid: int
    tag: Any


@dataclass(frozen=True)
class Signalled:
    signum: int


@dataclass(frozen=True)
class TimerDue:
    tag: Any


Happening = Ready | ProcessExited | Signalled | TimerDue


class EventLoop:
    """Registers what to wait for; `wait` returns what happened, in that order: exits
    after readable sockets (what a process said before dying counts first), then
    signals, then timers that are due."""

    def __init__(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._signals = tuple(signals)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("signal", None))
        self._old_fd: int | None = None
        self._old_handlers: dict[int, Any] = {}
        self._pidfds: dict[int, int] = {}  # pid -> pidfd
        self._gone: list[Happening] = []  # exits of processes gone before being watched
        self._timers: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()

    def __enter__(self) -> "EventLoop":
        """Catch the signals (as events) until the loop is closed."""
        self._old_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        self._old_handlers = {s: signal.signal(s, lambda *_: None) for s in self._signals}
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what to wait for -------------------------------------------------------

    def watch(self, fileobj: Any, tag: Any) -> None:
        self._sel.register(fileobj, selectors.EVENT_READ, ("ready", tag))

    def unwatch(self, fileobj: Any) -> None:
        try:
            self._sel.unregister(fileobj)
        except (KeyError, ValueError):
            pass  # not watched (any more)

    def watch_exit(self, pid: int, tag: Any) -> None:
        """Watch `pid` exit; one already gone (and reaped) is reported by the next
        `wait`."""
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._gone.append(ProcessExited(pid, tag))
            return
        self._pidfds[pid] = pidfd
        self._sel.register(pidfd, selectors.EVENT_READ, ("exit", (pid, tag)))

    def unwatch_exit(self, pid: int) -> None:
        pidfd = self._pidfds.pop(pid, None)
        if pidfd is not None:
            self._sel.unregister(pidfd)
            os.close(pidfd)

    def call_later(self, delay: float, tag: Any) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), tag))

    def cancel(self, tag: Any) -> None:
        """Drop the timers of `tag`."""
        self._timers = [t for t in self._timers if t[2] != tag]
        heapq.heapify(self._timers)

    # -- waiting ------------------------------------------------------------------

    def drain_ready(self) -> list[Ready]:
        """What can be read now, without waiting; exits, signals and timers stay
        pending for the next `wait`."""
        return [Ready(key.fileobj, key.data[1]) for key, _ in self._sel.select(0)
                if key.data[0] == "ready"]

    def wait(self, timeout: float | None) -> list[Happening]:
        """Block until something happens, or `timeout` seconds (None: no limit, but
        the next timer) pass."""
        if self._timers:
            due = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = due if timeout is None else min(timeout, due)
        exits, self._gone = self._gone, []
        if exits:
            timeout = 0.0
        readable: list[Happening] = []
        signals: list[Happening] = []
        for key, _ in self._sel.select(timeout):
            kind, tag = key.data
            if kind == "ready":
                readable.append(Ready(key.fileobj, tag))
            elif kind == "exit":
                pid, owner = tag
                self.unwatch_exit(pid)
                exits.append(ProcessExited(pid, owner))
            else:
                try:
                    signals += [Signalled(s) for s in self._wake_r.recv(64)]
                except BlockingIOError:
                    pass
        timers: list[Happening] = []
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            timers.append(TimerDue(heapq.heappop(self._timers)[2]))
        return readable + exits + signals + timers

    def close(self) -> None:
        for pid in list(self._pidfds):
            self.unwatch_exit(pid)
        self._sel.close()
        if self._old_fd is not None:
            signal.set_wakeup_fd(self._old_fd)
            self._old_fd = None
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}
        self._wake_r.close()
        self._wake_w.close()
