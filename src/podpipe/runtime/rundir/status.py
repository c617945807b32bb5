"""The run's status file: `RUN_DIR/status.json`, rewritten atomically while it runs.

`podpipe status` reads only this file, so it works from the run directory alone,
with or without a live conductor. A run that says `running` but whose conductor
process is gone is reported as `interrupted`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from podpipe.errors import UsageError
from podpipe.runtime.plumbing import files
from podpipe.runtime.data.scratch import alive

FILE = "status.json"
SCHEMA_VERSION = 1  # of the status record (`schemaVersion`)


class _Record(msgspec.Struct, forbid_unknown_fields=True):
    pass


class ProcessInfo(_Record):
    role: str                   # conductor | stage
    stage: str | None
    pid: int
    pod: str
    start: str | None = None    # the conductor's kernel start time (liveness check)
    alive: bool | None = None
    container: str | None = None
    worker: int = 0             # which of its stage's processes


class CallStatus(_Record):
    """A call stage's requests, over the run."""

    requests: int = 0             # sent (each retry is one)
    memo_hits: int = 0            # answered from what was kept: not sent
    retries: int = 0
    failures: int = 0             # failed for good (a failure fails the run)
    in_flight: int = 0            # now (as its processes last said)
    in_flight_max: int = 0        # the most in flight at once, in one process
    latency_p50: float | None = None  # seconds, over the last 10,000 requests
    latency_p99: float | None = None


class StageStatus(_Record):
    kind: str                   # source | table | stage | call | reduce | sink
    batches_done: int
    batches_total: int
    rows_in: int
    rows_out: int
    busy_seconds: float
    bytes_written: int
    bytes_read: int
    restarts: int
    restored: dict[str, int]    # tier -> batches restored from it
    recomputed: int
    reused: int
    version: str | None = None
    versions: dict[str, int] = {}
    held: str | None = None
    workers: int = 1            # processes now
    workers_max: int = 1        # the most it had
    queued: int = 0             # batches ready that no worker has taken
    in_flight: int = 0          # tasks its processes are on
    tier: str | None = None     # a table, once loaded: ram, or node (too large for RAM)
    calls: CallStatus | None = None  # a call stage: its requests


class PodInfo(_Record):
    ordinal: int
    replicas: int
    shards: list[int]
    waiting_for: list[int]


class DurableInfo(_Record):
    url: str
    checkpoints: int | None = None
    last: int | None = None
    behind: bool | None = None
    error: str | None = None


class NodeTierInfo(_Record):
    copies: int
    errors: list[str]


class PodRow(_Record):
    """One replica, in the status of a multi-replica run directory."""

    ordinal: int
    shards: list[int]
    state: str
    error: str | None
    pid: int
    run_dir: str
    waiting_for: list[int] = []
    pids: list[int] = []


class SinkInfo(_Record):
    """A sink's output once the run succeeded (as its `_SUCCESS` lists it)."""

    uri: str
    files: int
    rows: int
    bytes: int


class Controller(_Record):
    pid: int
    start: str | None


class Status(_Record, kw_only=True):
    """`status.json`: one pod's run, or (with `pods`) several replicas added up."""

    run_id: str
    pipeline: str
    state: str                  # running | succeeded | failed | interrupted
    error: str | None
    run_dir: str
    scratch: str | None
    started: float
    ended: float | None
    elapsed_seconds: float
    budget_bytes: int
    scratch_bytes: int
    peak_scratch_bytes: int
    source_batches: int | None
    spilled_outputs: int
    shards: int
    processes: list[ProcessInfo]
    stages: dict[str, StageStatus]
    restore_notes: list[str]
    durable: DurableInfo | None = None
    pod: PodInfo | None = None                 # one pod's
    node_tier: NodeTierInfo | None = None
    replicas: int | None = None                # several replicas'
    controller: Controller | None = None
    pods: list[PodRow] | None = None
    sinks: dict[str, SinkInfo] = {}            # once the run succeeded
    schemaVersion: int = SCHEMA_VERSION


def record(data: dict[str, Any]) -> Status:
    """The typed record of a status built as plain data (an aggregate)."""
    return msgspec.convert(data, Status)


def plain(status: Status) -> dict[str, Any]:
    """The status as plain data, as `podpipe status --json` prints it."""
    return msgspec.to_builtins(status)


def write(run_dir: Path, status: Status) -> None:
    files.publish(run_dir / FILE, msgspec.json.format(msgspec.json.encode(status), indent=2))


def read(run_dir: str | Path) -> dict[str, Any]:
    """The status of the run in `run_dir` as plain data (checked against `Status`)."""
    run_dir = Path(run_dir)
    try:
        status = plain(msgspec.json.decode((run_dir / FILE).read_bytes(), type=Status))
    except FileNotFoundError:
        kind = "no such directory" if not run_dir.is_dir() else f"has no {FILE}"
        raise UsageError(f"{run_dir}: not a podpipe run directory ({kind})") from None
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{run_dir / FILE}: unreadable status: {exc}") from None
    if status["state"] == "running":
        # The process that writes the file: a pod's conductor, or the process that
        # started every replica (runtime.replicas).
        owner = status.get("controller") or next(
            (p for p in status["processes"] if p["role"] == "conductor"), None)
        if owner is None or not alive(owner["pid"], owner.get("start")):
            status["state"] = "interrupted"
    return status
