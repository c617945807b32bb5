"""A pre-warmed process that forks stage processes on request.

Importing pyarrow costs a third of a second of CPU per process; a pod of six stage
processes on two cores would spend over a second just starting. The fork server
imports everything once, then forks each stage process, which runs exactly what
`podpipe agent` runs (agent.serve). It reaps its children and reports their exit
codes. Each child dies with the server, and the server with the conductor
(PR_SET_PDEATHSIG), so no process outlives the pod.

It knows nothing of a run until told: `podpipe run` starts it before reading the
spec, so its imports overlap the conductor's own start, and it writes to the
caller's stderr until `LogTo` names its log in the run directory.

Wire (`protocol` over a socketpair): the conductor sends `LogTo` once, then `Spawn`
(each child starts in the `cwd` it names); the server answers `Spawned` (with
the name the spawn gave) and, when a child ends, `Exited`. A spawn marked `early` that comes
while the server imports (the source's, sent before the run is planned) is forked
before pandas is imported, which the source never needs.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys
from pathlib import Path

from podpipe.runtime.plumbing import files, lifetime, protocol
from podpipe.runtime.plumbing.lifetime import die_with_parent
from podpipe.runtime.plumbing.loop import EventLoop, Ready

PRELOAD = ("pyarrow", "pyarrow.compute", "pyarrow.parquet", "fsspec", "yaml", "xxhash",
           "podpipe.runtime.stage.agent", "podpipe.runtime.data.source", "podpipe.runtime.data.sink")
# pyarrow imports pandas, when installed, the first time it converts Python objects:
# nearly every stage module does that, so it is worth importing once here.
OPTIONAL = ("pandas",)


def preload(optional: bool = True) -> None:
    """Import what every stage process imports, before forking them; with
    `optional`, what most do too (pandas)."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in OPTIONAL if optional else ():
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def serve(fd: int) -> int:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    preload(optional=False)
    conductor = socket.socket(fileno=fd)
    reader = protocol.Reader()
    with EventLoop(signals=(signal.SIGCHLD,)) as loop:
        loop.watch(conductor, "conductor")
        # What came while importing: an early spawn (the source) is forked now, the
        # rest once pandas is in too (each answer names its spawn).
        later: list[protocol.Message] = []
        conductor.setblocking(False)
        try:
            while data := conductor.recv(1 << 16):
                later.extend(reader.feed(data))
        except BlockingIOError:
            pass
        conductor.setblocking(True)
        for message in later:
            if not isinstance(message, protocol.Spawn) or message.early:
                _answer(message, conductor, loop)
        preload()
        for message in later:
            if isinstance(message, protocol.Spawn) and not message.early:
                _answer(message, conductor, loop)
        while True:
            for happening in loop.wait(None):
                if not isinstance(happening, Ready):
                    continue  # a child ended: reaped below
                data = conductor.recv(1 << 16)
                if not data:
                    return 0  # the conductor is gone; our children follow us
                for message in reader.feed(data):
                    _answer(message, conductor, loop)
            _reap(conductor)


def _answer(message: protocol.Message, conductor: socket.socket, loop: EventLoop) -> None:
    if isinstance(message, protocol.LogTo):
        _log_to(message.path)
    elif isinstance(message, protocol.Spawn):
        pid = _spawn(message, conductor.fileno(), loop)
        protocol.send(conductor, protocol.Spawned(pid=pid, name=message.name))


def _reap(conductor: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        protocol.send(conductor, protocol.Exited(pid=pid,
                                                 code=os.waitstatus_to_exitcode(status)))


def _log_to(path: str) -> None:
    log = files.append_private(Path(path))
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _spawn(message: protocol.Spawn, conductor: int, loop: EventLoop) -> int:
    log = files.append_private(Path(message.log))
    # What the server imported is never collected in a stage process: a collection
    # there would walk it, writing to the pages it shares with the server (and
    # paying their copy) for objects that live as long as the process anyway.
    gc.freeze()
    pid = os.fork()
    if pid:
        os.close(log)
        return pid

    def agent_serves() -> int:
        os.setsid()
        die_with_parent()
        loop.close()  # the child's own signals are its own
        os.close(conductor)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.environ.update(message.env)
        os.chdir(message.cwd)
        if protocol.shadow_of(message.node):  # a stage's candidate (`podpipe shadow`)
            from podpipe.runtime.stage import shadow

            return shadow.serve(message.spec, message.overrides, message.node,
                                message.socket)
        from podpipe.runtime.stage import agent

        return agent.serve(message.spec, message.overrides, message.node, message.socket)
    lifetime.child(agent_serves)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
    os._exit(0)
