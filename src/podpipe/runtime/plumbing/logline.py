"""The lines podpipe writes into a run's logs, and how they are read back.

Every process of a run logs to `RUN_DIR/logs/<name>.log`: a stage's own output
(its prints, its warnings, a traceback) as it comes, raw, and podpipe's lines, each
with a local timestamp and a level: `2026-11-28 19:23:13.123 INFO batch 4: started`.
A task's lines sit between its `started` and its `done`/`failed` line, which is
how `podpipe logs --batch N` finds them; unstamped lines take the time of the
stamped line before them when logs are merged in time order.

`PODPIPE_LOG_LEVEL` (debug, info — the default —, warning, error) drops podpipe's
lines below it (a stage's own output is always kept; `logs --batch` needs the task
lines of `info`); `PODPIPE_LOG_FORMAT=json` writes each as one JSON object, for log
collectors: `{"time", "level", "message", "run", "stage", "worker", "batch"}`. The
CLI sets them from `--log-level`, `-v`, `-q` and `--log-format`; a run's processes
inherit them.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Protocol

from podpipe.runtime.plumbing import files

LEVEL_ENV, FORMAT_ENV = "PODPIPE_LOG_LEVEL", "PODPIPE_LOG_FORMAT"
LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("text", "json")
_STAMPED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) ")
_BATCH = re.compile(r"^\S+ \S+ (?:[A-Z]+ )?batch (\d+): (started|done|failed)")
_TASK = re.compile(r"^batch (\d+): (started|done|failed)")
class Log(Protocol):
    """Where a piece of the conductor writes its lines (`Conductor._log`)."""

    def __call__(self, message: str, level: str = "info") -> None: ...


_who: dict[str, object] = {}  # this process's run, stage and worker (`speaking_for`)


def speaking_for(*, run: str | None = None, stage: str | None = None,
                 worker: int | None = None) -> None:
    """Who this process's lines are about (the fields of a JSON line)."""
    _who.update({k: v for k, v in (("run", run), ("stage", stage), ("worker", worker))
                 if v is not None})


def settings() -> dict[str, str]:
    """The log settings this process has, for the processes it starts."""
    return {name: os.environ[name] for name in (LEVEL_ENV, FORMAT_ENV) if name in os.environ}


def stamp(now: float | None = None) -> str:
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + \
        f".{int(now % 1 * 1000):03d}"


def line(message: str, level: str = "info", batch: int | None = None) -> str:
    """A podpipe line for a log ("" when the level is below the one asked for)."""
    if LEVELS[level] < LEVELS.get(os.environ.get(LEVEL_ENV, "info"), 20):
        return ""
    now = time.time()
    if os.environ.get(FORMAT_ENV) == "json":
        record = {"time": stamp(now), "level": level, "message": message, **_who}
        if batch is not None:
            record["batch"] = batch
        return json.dumps(record, ensure_ascii=False) + "\n"
    return f"{stamp(now)} {level.upper()} {message}\n"


def task_line(batch: int, what: str, detail: str = "") -> str:
    """`started`, `done` or `failed`, for the task of `batch`."""
    return line(f"batch {batch}: {what}" + (f" ({detail})" if detail else ""),
                "error" if what == "failed" else "info", batch)


def _record(text: str) -> dict[str, object] | None:
    if not text.startswith('{"time"'):
        return None
    try:
        found = json.loads(text)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


def time_of(text: str) -> str | None:
    """The timestamp a line starts with (sortable as text), or None."""
    record = _record(text)
    if record is not None:
        return str(record.get("time"))
    found = _STAMPED.match(text)
    return found.group(1) if found else None


def task_of(text: str) -> tuple[int, str] | None:
    """(batch, started|done|failed) of a task line, else None."""
    record = _record(text)
    found = (_TASK.match(str(record.get("message", ""))) if record is not None
             else _BATCH.match(text))
    return (int(found.group(1)), found.group(2)) if found else None


def append(path: Path, message: str, level: str = "info") -> None:
    """`message` as a line of the log file at `path` (made private); a log that cannot
    be written loses the line, never the run."""
    text = line(message, level)
    if not text:
        return
    try:
        with open(files.append_private(path), "a") as log:
            log.write(text)
    except OSError:
        pass
