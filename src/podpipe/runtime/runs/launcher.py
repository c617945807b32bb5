"""Starting stage processes: the local stand-in for a pod's containers.

The conductor asks a launcher for one process per node and gets a `Process` it can
watch (pidfd), wait for, terminate and kill. Two launchers of the conductor's
interface (`plumbing.launching.Launcher`):

- `ForkLauncher` (the default): a fork server imports pyarrow once and forks every
  stage process from it, so a pod of N stages does not pay N interpreter starts;
  `warm` starts the server before the run is known.
- `SpawnLauncher`: runs `python -m podpipe agent ...`, the very command a
  container runs on Kubernetes (`PODPIPE_LAUNCHER=spawn`).

Both run `agent.serve`, log to `RUN_DIR/logs/NODE.log`, and tie each process's life
to the conductor's (PR_SET_PDEATHSIG), so a killed conductor leaves no orphans.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from podpipe.runtime.plumbing.launching import Launcher, Process
from podpipe.runtime.plumbing import files, lifetime, logline, protocol
from podpipe.runtime.plumbing.lifetime import die_with_parent


@dataclass
class _Where:
    spec_path: Path
    overrides: list[str]
    socket_path: Path
    log_dir: Path
    pod: str

    def __post_init__(self) -> None:
        # RUN_ENV marks every process the run's stages start, children too: a resume
        # ends those a killed conductor left (`lifetime.end_leftovers`). A standing
        # line's processes stay the line's whatever job they serve.
        self.home = str(self.log_dir.parent.resolve())

    def env(self, worker: int = 0) -> dict[str, str]:
        return {"PODPIPE_POD": self.pod, protocol.WORKER_ENV: str(worker),
                lifetime.RUN_ENV: self.home, **logline.settings()}

    def serve(self, spec_path: Path, overrides: list[str], log_dir: Path) -> None:
        """Start processes for another spec from now on (a standing line's next job)."""
        self.spec_path, self.overrides, self.log_dir = spec_path, overrides, log_dir


class SpawnLauncher:
    def __init__(self, where: _Where) -> None:
        self.where = where
        self.popens: dict[int, subprocess.Popen[bytes]] = {}
        self.spawned: list[Process] = []  # asked for, not yet taken

    def early(self, name: str) -> None:
        """Nothing to gain: each process imports for itself (`ForkLauncher.early`)."""

    def serve(self, spec_path: Path, overrides: list[str], log_dir: Path) -> None:
        self.where.serve(spec_path, overrides, log_dir)

    def ask(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> None:
        """Start it now (a process of its own needs no answer): `answered` has it."""
        self.spawned.append(self.start(name, overrides))

    answers = None  # nothing to watch: `ask` starts at once

    def answered(self) -> list[Process]:
        spawned, self.spawned = self.spawned, []
        return spawned

    def start(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> Process:
        """Start the agent `name` (a node's worker, `protocol.agent_name`); `overrides`:
        its node's own, after the pod's (a swapped-in version)."""
        w = self.where
        node, worker = protocol.split_name(name)
        log = w.log_dir / f"{name}.log"
        argv = [sys.executable, "-m", "podpipe", "agent", "--stage", node,
                "--spec", str(w.spec_path), "--socket", str(w.socket_path)]
        for item in [*w.overrides, *overrides]:
            argv += ["--set", item]
        with open(files.append_private(log), "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     env={**os.environ, **w.env(worker)},
                                     start_new_session=True, preexec_fn=die_with_parent)
        self.popens[popen.pid] = popen
        return Process(name, popen.pid, log, self)

    def poll(self, process: Process) -> int | None:
        return self.popens[process.pid].poll()

    def wait(self, process: Process, timeout: float | None) -> int | None:
        try:
            return self.popens[process.pid].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        pass


class ForkServer:
    """A fork server process (`runtime.forkserver`), which knows nothing of a run until
    a `ForkLauncher` takes it. `podpipe run` starts one first thing (`warm`), so that
    it imports pyarrow while the spec is read and the run planned."""

    def __init__(self, *, fork: bool = False) -> None:
        """`fork`: fork this process rather than start an interpreter (0.05-0.1 s
        sooner); only while it is one thread that has imported next to nothing."""
        self.sock, theirs = socket.socketpair()
        self.forked = fork
        if fork:
            self.pid = _forked(theirs.detach(), self.sock)
            self._popen = None
        else:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "podpipe.runtime.stage.forkserver", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=die_with_parent)
            self.pid = self._popen.pid
            theirs.close()
        self.taken = False
        self.closed = False

    def close(self) -> None:
        """End it (its children end with it); at once if no run took it."""
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if not self.taken:
            os.kill(self.pid, signal.SIGKILL)
        if self._popen is not None:
            try:
                self._popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
            return
        try:
            exited = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already reaped (by the conductor, a subreaper)
            return
        try:
            if not select.select([exited], [], [], 5)[0]:
                os.kill(self.pid, signal.SIGKILL)
        finally:
            os.close(exited)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _forked(theirs: int, ours: socket.socket) -> int:
    """Fork the fork server from this process; its pid."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(theirs)
        return pid

    def server_serves() -> int:
        ours.close()
        os.setsid()  # as a started process: Ctrl-C at the terminal is the conductor's
        die_with_parent()
        if os.getppid() != parent:
            return 1
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        from podpipe.runtime.stage import forkserver

        return forkserver.serve(theirs)
    lifetime.child(server_serves)


def warm() -> ForkServer | None:
    """A fork server for the run this process (the CLI, just started) is about to
    make: forked if this process is one thread (else started); None if its
    processes are spawned (`PODPIPE_LAUNCHER=spawn`)."""
    import threading

    if os.environ.get("PODPIPE_LAUNCHER", "fork") == "spawn":
        return None
    return ForkServer(fork=threading.active_count() == 1)


class ForkLauncher:
    def __init__(self, where: _Where, server: ForkServer | None = None) -> None:
        self.where = where
        self.server = server or ForkServer()
        self.server.taken = True
        self.sock = self.server.sock
        protocol.send(self.sock, protocol.LogTo(path=str(where.log_dir / "forkserver.log")))
        self.reader = protocol.Reader()
        self.pending: list[protocol.Message] = []
        self.exits: dict[int, int] = {}
        self.asked: set[str] = set()  # spawns not yet answered
        self.spawned: dict[str, Process] = {}  # answered, not yet taken
        self.gone = False  # the server closed its end

    def serve(self, spec_path: Path, overrides: list[str], log_dir: Path) -> None:
        """Processes started from now on serve this spec and log there (a standing
        line's next job; the fork server's own log stays where it is)."""
        self.where.serve(spec_path, overrides, log_dir)

    def early(self, name: str) -> None:
        """Ask for the agent `name` now, before the run is planned: the fork server
        forks it as soon as it has imported what every stage needs, before pandas
        (the source's agent needs no more)."""
        self.ask(name, (), early=True)

    def ask(self, name: str, overrides: tuple[str, ...] | list[str] = (),
            early: bool = False) -> None:
        """Ask for the agent `name` (unless asked already) without waiting for it:
        `answered` or `start` takes it."""
        if name in self.asked or name in self.spawned:
            return
        w = self.where
        node, worker = protocol.split_name(name)
        protocol.send(self.sock, protocol.Spawn(
            node=node, spec=str(w.spec_path), overrides=[*w.overrides, *overrides],
            socket=str(w.socket_path), env=w.env(worker), log=str(w.log_dir / f"{name}.log"),
            cwd=os.getcwd(), name=name, early=early))
        self.asked.add(name)

    @property
    def answers(self) -> socket.socket:
        """What to watch for `answered` to have something."""
        return self.sock

    def answered(self) -> list[Process]:
        """The processes asked for that the server has forked since, without waiting."""
        while self._next(0.0) is not None:
            pass
        if self.gone:
            raise self._gone()
        spawned, self.spawned = list(self.spawned.values()), {}
        return spawned

    def start(self, name: str, overrides: tuple[str, ...] | list[str] = ()) -> Process:
        """As `SpawnLauncher.start`, forked from the warm server (or the one asked for
        already)."""
        self.ask(name, overrides)
        while name not in self.spawned:
            if self._next(None) is None:
                raise self._gone()
        return self.spawned.pop(name)

    def poll(self, process: Process) -> int | None:
        while process.pid not in self.exits and self._next(0.0) is not None:
            pass
        return self.exits.get(process.pid)

    def wait(self, process: Process, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while process.pid not in self.exits:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._next(left) is None:
                break
        return self.exits.get(process.pid)

    def _gone(self) -> OSError:
        return OSError(f"the fork server exited; see its log, "
                       f"{self.where.log_dir / 'forkserver.log'}")

    def _next(self, timeout: float | None) -> protocol.Message | None:
        """The next message from the server (recording exits and the processes forked,
        each answer named); None on timeout or EOF (`gone`)."""
        while not self.pending:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
            data = self.sock.recv(1 << 16)
            if not data:
                self.gone = True
                return None
            self.pending.extend(self.reader.feed(data))
        message = self.pending.pop(0)
        if isinstance(message, protocol.Exited):
            self.exits[message.pid] = message.code
        elif isinstance(message, protocol.Spawned):
            self.asked.discard(message.name)
            self.spawned[message.name] = Process(
                message.name, message.pid, self.where.log_dir / f"{message.name}.log", self)
        return message

    def close(self) -> None:
        self.server.close()



def launcher(spec_path: Path, overrides: list[str], socket_path: Path, log_dir: Path,
             pod: str, server: ForkServer | None = None) -> Launcher:
    """The launcher of a pod's processes; `server`: a fork server already started
    (`warm`), else the fork launcher starts one."""
    where = _Where(spec_path, overrides, socket_path, log_dir, pod)
    kind = os.environ.get("PODPIPE_LAUNCHER", "fork")
    return SpawnLauncher(where) if kind == "spawn" else ForkLauncher(where, server)

