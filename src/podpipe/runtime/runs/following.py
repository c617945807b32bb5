"""Finding and following runs from another shell: `latest`, `runs`, `wait`, `logs`.

Runs started without `--run-dir` live in `<checkpoints.node>/runs/<run id>` (by
default `.podpipe/runs`), where `latest` is a link to the newest. Anything that takes
a RUN_DIR also takes `latest`, meaning `.podpipe/runs/latest` under the working
directory.
"""

from __future__ import annotations

import heapq
import os
import re
import select
import signal
import time
from pathlib import Path
from typing import Iterator

from podpipe.errors import INTERRUPTED_EXIT_CODE, UsageError
from podpipe.runtime.plumbing import files, logline
from podpipe.runtime.rundir import layout as rundir, status
from podpipe.runtime.runs import lines

LATEST = "latest"
DEFAULT_RUNS = Path(".podpipe") / "runs"
EXIT_CODES = {"succeeded": 0, "failed": 1, "interrupted": INTERRUPTED_EXIT_CODE}
TIMED_OUT = 124  # as timeout(1) says it


def resolve(run_dir: str) -> Path:
    """A RUN_DIR argument: a path, or `latest`."""
    if run_dir != LATEST:
        return Path(run_dir)
    link = DEFAULT_RUNS / LATEST
    if not link.is_symlink():
        raise UsageError(f"latest: no run in {DEFAULT_RUNS} yet (runs started with "
                         "--run-dir elsewhere are not tracked there)")
    try:  # the runs folder and the link are this user's (another's could point anywhere)
        files.check_ours(DEFAULT_RUNS)
        if os.lstat(link).st_uid != os.geteuid():
            raise files.NotOurs(f"{link} was made by another user: not followed")
    except files.NotOurs as exc:
        raise UsageError(f"latest: {exc}") from None
    return (DEFAULT_RUNS / os.readlink(link)).resolve()


def mark_latest(run_path: Path) -> None:
    """Point `<runs>/latest` at this run (replacing the link atomically)."""
    runs = run_path.parent
    tmp = runs / f".{LATEST}.{os.getpid()}.tmp"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_path.name)
        os.replace(tmp, runs / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)  # a convenience: the run does not depend on it


def listing(runs_dir: str | None = None) -> list[status.RunRow]:
    """The runs in a runs directory, newest first: id, pipeline, state, started,
    elapsed seconds, run directory."""
    root = Path(runs_dir) if runs_dir else DEFAULT_RUNS
    found = []
    try:
        entries = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError(f"{root}: {exc.strerror}") from None
    for path in entries:
        try:
            current = rundir.status_of(path)  # (one killed before its first status too)
        except UsageError:
            continue  # not a run directory (or one being made)
        found.append(status.RunRow(current.run_id, current.pipeline, current.state,
                                   current.started, current.elapsed_seconds, str(path)))
    return sorted(found, key=lambda r: r.started, reverse=True)


def stop(run_dir: str, timeout: float | None = 60.0) -> tuple[int, status.Status]:
    """Stop a running run as Ctrl-C does (SIGINT to its conductor, or to the process
    that started its replicas): in-flight batches are abandoned, what is done stays,
    and `podpipe resume` finishes it. Waits for it to end; returns as `wait` does."""
    path = resolve(run_dir)
    current = rundir.status_of(path)
    line = lines.job_line(path)
    if line is not None and current.state in ("running", "queued"):  # the line goes on
        lines.stop_job(path, line)
        return wait(str(path), timeout)
    if current.state != "running":
        raise UsageError(f"{path}: the run is not running (it {current.state})"
                         if current.state != "interrupted" else
                         f"{path}: the run is not running (it was interrupted); resume it "
                         f"with 'podpipe resume {path}'")
    owner = _owner(current)
    try:
        os.kill(owner.pid, signal.SIGINT)
    except ProcessLookupError:
        pass  # it ended meanwhile
    except PermissionError:
        raise UsageError(f"{path}: the run belongs to another user; it cannot be stopped "
                         "from here") from None
    return wait(str(path), timeout)


def _owner(current: status.Status) -> status.Controller | status.ProcessInfo:
    """The process that writes a running run's status: its conductor, or the process
    that started its replicas."""
    return current.controller or next(
        p for p in current.processes if p.role == "conductor")


def wait(run_dir: str, timeout: float | None = None) -> tuple[int, status.Status]:
    """Block until the run ends (on its process's exit, not by polling); returns its
    own exit code and its final status. TIMED_OUT if it is still running then."""
    path = resolve(run_dir)
    current = rundir.status_of(path)
    line = lines.job_line(path)
    if line is not None and current.state not in ("succeeded", "failed") and \
            lines.serving(line):  # its line says when (it may have taken it up again)
        if lines.wait_job(path, line, timeout) is None:
            return TIMED_OUT, rundir.status_of(path)
        current = status.read(path)
    elif current.state == "running":
        owner = _owner(current)
        try:
            pidfd = os.pidfd_open(owner.pid)
        except ProcessLookupError:
            pidfd = None  # ended between the two reads
        if pidfd is not None:
            try:
                ready, _, _ = select.select([pidfd], [], [], timeout)
            finally:
                os.close(pidfd)
            if not ready:
                return TIMED_OUT, status.read(path)
        current = status.read(path)
    return EXIT_CODES.get(current.state, 1), current


def logs(run_dir: str, stage: str | None = None, *, batch: int | None = None,
         follow: bool = False) -> Iterator[str]:
    """The run's logs merged in time order, each line prefixed by its process (a
    node's worker, and its pod in a run of several replicas); one stage's (all its
    workers') only with `stage`; only what
    concerns one source batch with `batch` (each task's lines, the conductor's lines
    naming it). With `follow`, go on printing what is written until the run ends."""
    path = resolve(run_dir)
    status.read(path)  # a clear error if it is no run directory
    readers = {log: _LogReader(prefix, log, batch) for prefix, log in _log_files(path)}
    if stage is not None and not any(_node(log) == stage for log in readers):
        known = sorted({_node(log) for log in readers})
        raise UsageError(f"{path}: no log of {stage!r}; the run has logs of {known}")
    if not readers and not follow:
        raise UsageError(f"{path}: the run has no logs yet")

    def chosen() -> list[_LogReader]:
        for prefix, log in _log_files(path):  # a process started since
            readers.setdefault(log, _LogReader(prefix, log, batch))
        return [r for log, r in sorted(readers.items())
                if stage is None or _node(log) == stage]

    for _, _, text in heapq.merge(*[r.read(i) for i, r in enumerate(chosen())]):
        yield text
    while follow:
        running = status.read(path).state == "running"
        new = [line for i, r in enumerate(chosen()) for line in r.read(i)]
        for _, _, text in sorted(new):
            yield text
        if not running and not new:
            return
        time.sleep(FOLLOW_SECONDS)


FOLLOW_SECONDS = 0.2  # how often `logs --follow` looks for new lines


def _node(log: Path) -> str:
    """The node whose process wrote `log` (`prices.1.log`: worker 1 of `prices`)."""
    return log.stem.partition(".")[0]


def _log_files(path: Path) -> list[tuple[str, Path]]:
    folders = [("", path / "logs")] + [(f"pod {p.name} ", p / "logs")
                                       for p in sorted((path / "pods").glob("*"))]
    return [(prefix, log) for prefix, folder in folders for log in sorted(folder.glob("*.log"))]


class _LogReader:
    """One log file read as it grows: its complete lines, each with the time of the
    latest stamped line (`runtime.logline`), kept to one batch's if asked."""

    def __init__(self, prefix: str, log: Path, batch: int | None) -> None:
        self.label, self.log, self.batch = f"[{prefix}{log.stem}]", log, batch
        self.offset, self.time, self.number = 0, "", 0
        self.inside = False  # within the task of `batch`
        self.conductor = log.stem == "conductor"

    def read(self, order: int) -> list[tuple[tuple[str, int, int], int, str]]:
        """The lines written since the last read, as ((time, order, n), 0, text)."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for its end
        self.offset += end
        lines = []
        for raw in data[:end].decode(errors="replace").splitlines():
            self.time = logline.time_of(raw) or self.time
            self.number += 1
            if self._wanted(raw):
                lines.append(((self.time, order, self.number), 0, f"{self.label} {raw}"))
        return lines

    def _wanted(self, raw: str) -> bool:
        if self.batch is None:
            return True
        if self.conductor:
            return re.search(rf"\bbatch {self.batch}\b", raw) is not None
        task = logline.task_of(raw)
        if task is not None:
            batch, what = task
            if what == "started":
                self.inside = batch == self.batch
                return self.inside
            wanted = self.inside and batch == self.batch
            self.inside = False
            return wanted
        return self.inside
