"""The stage processes a conductor starts itself (locally, or `--layout processes`).

On Kubernetes with one container per node the kubelet starts them, and there is
no launcher: then this keeps nothing and starts nothing. A process replaced by a
swap, or stopped by an apply, is *retired*: its exit is expected, not an event.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from pathlib import Path

from podpipe.errors import RunError
from podpipe.runtime.plumbing import cputime, lifetime
from podpipe.runtime.plumbing.launching import Launcher, Process
from podpipe.runtime.rundir import status
from podpipe.runtime.plumbing.loop import EventLoop
from podpipe.runtime.plumbing.protocol import shadow_of, split_name


STOP_GRACE_SECONDS = 5.0
SPAWNED = "spawned"  # the loop's tag for `answers`


class Processes:
    def __init__(self, launcher: Launcher | None, loop: EventLoop, *,
                 reaper: bool = True) -> None:
        """`reaper`: this process is the run's alone (the CLI's), so it may adopt the
        orphans its stages leave (a subreaper) and end every child it has at the end;
        not when called from someone else's program (the Python API)."""
        self._launcher, self._loop, self.reaper = launcher, loop, reaper
        self._by_node: dict[str, Process] = {}  # by agent name (a node's worker)
        self._asked: set[str] = set()  # asked for (`begin`), not yet forked
        self._watching = False  # the launcher's answers, in the loop
        self._retired: set[int] = set()
        self._cpu: dict[int, float] = {}  # pid -> seconds wanted at the last sample
        self._sampled = time.monotonic()
        self._ran: dict[int, float] = {}  # pid -> seconds run at the last `usage`
        self._usage_at = time.monotonic()

    @property
    def local(self) -> bool:
        """Does this conductor start the stage processes (else the kubelet does)?"""
        return self._launcher is not None

    def expects(self, node: str) -> bool:
        return node in self._by_node or node in self._asked

    def begin(self, node: str, overrides: list[str] | None = None) -> None:
        """Ask for `node`'s process (a node's worker) without waiting for it: the run
        goes on meanwhile, and `settle` takes it in when the loop says the launcher
        answered (tag `SPAWNED`). The source's may be forked long before the others,
        which wait for the fork server's pandas."""
        assert self._launcher is not None
        if node in self._by_node or node in self._asked:
            return  # asked for early (`launcher.early`) and taken in already
        if not self._watching and self._launcher.answers is not None:
            self._loop.watch(self._launcher.answers, SPAWNED)
            self._watching = True
        self._launcher.ask(node, overrides or [])
        self._asked.add(node)
        self.settle()

    def settle(self) -> None:
        """Take in the processes asked for that have been forked since."""
        assert self._launcher is not None
        try:
            for process in self._launcher.answered():
                self._asked.discard(process.node)
                self._watch(process)
        except OSError as exc:
            raise RunError(f"cannot start the stages' processes: {exc}") from exc

    def start(self, node: str, overrides: list[str]) -> None:
        """Start `node`'s process with the pod's overrides and `overrides` after them
        (or take in the one asked for), and wait for it."""
        assert self._launcher is not None
        try:
            process = self._launcher.start(node, overrides)
        except OSError as exc:
            raise RunError(f"cannot start the process of stage {node!r}: {exc}") from exc
        self._asked.discard(node)
        self._watch(process)

    def _watch(self, process: Process) -> None:
        self._by_node[process.node] = process
        self._loop.watch_exit(process.pid, process.node)

    def _wait_asked(self) -> None:
        for node in sorted(self._asked):
            self.start(node, [])

    def serve(self, spec_path: Path, overrides: list[str], log_dir: Path) -> None:
        """Processes started from now on serve this spec (a standing line's next job)."""
        assert self._launcher is not None
        self._launcher.serve(spec_path, overrides, log_dir)

    def workers(self) -> dict[str, list[int]]:
        """Each node's processes, by worker number (those asked for included; not its
        candidate's, which the engine does not count)."""
        found: dict[str, list[int]] = {}
        for name in sorted(n for n in {*self._by_node, *self._asked} if not shadow_of(n)):
            node, worker = split_name(name)
            found.setdefault(node, []).append(worker)
        return found

    def exited(self, pid: int, node: str) -> int | None:
        """The exit code of `node`'s process `pid`; None if it was retired (expected).
        What it started and left behind is ended with it."""
        lifetime.kill_group(pid)
        process = self._by_node.get(node)
        if pid in self._retired or process is None or process.pid != pid:
            return None
        return process.wait()

    def retire(self, node: str, *, kill: bool) -> None:
        """`node`'s process goes for good: told to stop by the caller, or killed now
        (mid-batch: its output is never trusted)."""
        self._wait_asked()
        process = self._by_node.pop(node, None)
        if process is None or process.poll() is not None:
            return
        self._retired.add(process.pid)
        if kill:
            lifetime.kill_group(process.pid)

    def of(self, node: str) -> list[str]:
        """The names of `node`'s current processes (its workers')."""
        self._wait_asked()
        return [name for name in self._by_node if split_name(name)[0] == node]

    def usage(self) -> tuple[dict[str, float], dict[str, int]]:
        """Each process's cores since the last call (the time it ran) and its resident
        bytes, its pages of RAM scratch included (none for containers: their processes
        are not ours to read). One read a process: the conductor does it 4× a second."""
        now = time.monotonic()
        elapsed = max(1e-3, now - self._usage_at)
        cores: dict[str, float] = {}
        resident: dict[str, int] = {}
        ran: dict[int, float] = {}
        for name, process in self._by_node.items() if self.local else ():
            found = cputime.ran_and_resident(process.pid)
            if found is None:
                continue  # gone meanwhile
            ran[process.pid], resident[name] = found
            cores[name] = max(0.0, found[0] - self._ran.get(process.pid, found[0])) / elapsed
        self._ran, self._usage_at = ran, now
        return cores, resident

    @staticmethod
    def per_node(cpu: dict[str, float]) -> dict[str, float]:
        """Processes' cores, summed over each node's workers (not its candidate's)."""
        nodes: dict[str, float] = {}
        for name, cores in [(n, c) for n, c in cpu.items() if shadow_of(n) is None]:
            node = split_name(name)[0]
            nodes[node] = nodes.get(node, 0.0) + cores
        return nodes

    def cpu_use(self) -> dict[str, float]:
        """The cores each process (by agent name: `node` or `node.N`) wanted since the
        last call: the time it
        ran plus the time they were ready to run but waited for a core (one process
        busy all along: 1.0, whether it had a core to itself or shared one). A
        process that waits on I/O wants none; one that waits for a core is not
        taken for it."""
        now = time.monotonic()
        elapsed = max(1e-3, now - self._sampled)
        used: dict[str, float] = {}
        seen: dict[int, float] = {}
        for name, process in self._by_node.items():
            seconds = cputime.wanted(process.pid)
            if seconds is None:
                continue  # gone meanwhile
            seen[process.pid] = seconds
            used[name] = max(0.0, seconds - self._cpu.get(process.pid, seconds)) / elapsed
        self._cpu, self._sampled = seen, now
        return used

    def log(self, node: str) -> str | None:
        process = self._by_node.get(node)
        return str(process.log) if process is not None else None

    def infos(self, pod: str) -> list[status.ProcessInfo]:
        """Each current process, as the status lists it."""
        return [status.ProcessInfo("stage", split_name(name)[0], p.pid, pod,
                                   alive=p.returncode is None, worker=split_name(name)[1])
                for name, p in self._by_node.items()]

    def stop_all(self, terminate: bool, told: Iterable[str] = ()) -> None:
        """Wait for every process to end, killing those that will not within the
        grace period. SIGTERM first to all with `terminate`, else to those not `told`
        to stop: still starting, they would not hear of the end (a worker added as the
        run ended waited out the whole grace period)."""
        told = set(told)
        try:
            self._wait_asked()
        except RunError:
            pass  # the fork server is gone, and the processes it forked with it
        processes = list(self._by_node.values())
        for name, process in self._by_node.items():
            if terminate or name not in told:
                process.signal(signal.SIGTERM)
        lifetime.reap(processes, STOP_GRACE_SECONDS, lambda p, t: p.wait(t) is not None,
                      lambda p: p.signal(signal.SIGKILL))  # it would not stop
        for process in processes:
            lifetime.kill_group(process.pid)  # and what it started
        if self._launcher is not None:
            if self._watching:
                self._loop.unwatch(self._launcher.answers)
            self._launcher.close()
            if self.reaper:
                lifetime.end_children()  # orphans of the stages' children (a subreaper's)

