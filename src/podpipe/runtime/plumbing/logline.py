"""The lines podpipe writes into a run's logs, and how they are read back.

Every process of a run logs to `RUN_DIR/logs/<name>.log`: a stage's own output
(its prints, its warnings, a traceback) as it comes, and podpipe's lines, each
starting with a local timestamp: `2026-11-28 19:23:13.123 batch 4: started`.
A task's lines sit between its `started` and its `done`/`failed` line, which is
how `podpipe logs --batch N` finds them; unstamped lines take the time of the
stamped line before them when logs are merged in time order.
"""

from __future__ import annotations

import re
import time

_STAMPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")
_BATCH = re.compile(r"^\S+ \S+ batch (\d+): (started|done|failed)")


def stamp(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + \
        f".{int(now % 1 * 1000):03d}"


def line(message: str) -> str:
    return f"{stamp()} {message}\n"


def task_line(batch: int, what: str, detail: str = "") -> str:
    """`started`, `done` or `failed`, for the task of `batch`."""
    return line(f"batch {batch}: {what}" + (f" ({detail})" if detail else ""))


def time_of(text: str) -> str | None:
    """The timestamp a line starts with (sortable as text), or None."""
    found = _STAMPED.match(text)
    return found.group(1) if found else None


def task_of(text: str) -> tuple[int, str] | None:
    """(batch, started|done|failed) of a task line, else None."""
    found = _BATCH.match(text)
    return (int(found.group(1)), found.group(2)) if found else None
