"""The run's record of when things happened, for `podpipe report`.

`RUN_DIR/tasks.jsonl`: a line per task once it ends (done, failed, denied RAM, or
lost with its process): node, worker, batch, version; when it was handed out, asked
for RAM, was granted it, and ended (seconds since the run started); rows and bytes
in and out. `RUN_DIR/samples.jsonl`: four times a second, the RAM scratch in use
(and the most it reached since the previous sample, so that the highest sample
is the run's peak), the budget, the batches on the line, each node's queue and
workers. Both are appended to (buffered, flushed with the status) and never
rewritten; a resumed run appends its own, from its own start.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import msgspec

from podpipe.engine.state import RunState
from podpipe.runtime.plumbing import files, protocol

TASKS, SAMPLES = "tasks.jsonl", "samples.jsonl"


class Timeline:
    def __init__(self, run_dir: Path, started: float) -> None:
        self.started = started
        self._tasks: IO[bytes] = open(files.append_private(run_dir / TASKS), "ab")
        self._samples: IO[bytes] = open(files.append_private(run_dir / SAMPLES), "ab")
        self._open: dict[str, dict[str, Any]] = {}  # agent -> its task so far
        self._encode = msgspec.json.Encoder().encode

    def _now(self) -> float:
        return round(time.time() - self.started, 4)

    def handed(self, agent: str, batch: int, version: str | None, nbytes_in: int) -> None:
        node, worker = protocol.split_name(agent)
        self._open[agent] = {"node": node, "worker": worker, "batch": batch,
                             "version": version, "handed": self._now(), "asked": None,
                             "granted": None, "bytes_in": nbytes_in}

    def asked(self, agent: str) -> None:
        if agent in self._open:
            self._open[agent]["asked"] = self._now()

    def granted(self, agent: str) -> None:
        if agent in self._open:
            self._open[agent]["granted"] = self._now()

    def ended(self, agent: str, state: str, stats: protocol.Stats | None = None) -> None:
        """The agent's task ended: done, failed, denied (its RAM), lost (its process)."""
        task = self._open.pop(agent, None)
        if task is None:
            return
        task.update(ended=self._now(), state=state,
                    rows_in=stats.rows_in if stats else 0,
                    rows_out=stats.rows_out if stats else 0,
                    bytes_out=stats.bytes_out if stats else 0)
        self._tasks.write(self._encode(task) + b"\n")

    def sample(self, engine: RunState) -> None:
        budget = engine.budget
        line = {"t": self._now(), "scratch": budget.usage, "peak": budget.recent,
                "budget": budget.limit, "on_line": len(budget.on_line),
                "queues": {n: len(q) for n, q in engine.ready.items()},
                "workers": {n: engine.worker_count(n) for n in engine.graph.order}}
        budget.recent = budget.usage
        self._samples.write(self._encode(line) + b"\n")

    def flush(self) -> None:
        for f in (self._tasks, self._samples):
            try:
                f.flush()
            except OSError:
                pass  # a view: the run does not depend on it

    def close(self) -> None:
        for agent in list(self._open):
            self.ended(agent, "unfinished")
        self.flush()
        self._tasks.close()
        self._samples.close()
