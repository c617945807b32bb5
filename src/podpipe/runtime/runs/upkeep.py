"""A standing line's process kept up: started on its own (`detach`), run under a
supervisor that starts it again when it dies (`supervise`), and telling `podpipe up`
when it is warm (`Ready`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from podpipe.errors import PodpipeError, UsageError, exit_code
from podpipe.runtime.plumbing import files, lifetime, logline
from podpipe.runtime.runs import lines, pod
from podpipe.runtime.runs.line import Line, Start

RESTARTS = 5  # a line's process that died more often in a minute stays down


class Ready:
    """Where the line says it is warm, or why it could not start: the pipe `podpipe
    up` waits on (`fd`), else `show` (the terminal of `up --foreground`)."""

    def __init__(self, fd: int | None, show: Callable[[], None]) -> None:
        self.fd, self.show = fd, show

    def tell(self, error: str | None) -> None:
        if self.fd is None:
            if error is None:
                self.show()
            return
        os.write(self.fd, (error or "up").encode() + b"\n")
        self.release()

    def release(self) -> None:
        """This process has nothing to say (any more): its end of the pipe closed."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def supervise(start: Start, ready: Ready) -> int:
    """Run the line in a child process, and start it again when it dies by a signal
    (killed, out of memory) after it was up: the new one goes on with the job it was
    running, from what it kept, and the queue after it. A line that died RESTARTS
    times in a minute stays down. The exit code: the line's own."""
    deaths: list[float] = []
    first = True
    while True:
        pid = os.fork()
        if pid == 0:
            lifetime.die_with_parent()
            if not first:
                ready.release()  # (said by the first)
            # (a restart reads the line's own copy: the user's file may be gone or changed)
            this = start if first else replace(start, spec=str(start.path / "spec.yaml"))
            lifetime.child(lambda: _line_process(this, ready))
        first = False
        ready.release()  # the child's to say: `up` reads until every copy is closed
        code = _wait_forwarding(pid)
        if code >= 0:
            return code
        now = time.monotonic()
        deaths = [t for t in deaths if now - t < 60] + [now]
        record = lines.read(start.path)
        if record.state != "up" or len(deaths) > RESTARTS:
            record.state = "down"
            lines.write(start.path, record)
            return 1
        sys.stderr.write(logline.line(f"the line's process died ({signal.Signals(-code).name}); "
                                      "starting it again", "warning"))
        sys.stderr.flush()


def _wait_forwarding(pid: int) -> int:
    """Wait for the child `pid`, passing SIGTERM and SIGINT on to it; its exit code
    (-N: killed by signal N)."""
    def forward(signum: int, _: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            except InterruptedError:
                continue
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _line_process(start: Start, ready: Ready) -> int:
    try:
        return run_line(start, ready)
    except PodpipeError as exc:
        sys.stderr.write(logline.line(str(exc), "error"))
        return exit_code(exc)


def run_line(start: Start, ready: Ready) -> int:
    """The line's process, start to end; `ready` is told once it is warm (None), or
    why it could not start."""
    try:
        line = Line(start)
    except PodpipeError as exc:
        ready.tell(str(exc))
        raise
    lifetime.become_subreaper()  # what the stages leave is the line's to end
    told = False
    try:
        with line.loop:
            line.warm(line.open())
            if not line.down:
                ready.tell(None)
                told = True
                line.serve()
    except PodpipeError as exc:
        if not told:
            ready.tell(str(exc))
        raise
    finally:
        line.close()
    return 0


def detach(start: Start) -> None:
    """Start the line's process on its own (its own session, logging to
    `logs/line.log`) and return once it is warm; UsageError saying why it is not."""
    files.private_dirs(start.path / "logs")
    theirs, ours = os.pipe()
    argv = [sys.executable, "-m", "podpipe", "up", start.spec, "--name", start.name,
            "--foreground", "--ready-fd", str(ours)]
    for item in start.overrides:
        argv += ["--set", item]
    if start.metrics:
        argv += ["--metrics-port", start.metrics]
    log = start.path / "logs" / "line.log"
    with open(files.append_private(log), "ab") as out:
        # Through a shell that leaves it in the background and exits: the line is not
        # this process's child (no zombie of it here, whatever this process does next).
        subprocess.run(["/bin/sh", "-c", '"$@" &', "sh", *argv], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=out, pass_fds=[ours], start_new_session=True,
                       check=True)
    os.close(ours)
    with os.fdopen(theirs) as said:
        answer = said.read().strip()
    if answer != "up":
        raise UsageError(answer or f"line {start.name} did not start; see {log}")


def stand(spec_path: str, overrides: list[str], *, scratch: str, replicas: int,
          hold: bool, launch: bool, metrics: str | None) -> int:
    """A pod of a StatefulSet rendered `--standing` (`podpipe conductor --standing`):
    a line named as its pipeline, at `<checkpoints.node>/lines/` (`PODPIPE_LINES` in
    the pod, so that `podpipe submit NAME` run inside it finds it), its RAM scratch the
    pod's memory volume at `scratch`, restarted by the kubelet; each job runs the
    shards this pod owns (a pod that owns none holds, with `hold`, as a one-shot
    pod's does). `launch`: the layout `processes` (else the kubelet starts a
    container per node). Until SIGTERM."""
    placed = pod.placing(spec_path, overrides, Path(scratch), replicas, hold)
    if placed is None:
        return 0
    pipeline, placement = placed
    start = Start(lines.place(pipeline, None), spec_path, overrides, pipeline.name, metrics,
                  volume=Path(scratch), launch=launch, supervised=False, placement=placement)

    def warm() -> None:
        sys.stderr.write(logline.line(f"line {start.name} is up at {start.path}; jobs come "
                                      f"with 'podpipe submit {start.name} --set ...'"))
        sys.stderr.flush()
    return run_line(start, Ready(None, warm))
