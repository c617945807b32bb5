"""The run's status file: `RUN_DIR/status.json`, rewritten atomically while it runs.

`podpipe status` reads only this file, so it works from the run directory alone,
with or without a live conductor. A run that says `running` but whose conductor
process is gone is reported as `interrupted`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from podpipe.errors import UsageError
from podpipe.runtime import files
from podpipe.runtime.scratch import alive

FILE = "status.json"


SCHEMA_VERSION = 1  # of the status record (`schemaVersion`)


def write(run_dir: Path, status: dict[str, Any]) -> None:
    files.publish(run_dir / FILE, json.dumps(status, indent=2))


def read(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    try:
        status = json.loads((run_dir / FILE).read_text())
    except FileNotFoundError:
        kind = "no such directory" if not run_dir.is_dir() else f"has no {FILE}"
        raise UsageError(f"{run_dir}: not a podpipe run directory ({kind})") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{run_dir / FILE}: unreadable status: {exc}") from None
    if status.get("state") == "running":
        # The process that writes the file: a pod's conductor, or the process that
        # started every replica (runtime.replicas).
        owner = status.get("controller") or next(
            (p for p in status.get("processes", []) if p.get("role") == "conductor"), None)
        if owner is None or not alive(owner["pid"], owner.get("start")):
            status["state"] = "interrupted"
    return status
