"""Standing lines from another shell: where a line lives (`place`, `home`), what it
says of itself (`LineRecord`), what a job may set (`job_overrides`), and the requests
a user sends it (`podpipe submit`, `down`, `lines`, `wait`/`stop`/`resume` of a job).

A line lives in `<checkpoints.node>/lines/<name>/` (by default `.podpipe/lines/`):

    line.json   `LineRecord`: the line's process, its socket, its spec, and what it
                holds now (warm processes, the queue, the running and recent jobs),
                published whole at every change
    spec.yaml   the spec as the line runs it
    queue/      one file per job not yet over, in order (`<seq>-<job>`): the queue
                outlives the line's process
    logs/       the line's own log, and its processes' before their first job
    answers/    call stages' kept answers, shared by the line's jobs

Each job is a run directory under `<checkpoints.node>/runs/` like any run's, whose
`run.json` names its line. Everything read back is checked to be this user's, and
the line checks each peer's uid on its socket: another user's line can be neither
read nor steered from here.
"""

from __future__ import annotations

import os
import re
import secrets
import select
import socket
import time
from pathlib import Path
from typing import Iterator

import msgspec

from podpipe.errors import RunError, UsageError
from podpipe.model.pipeline import NAME, Pipeline
from podpipe.runtime.data.scratch import alive
from podpipe.runtime.plumbing import files, protocol, sockets
from podpipe.runtime.rundir import layout as rundir

# What a job may set: its data, never the graph (`apply` and `swap` change that).
JOB_FIELDS = ("source.uri", "source.columns", "source.batchRows", "source.format")
JOB_NODE_FIELDS = {"sinks": ("uri", "mode"), "stages": ("env",)}

DEFAULT_LINES = Path(".podpipe") / "lines"
LINES_ENV = "PODPIPE_LINES"  # where LINE names are looked for, if not DEFAULT_LINES
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
STARTING_SECONDS = 60.0  # how long a request waits for a line that is (re)starting
RECORD = "line.json"


class JobRow(msgspec.Struct, kw_only=True):
    job: str
    run_dir: str
    state: str          # queued, running, succeeded, failed, interrupted
    error: str | None = None
    seconds: float | None = None  # from its start to its end


class LineJobs(msgspec.Struct, kw_only=True):
    """The jobs a line has: queued, running, over."""

    queued: list[str] = []   # job ids, in order (the running one not among them)
    running: str | None = None
    beside: list[str] = []   # younger jobs running beside it (`jobs: N`), oldest first
    recent: list[JobRow] = []  # the last jobs over, newest last
    done: int = 0            # succeeded, since the line was first up
    failed: int = 0


class LineRecord(msgspec.Struct, kw_only=True):
    name: str
    pid: int
    start: str | None        # the process's start time: a reused pid is not the line
    supervisor: int | None = None  # what starts it again if it dies (`line.supervise`)
    socket: str
    spec: str                # the user's file
    cwd: str
    overrides: list[str]
    started: float
    state: str = "starting"  # starting, up, down
    processes: dict[str, int] = {}  # warm processes: agent name -> pid
    tables: dict[str, str] = {}     # tables in RAM for the next job: name -> version
    jobs: LineJobs = msgspec.field(default_factory=lambda: LineJobs())

    @property
    def up(self) -> bool:
        """Is the line's process alive and serving (not down, not dead)?"""
        return self.state == "up" and alive(self.pid, self.start)


def home(line: str) -> Path:
    """A LINE argument: a line's name (under `.podpipe/lines`) or its directory."""
    if "/" in line or line in (".", ".."):
        return Path(line)
    return lines_dir() / line


def lines_dir() -> Path:
    """Where this user's lines are: `$PODPIPE_LINES` (a rendered pod's node tier), else
    `.podpipe/lines`."""
    return Path(os.environ.get(LINES_ENV) or DEFAULT_LINES)


def job_overrides(items: list[str]) -> None:
    """Refuse (UsageError naming it) a job's --set that is not one of its data's."""
    for item in items:
        key = item.partition("=")[0]
        parts = key.split(".")
        if key in JOB_FIELDS or (len(parts) >= 3 and parts[2] in
                                 JOB_NODE_FIELDS.get(parts[0], ())):
            continue
        raise UsageError(f"--set {key}: a job may set only its data — "
                         f"{', '.join(JOB_FIELDS)}, sinks.NAME.uri, sinks.NAME.mode, "
                         "stages.NAME.env.VAR; the graph is the line's (change it with "
                         "'podpipe apply' or 'podpipe swap')")


def job_id(pipeline: str) -> str:
    """A new job's id: the pipeline's name, the time, and 8 random hex digits (tens of
    jobs a second: a run's 4 would collide)."""
    return f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def job_dir(pipeline: Pipeline, job: str | None) -> Path:
    """A new job's run directory, named `job` (one id given to every pod of a line on
    Kubernetes: UsageError if it names a run directory already), else a new id."""
    runs = (Path(pipeline.checkpoints.node) / "runs").absolute()
    if job is not None:
        check_job_id(job)
        if (runs / job).exists():
            raise UsageError(f"--job {job}: a run directory of that name exists already "
                             f"({runs / job}); a job id is used once")
        return runs / job
    while (path := runs / job_id(pipeline.name)).exists():
        pass
    return path


def check_job_id(job: str) -> None:
    """Refuse (UsageError) a job id that could not be a run directory's name."""
    if not JOB_ID.match(job):
        raise UsageError(f"--job {job!r}: expected letters, digits, '.', '_' or '-' "
                         "(at most 200), starting with a letter or digit")


def place(pipeline: Pipeline, name: str | None) -> Path:
    """Where `up` puts the line `name` (default: the pipeline's) of `pipeline`:
    `<checkpoints.node>/lines/<name>`. UsageError for a name that is no DNS label (it
    becomes a folder: no path may leave the lines folder) or a line up already."""
    name = name or pipeline.name
    if not NAME.match(name):
        raise UsageError(f"--name {name!r}: expected a DNS label (lowercase letters, digits "
                         "and '-', at most 63)")
    path = Path(pipeline.checkpoints.node) / "lines" / name
    if (path / RECORD).exists() and (record := read(path)).up:
        raise UsageError(f"line {name} is up already (pid {record.pid}); "
                         f"'podpipe down {path}' first")
    return path


def is_line(arg: str) -> bool:
    """Is a RUN_DIR argument a standing line rather than a run?"""
    return arg != "latest" and (home(arg) / RECORD).exists()


def read(path: Path) -> LineRecord:
    """The line's record, from a directory of this user's (UsageError otherwise)."""
    try:
        files.check_ours(path)
        record = msgspec.json.decode(files.read_ours(path / RECORD), type=LineRecord)
        record.jobs.queued = [j for j in queued(path) if j != record.jobs.running]
        return record
    except files.NotOurs as exc:
        raise UsageError(f"line {path}: {exc}") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such line (start one with 'podpipe up SPEC')") from None
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{path}: not a podpipe line ({exc})") from None


def queued(path: Path) -> list[str]:
    """The jobs in the line's queue folder, in order (`<seq>-<job>`): the queue as it
    is now, whenever the line last wrote its record."""
    try:
        return [entry.partition("-")[2] for entry in sorted(os.listdir(path / "queue"))
                if not entry.startswith(".")]
    except FileNotFoundError:
        return []


def write(path: Path, record: LineRecord) -> None:
    files.publish(path / RECORD, msgspec.json.encode(record))


def listing(folder: str | None = None) -> list[tuple[Path, LineRecord]]:
    """This user's lines in a lines directory, by name, with their records (a line
    whose process is gone shows as `down`)."""
    root = Path(folder) if folder else lines_dir()
    try:
        entries = sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    except FileNotFoundError:
        return []
    found = []
    for path in entries:
        try:
            record = read(path)
        except UsageError:
            continue  # another user's, or not a line
        if not record.up:
            record.state = "starting" if coming_up(record) else "down"
        found.append((path, record))
    return found


def gone(record: LineRecord, timeout: float) -> bool:
    """Wait until the line's process and its supervisor have ended (True), at most
    `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    for pid in (record.pid, record.supervisor):
        if pid is None or (pid == record.pid and not alive(pid, record.start)):
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return False
        finally:
            os.close(pidfd)
    return True


def coming_up(record: LineRecord) -> bool:
    """Is the line starting, or starting again after its process died (its
    supervisor alive)?"""
    return record.state != "down" and not record.up and record.supervisor is not None \
        and alive(record.supervisor, None)


def connect(line: str) -> tuple[Path, socket.socket]:
    """A connection to the running line `line` (UsageError if it is down or not ours)."""
    path = home(line)
    record = read(path)
    deadline = time.monotonic() + STARTING_SECONDS
    while coming_up(record) and time.monotonic() < deadline:
        time.sleep(0.05)  # (its supervisor starts it again: nothing to block on yet)
        record = read(path)
    if not record.up:
        raise UsageError(f"line {record.name} is down; start it with 'podpipe up "
                         f"{record.spec} --name {record.name}'")
    try:
        return path, sockets.connect(record.socket, wait=0)
    except OSError as exc:
        raise UsageError(f"line {record.name}: cannot reach it at {record.socket}: "
                         f"{exc}") from None


def ask(line: str, message: protocol.Message, timeout: float | None = 30.0) -> protocol.Message:
    """Send the line one request; its answer (UsageError if it refused)."""
    _, sock = connect(line)
    with sock:
        return sockets.ask(sock, message, timeout, f"line {line}")


def submit(line: str, overrides: list[str], *, wait: bool = False,
           resume: Path | None = None, job: str | None = None,
           ) -> Iterator[protocol.Submitted | protocol.JobOver]:
    """Put a job on the line (`resume`: the failed or stopped job at that run
    directory, again; `job`: its id, else a new one): its `Submitted` answer and, with
    `wait`, its `JobOver` once it has ended (the connection stays open for it: no
    polling)."""
    request: protocol.Message = protocol.SubmitRequest(overrides=overrides, wait=wait,
                                                       job=job) \
        if resume is None else protocol.ResumeRequest(run_dir=str(resume.resolve()), wait=wait)
    _, sock = connect(line)
    with sock:
        answer = sockets.ask(sock, request, 60.0, f"line {line}")
        assert isinstance(answer, protocol.Submitted)
        yield answer
        if wait:
            over = sockets.ask(sock, None, None, f"line {line}")
            assert isinstance(over, protocol.JobOver)
            yield over


def serving(line: str) -> bool:
    """Is the line up, or coming up?"""
    try:
        record = read(home(line))
    except UsageError:
        return False
    return record.up or coming_up(record)


def job_line(run_path: Path) -> str | None:
    """The line a run directory's job is on (None: a run of its own, or no run
    directory: what reads it says so)."""
    if not (run_path / rundir.RECORD).exists():
        return None
    return rundir.read(run_path).line


def wait_job(run_path: Path, line: str, timeout: float | None) -> protocol.JobOver | None:
    """Block until the job at `run_path` is over (None after `timeout` seconds)."""
    _, sock = connect(line)
    with sock:
        try:
            answer = sockets.ask(sock, protocol.JobRequest(run_dir=str(run_path.resolve())),
                                  timeout, f"line {line}")
        except RunError:
            if timeout is not None:
                return None
            raise
    assert isinstance(answer, protocol.JobOver)
    return answer


def stop_job(run_path: Path, line: str) -> protocol.JobOver:
    """Stop the job at `run_path` (resumable: `podpipe resume`); the line goes on."""
    answer = ask(line, protocol.JobRequest(run_dir=str(run_path.resolve()), stop=True),
                 timeout=None)
    assert isinstance(answer, protocol.JobOver)
    return answer
