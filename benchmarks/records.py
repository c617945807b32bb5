"""What the benchmarks read back from a run and write out: a node's finished tasks
(the run directory's `tasks.jsonl`) and a result file with the figures it prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def done_tasks(run_dir: Path, node: str) -> list[dict[str, Any]]:
    """`node`'s tasks that ended done (times in seconds since the run started)."""
    tasks = [json.loads(line) for line in (run_dir / "tasks.jsonl").read_text().splitlines()]
    return [t for t in tasks if t["node"] == node and t["state"] == "done"]


def per_batch_seconds(run_dir: Path, node: str) -> list[float]:
    """The stage's own time for each batch: its task granted RAM to its end."""
    return [t["ended"] - t["granted"] for t in done_tasks(run_dir, node)]


def save(out: Path, result: dict[str, Any], shown: tuple[str, ...]) -> None:
    """`result` written to `out` (its folder made), the `shown` figures printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in shown}))
