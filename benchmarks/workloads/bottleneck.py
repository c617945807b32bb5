"""Stages with one station that holds the line back (benchmarks/workers.py)."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc


def crunch(t: pa.Table) -> pa.Table:
    """CPU-bound: sorts the batch over and over (about 0.11 s per 100,000 rows here)."""
    x = t["x"]
    for _ in range(100):
        x = pc.take(x, pc.sort_indices(pc.multiply(x, -1)))
    return pa.table({"x": pc.sort_indices(x)})


def wait(t: pa.Table) -> pa.Table:
    """I/O-bound: waits 50 ms per batch, as a call to a slow service would."""
    time.sleep(0.05)
    return t


def light(t: pa.Table) -> pa.Table:
    return t.append_column("y", pc.add(t["x"], 1))


def identity(t: pa.Table) -> pa.Table:
    """No work at all: what is left of a task is podpipe's (`benchmarks/tasks.py`)."""
    return t
