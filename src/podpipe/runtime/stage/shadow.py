"""A stage's candidate version, run beside the live one (`podpipe shadow`).

The conductor starts it as the process `STAGE@shadow` with the candidate's overrides;
it sets the stage up as a stage's process would (`agent.Setup`), says hello, and then
takes only what the conductor offers it: a batch the live version has made, with the
batch's inputs and the live output as open files (`protocol.ShadowTask`, SCM_RIGHTS:
nothing the run deletes meanwhile is lost, nothing is recycled under it). It computes
the batch, compares its table with the live one (`data.compare`) and answers
`Compared`; its output goes nowhere. It runs at the lowest priority
(`_lowest_priority`): the line's processes have the cores first. A failure is answered as a batch's
(`Failed`); the conductor times it out and restarts it, and the run never waits for
it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from podpipe.errors import InputError, SpecError
from podpipe.runtime.data import arrowfile
from podpipe.runtime.data.compare import compare
from podpipe.runtime.plumbing import logline, protocol, sockets
from podpipe.runtime.plumbing.lifetime import RUN_ENV
from podpipe.runtime.stage.agent import AGAIN, Setup, user_frames
from podpipe.runtime.stage.work import SetupFailed, Work

NICENESS = 19  # below the line's processes


def _lowest_priority() -> None:
    """Run only as the line leaves the cores: the idle scheduling class, and the
    lowest weight for this process's autogroup — a process that starts a session
    (as every stage process does) is a group of its own, which the kernel shares the
    cores among as equals whatever its processes' nice values."""
    os.nice(NICENESS)
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # (not Linux: nice alone)
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write(str(NICENESS))
    except OSError:
        pass  # no autogroups here: nice counts among all processes


def serve(spec_path: str, overrides: list[str], name: str, socket_path: str, *,
          wait: float = 0.0) -> int:
    """The candidate's main loop (`name`: `protocol.shadow_name` of its stage); returns
    the process exit code: 0 told to stop, 2 its spec or code is wrong, 3 its setup
    raised, AGAIN the conductor went away."""
    node = protocol.shadow_of(name)
    assert node is not None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lowest_priority()
    run = os.environ.get(RUN_ENV)
    logline.speaking_for(run=Path(run).name if run else None, stage=name)
    sys.path.insert(0, os.getcwd())
    try:
        sock = sockets.connect(socket_path, wait)
    except OSError as exc:
        sys.stderr.write(logline.line(f"cannot reach the conductor: {exc}", "error"))
        return AGAIN
    try:
        setup = Setup.of(spec_path, overrides, node)
    except (SpecError, InputError) as exc:
        protocol.send(sock, protocol.Broken(node=name, message=str(exc)))
        return 2
    except SetupFailed as exc:
        sys.stderr.write(logline.line(f"{exc}\n{user_frames(exc.__cause__ or exc)}", "error"))
        protocol.send(sock, protocol.Broken(node=name, message=f"{exc} (its log shows where)"))
        return 3
    protocol.send(sock, protocol.Hello(node=name, pid=os.getpid(), version=setup.version,
                                       spec=spec_path, setup=setup.work.setup_seconds))
    try:
        while True:
            message, fds = protocol.recv_fds(sock)
            if isinstance(message, protocol.ShadowTask):
                _batch(sock, setup.work, message, fds)
            else:
                for fd in fds:
                    os.close(fd)
                if isinstance(message, protocol.Stop):
                    setup.work.close()
                    return 0
    except (protocol.Closed, ConnectionError):
        return AGAIN
    except SetupFailed as exc:  # at its first batch (setupInputs)
        sys.stderr.write(logline.line(f"{exc}\n{user_frames(exc.__cause__ or exc)}", "error"))
        return 3


def _batch(sock: socket.socket, work: Work, task: protocol.ShadowTask, fds: list[int]) -> None:
    """Compute the batch from the files lent with it, compare, answer; the files and
    what a command wrote are let go whatever happens."""
    batch, output = task.batch, Path(task.output)
    sys.stderr.write(logline.task_line(batch, "started"))
    # by path through this process's descriptors: a command's child reads them too
    paths = [f"/proc/{os.getpid()}/fd/{fd}" for fd in fds]
    try:
        if len(paths) != sum(task.groups) + 1:
            raise ValueError(f"{len(paths)} files came for {sum(task.groups)} inputs")
        groups, start = [], 0
        for size in task.groups:
            groups.append(paths[start:start + size])
            start += size
        started = time.perf_counter()
        inputs = [[arrowfile.read_any_ipc(p) for p in group] for group in groups]
        result = work.run(batch, inputs, protocol.Task(batch=batch, inputs=groups,
                                                       output=str(output), checksum=False))
        if result is None:
            raise TypeError("made no output")
        table = arrowfile.read_any_ipc(result) if isinstance(result, Path) else result
        seconds = time.perf_counter() - started
        comparison = compare(arrowfile.read_any_ipc(paths[-1]), table)
        del inputs, table, result
    except SetupFailed:
        raise
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        _logged(batch, "failed", f"{type(exc).__name__}: {exc}")
        protocol.send(sock, protocol.Failed(batch=batch, message=f"{type(exc).__name__}: "
                                            f"{exc}", traceback=user_frames(exc)))
        return
    finally:
        for fd in fds:
            os.close(fd)
        output.unlink(missing_ok=True)
    _logged(batch, "done", "equal" if comparison.equal else "differs")
    protocol.send(sock, protocol.Compared(batch=batch, comparison=comparison,
                                          seconds=round(seconds, 6)))


def _logged(batch: int, what: str, detail: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(logline.task_line(batch, what, detail))
    sys.stderr.flush()
