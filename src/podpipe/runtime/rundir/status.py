"""The run's status file: `RUN_DIR/status.json`, rewritten atomically while it runs.

`podpipe status` reads only this file, so it works from the run directory alone,
with or without a live conductor. A run that says `running` but whose conductor
process is gone is reported as `interrupted`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, TypeVar

import msgspec

from podpipe.errors import UsageError
from podpipe.runtime.plumbing import files, protocol
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


class ShadowDifference(_Record):
    batch: int
    comparison: protocol.Comparison


class ShadowStatus(_Record):
    """A stage's candidate version run beside it (`podpipe shadow`), and how its
    outputs compared with the live ones."""

    overrides: list[str]          # what the candidate is (its --set)
    every: int = 1                # it is offered every Nth batch the stage makes
    version: str = ""
    state: str = "starting"       # starting | running | stopped | promoted | failed
    offered: int = 0              # batches it was offered (made while it was up)
    compared: int = 0
    equal: int = 0
    differing: int = 0
    skipped: int = 0              # not compared: no room in RAM, or it was behind
    failed: int = 0               # it raised, timed out or died on the batch
    seconds: float = 0.0          # its time on the batches compared
    differences: list[ShadowDifference] = []  # the first few that differed
    failures: list[str] = []      # the first few failures
    error: str | None = None      # why it ended, if it did not by a stop or a promote


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
    setup_seconds: float = 0.0  # a class stage: the longest setup of one of its processes
    nondeterministic: list[int] = []  # batches it made other bytes of when made again
    shadow: ShadowStatus | None = None  # its candidate, if one was run beside it


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


class RunRow(_Record):
    """A run as `podpipe runs` lists it."""

    run_id: str
    pipeline: str
    state: str
    started: float
    elapsed_seconds: float
    run_dir: str


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
    resumed_done: int | None = None            # a resume: the tasks done before it
    pod: PodInfo | None = None                 # one pod's
    node_tier: NodeTierInfo | None = None
    replicas: int | None = None                # several replicas'
    controller: Controller | None = None
    pods: list[PodRow] | None = None
    sinks: dict[str, SinkInfo] = {}            # once the run succeeded
    schemaVersion: int = SCHEMA_VERSION


def plain(status: Status) -> dict[str, Any]:
    """The status as plain data, as `podpipe status --json` prints it."""
    plain: dict[str, Any] = msgspec.to_builtins(status)
    return plain


def write(run_dir: Path, status: Status) -> None:
    files.publish(run_dir / FILE, msgspec.json.format(msgspec.json.encode(status), indent=2))


def read(run_dir: str | Path) -> Status:
    """The status of the run in `run_dir`, checked against `Status`; a run whose
    writer is gone reads as `interrupted`. The directory and the file must be this
    user's, and not writable by others (UsageError naming the owner otherwise)."""
    run_dir = Path(run_dir)
    try:
        files.check_ours(run_dir)  # (another user's run is not ours to act on)
        status = msgspec.json.decode(files.read_ours(run_dir / FILE), type=Status)
    except FileNotFoundError:
        kind = "no such directory" if not run_dir.is_dir() else f"has no {FILE}"
        raise UsageError(f"{run_dir}: not a podpipe run directory ({kind})") from None
    except files.NotOurs as exc:
        raise UsageError(str(exc)) from None
    except (OSError, msgspec.DecodeError) as exc:
        raise UsageError(f"{run_dir / FILE}: unreadable status: {exc}") from None
    if status.state == "running":
        # The process that writes the file: a pod's conductor, or the process that
        # started every replica (runtime.runs.replicas).
        owner: Controller | ProcessInfo | None = status.controller or next(
            (p for p in status.processes if p.role == "conductor"), None)
        if owner is None or not alive(owner.pid, owner.start):
            status = msgspec.structs.replace(status, state="interrupted")
    return status


# -- several pods' statuses as one: a function per field, never a blind sum -----

T = TypeVar("T")


def _sum(a: Any, b: Any) -> Any:
    return a + b


def _first(a: T | None, b: T | None) -> T | None:
    return a if a is not None else b


def _largest(a: Any, b: Any) -> Any:
    """The larger, None counting as nothing. Of two pods' percentiles: an upper bound
    of the percentile of both together (at most 1% of each pod's latencies lie above
    its p99, so at most 1% of all lie above the larger p99); never their sum."""
    return b if a is None else a if b is None else max(a, b)


def _counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in {**a, **b}}


_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "requests": _sum, "memo_hits": _sum, "retries": _sum, "failures": _sum,
    "in_flight": _sum, "in_flight_max": _largest,  # the most at once in one process
    "latency_p50": _largest, "latency_p99": _largest,
}


def _calls(a: CallStatus | None, b: CallStatus | None) -> CallStatus | None:
    if a is None or b is None:
        return _first(a, b)
    return CallStatus(**{f: _CALLS[f](getattr(a, f), getattr(b, f))
                         for f in CallStatus.__struct_fields__})


def _shadows(a: ShadowStatus | None, b: ShadowStatus | None) -> ShadowStatus | None:
    """Each pod's candidate of a stage, their comparisons added up."""
    if a is None or b is None:
        return _first(a, b)
    counts = ("offered", "compared", "equal", "differing", "skipped", "failed")
    return msgspec.structs.replace(
        a, **{f: getattr(a, f) + getattr(b, f) for f in counts},
        seconds=round(a.seconds + b.seconds, 6), differences=[*a.differences, *b.differences],
        failures=[*a.failures, *b.failures], error=a.error or b.error)


_STAGE: dict[str, Callable[[Any, Any], Any]] = {
    "kind": _first, "batches_done": _sum, "batches_total": _sum, "rows_in": _sum,
    "rows_out": _sum, "busy_seconds": _sum, "bytes_written": _sum, "bytes_read": _sum,
    "restarts": _sum, "restored": _counts, "recomputed": _sum, "reused": _sum,
    "version": _first, "versions": _counts, "held": _first,
    "workers": _sum,           # processes now, in every pod
    "workers_max": _largest,   # the most one pod had
    "queued": _sum, "in_flight": _sum, "tier": _first, "calls": _calls,
    "setup_seconds": _largest,
    "nondeterministic": lambda a, b: sorted({*a, *b}), "shadow": _shadows,
}


def add_stage(total: StageStatus | None, one: StageStatus) -> StageStatus:
    """A node's figures over pods: `one` pod's added to the `total` of those before."""
    if total is None:
        return one
    return StageStatus(**{f: _STAGE[f](getattr(total, f), getattr(one, f))
                          for f in StageStatus.__struct_fields__})
