"""The run's records of when things happened: `tasks.jsonl` and `samples.jsonl`.

Typed and versioned (`schemaVersion`), defined here once: the conductor's timeline
writes them, `podpipe report` reads them back through the same types. Both files
are appended to and never rewritten; a resumed run appends its own, from its own
start, as the next `attempt`. A line that does not decode (one being written as the run was read) is
skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import msgspec

TASKS, SAMPLES = "tasks.jsonl", "samples.jsonl"
SCHEMA_VERSION = 1


SETUP = "setup"  # a TaskRecord's state for a process's setup (`Timeline.setup`)


class _Record(msgspec.Struct, kw_only=True):
    """A line of a run directory's file: its schema, field for field."""


class TaskRecord(_Record):
    """A task, once it ended (times in seconds since the run started)."""

    node: str
    worker: int
    batch: int
    version: str | None
    handed: float                # handed out
    asked: float | None = None   # asked for RAM for its output
    granted: float | None = None  # was granted it
    bytes_in: int = 0
    ended: float = 0.0
    state: str = "unfinished"    # done, failed, denied (its RAM), lost (its process);
    # SETUP: not a task but a process setting its stage up (a class's), batch -1
    rows_in: int = 0
    rows_out: int = 0
    bytes_out: int = 0
    checksum: str = ""           # its output's xxh3, if hashed (`podpipe verify` reads it)
    attempt: int = 1             # the run's first, or which resume (times: since its start)
    schemaVersion: int = SCHEMA_VERSION


class SampleRecord(_Record):
    """The pod four times a second: RAM scratch in use, and the most it reached since
    the previous sample (so that the highest sample is the run's peak), the budget,
    the batches on the line, each node's queue and workers, and per process (`node`
    or `node.N`) the cores it ran on since the previous sample and its resident bytes
    (`cputime.ran_and_resident`)."""

    t: float
    scratch: int
    peak: int
    budget: int
    on_line: int
    queues: dict[str, int]
    workers: dict[str, int]
    cpu: dict[str, float] = {}
    rss: dict[str, int] = {}
    attempt: int = 1
    schemaVersion: int = SCHEMA_VERSION


R = TypeVar("R", TaskRecord, SampleRecord)


def read(path: Path, kind: type[R]) -> list[R]:
    """Every whole record of `kind` in the file at `path` (none if it is not there)."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return []
    decoder = msgspec.json.Decoder(kind)
    found = []
    for line in text.splitlines():
        try:
            found.append(decoder.decode(line))
        except msgspec.DecodeError:
            continue
    return found
