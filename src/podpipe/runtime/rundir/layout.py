"""The run directory: its layout, and `run.json`, the record of how the run was started.

    RUN_DIR/lock           held (flock) by the process running the run
    RUN_DIR/spec.yaml      the spec as run (an apply replaces it)
    RUN_DIR/podpipe-shipped/  stages defined in a notebook or script, shipped by value
                           beside the spec (`runtime.stage.shipped`)
    RUN_DIR/run.json       `RunRecord`: the spec's path, overrides, working directory,
                           where the pod stands among the replicas
    RUN_DIR/status.json    the status (`runtime.status`)
    RUN_DIR/journal.sqlite the journal (`runtime.journal`)
    RUN_DIR/node/          the node tier (`runtime.tiers`)
    RUN_DIR/logs/          one log per process
    RUN_DIR/pods/<i>/      a multi-replica run: each pod's own run directory
"""

from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path
from typing import Any

import msgspec

from podpipe.errors import PodpipeError, UsageError
from podpipe.model import spec as specs
from podpipe.model.shards import Placement
from podpipe.runtime.storage import durable
from podpipe.runtime.plumbing import files
from podpipe.runtime.rundir import status

RECORD = "run.json"
LOCK = "lock"
_held: dict[str, int] = {}  # the locks this process holds (for its life, but a line's jobs)
SCHEMA_VERSION = 1


class RunRecord(msgspec.Struct, kw_only=True):
    spec: str                      # the user's spec file, absolute
    overrides: list[str]           # --set, as given
    cwd: str                       # relative paths in the spec resolve from here
    placement: Placement | None = None   # one pod: where it stands among the replicas
    run_id: str | None = None      # several replicas on this machine (runtime.replicas):
    replicas: int | None = None    # how many,
    durable: str | None = None     # the store they share,
    attempt: int | None = None     # and how many times they were started
    source: dict[str, Any] | None = None  # what one pod's run reads (`source.identity`)
    line: str | None = None        # a standing line's job: the line's directory
    # the run's own staging folder in a `mode: overwrite` sink (`_staging-<this>`)
    staging: str = msgspec.field(default_factory=lambda: secrets.token_hex(8))
    schemaVersion: int = SCHEMA_VERSION

    @property
    def of_replicas(self) -> bool:
        """Is this the record of several replicas (not of one pod)?"""
        return self.attempt is not None


SHIPPED = "podpipe-shipped"  # beside a spec: its stages shipped by value, STAGE.pkl


def publish_spec(folder: Path, spec_path: str) -> None:
    """`folder/spec.yaml` from `spec_path`, with the stages shipped beside it (files of
    this user's that others cannot write: anything else is refused, `NotOurs`)."""
    source = Path(spec_path).parent / SHIPPED
    if source.is_dir():
        files.check_ours(source)
        files.private_dirs(folder / SHIPPED)
        for shipped in sorted(source.glob("*.pkl")):
            files.publish(folder / SHIPPED / shipped.name, files.read_ours(shipped))
    files.publish(folder / "spec.yaml", Path(spec_path).read_bytes())


def make(path: Path, spec_path: str, overrides: list[str], **record: object) -> None:
    """An empty run directory with its logs folder, the spec as run, and `run.json`."""
    try:
        files.private_dirs(path)
        if any(path.iterdir()):
            raise UsageError(f"--run-dir {path}: already holds a run; resume it with "
                             f"'podpipe resume {path}', or choose an empty directory")
        path.chmod(0o700)  # the run's data, logs and journal are its user's alone
        (path / "logs").mkdir(mode=0o700)
        publish_spec(path, spec_path)
        write(path, RunRecord(spec=os.path.abspath(spec_path), overrides=overrides,
                              cwd=os.getcwd(), **record))  # type: ignore[arg-type]
    except OSError as exc:
        raise UsageError(f"--run-dir {path}: {exc.strerror}") from None


def write(path: Path, record: RunRecord) -> None:
    files.publish(path / RECORD, msgspec.json.encode(record))


def read(path: Path) -> RunRecord:
    """`run.json`: how the run was started (its spec, overrides, working directory), in
    a run directory of this user's (UsageError naming the owner otherwise: a resume
    would run the code it names)."""
    try:
        files.check_ours(path)
        return msgspec.json.decode(files.read_ours(path / RECORD), type=RunRecord)
    except files.NotOurs as exc:
        raise UsageError(str(exc)) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{path}: not a podpipe run directory ({exc})") from None


def spec_digest(path: Path) -> str:
    """What names the checkpoints of the run's spec (as run, with its overrides)."""
    return durable.digest((path / "spec.yaml").read_bytes(), read(path).overrides)


def lock(path: Path) -> None:
    """Hold the run directory for as long as this process lives: a second `run` or
    `resume` of it refuses at once (UsageError naming the process that holds it)."""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise UsageError(f"{path}: cannot lock the run directory: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(f"{path}: the run is in use by process {holder} (a run or resume "
                         "of it is going on); wait for it to end") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _held[str(path)] = fd


def unlock(path: Path) -> None:
    """Let go of the run directory (a standing line's job is over; the line goes on)."""
    fd = _held.pop(str(path), None)
    if fd is not None:
        os.close(fd)


def _in_use(path: Path) -> bool:
    """Does a process hold the run directory's lock (a run or resume of it)?"""
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (and with it the lock taken here, if it was)


def status_of(path: Path) -> status.Status:
    """The run's status; for a run directory whose conductor never wrote one (killed
    in its first moments), one saying so: `starting` while a process holds the
    directory (`queued`: a job a standing line holds), else `interrupted` (a resume
    starts it from nothing)."""
    if (path / status.FILE).exists() or not (path / RECORD).exists():
        return status.read(path)  # (or a clear error: no run directory)
    recorded = read(path)
    try:
        name = specs.load(path / "spec.yaml", recorded.overrides).name
    except PodpipeError:
        name = "?"
    started = os.stat(path / RECORD).st_mtime
    return status.Status(
        run_id=recorded.run_id or path.name, pipeline=name,
        state=("queued" if recorded.line else "starting") if _in_use(path) else "interrupted",
        error=None, run_dir=str(path), scratch=None, started=started, ended=None,
        elapsed_seconds=0.0, budget_bytes=0, scratch_bytes=0, peak_scratch_bytes=0,
        source_batches=None, spilled_outputs=0, shards=1, processes=[], stages={},
        restore_notes=[])


def failed_before_start(path: Path, error: str) -> None:
    """A run (a line's job) that failed before its conductor started — its source
    unreadable, say: its status says so, naming why."""
    current = status_of(path)
    current.state, current.error, current.ended = "failed", error, time.time()
    status.write(path, current)


def claim_for_resume(path: Path) -> status.Status:
    """Lock the run directory for a resume and return its status, refusing (exit 2)
    a run that is no run directory, still runs, or already succeeded."""
    status_of(path)  # (a clear error if it is no run directory, before the lock)
    lock(path)
    before = status_of(path)  # as it is now that nobody else can change it
    if before.state in ("running", "succeeded"):
        raise UsageError(f"{path}: the run " + ("is still running (its conductor is alive)"
                         if before.state == "running" else "already succeeded")
                         + "; nothing to resume")
    return before
