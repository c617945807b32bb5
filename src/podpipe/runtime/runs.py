"""Finding and following runs from another shell: `latest`, `runs`, `wait`, `logs`.

Runs started without `--run-dir` live in `<checkpoints.node>/runs/<run id>` (by
default `.podpipe/runs`), where `latest` is a link to the newest. Anything that takes
a RUN_DIR also takes `latest`, meaning `.podpipe/runs/latest` under the working
directory.
"""

from __future__ import annotations

import os
import select
from pathlib import Path
from typing import Any, Iterator

from podpipe.errors import INTERRUPTED_EXIT_CODE, UsageError
from podpipe.runtime import status

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


def listing(runs_dir: str | None = None) -> list[dict[str, Any]]:
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
            current = status.read(path)
        except UsageError:
            continue  # not a run directory (or one being made)
        found.append({"run_id": current["run_id"], "pipeline": current["pipeline"],
                      "state": current["state"], "started": current["started"],
                      "elapsed_seconds": current["elapsed_seconds"], "run_dir": str(path)})
    return sorted(found, key=lambda r: r["started"], reverse=True)


def wait(run_dir: str, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
    """Block until the run ends (on its process's exit, not by polling); returns its
    own exit code and its final status. TIMED_OUT if it is still running then."""
    path = resolve(run_dir)
    current = status.read(path)
    if current["state"] == "running":
        owner = current.get("controller") or next(
            p for p in current["processes"] if p["role"] == "conductor")
        try:
            pidfd = os.pidfd_open(owner["pid"])
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
    return EXIT_CODES.get(current["state"], 1), current


def logs(run_dir: str, stage: str | None = None) -> Iterator[str]:
    """The run's logs, line by line, each prefixed by its process (and pod, for a run
    of several replicas); one stage's only with `stage`."""
    path = resolve(run_dir)
    status.read(path)  # a clear error if it is no run directory
    folders = [("", path / "logs")] + [(f"pod {p.name} ", p / "logs")
                                       for p in sorted((path / "pods").glob("*"))]
    found = False
    for prefix, folder in folders:
        for log in sorted(folder.glob("*.log")):
            if stage is not None and log.stem != stage:
                continue
            found = True
            with open(log, errors="replace") as f:
                for line in f:
                    yield f"[{prefix}{log.stem}] {line.rstrip()}"
    if not found:
        known = sorted({log.stem for _, folder in folders for log in folder.glob("*.log")})
        raise UsageError(f"{path}: no log of {stage!r}; the run has logs of {known}"
                         if stage else f"{path}: the run has no logs yet")
