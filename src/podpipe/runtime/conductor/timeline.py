"""The run's timeline as it happens: `tasks.jsonl` and `samples.jsonl`
(`rundir.records` defines their records), buffered and flushed with the status.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO

import msgspec

from podpipe.engine.events import Progress
from podpipe.runtime.plumbing import files, protocol
from podpipe.runtime.rundir.records import (SAMPLES, SETUP, TASKS, SampleRecord, TaskRecord,
                                            read)


class Timeline:
    def __init__(self, run_dir: Path, started: float) -> None:
        self.started = started
        # a resume appends to the records of the attempts before it, as the next one
        before = read(run_dir / SAMPLES, SampleRecord) + read(run_dir / TASKS, TaskRecord)
        self.attempt = 1 + max((r.attempt for r in before), default=0)
        self._tasks: IO[bytes] = open(files.append_private(run_dir / TASKS), "ab")
        self._samples: IO[bytes] = open(files.append_private(run_dir / SAMPLES), "ab")
        self._open: dict[str, TaskRecord] = {}  # agent -> its task so far
        self._encode = msgspec.json.Encoder().encode

    def _now(self) -> float:
        return round(time.time() - self.started, 4)

    def handed(self, agent: str, batch: int, version: str | None, nbytes_in: int) -> None:
        node, worker = protocol.split_name(agent)
        self._open[agent] = TaskRecord(node=node, worker=worker, batch=batch,
                                       version=version, handed=self._now(),
                                       bytes_in=nbytes_in, attempt=self.attempt)

    def asked(self, agent: str) -> None:
        if agent in self._open:
            self._open[agent].asked = self._now()

    def granted(self, agent: str) -> None:
        if agent in self._open:
            self._open[agent].granted = self._now()

    def ended(self, agent: str, state: str, stats: protocol.Stats | None = None,
              checksum: str = "") -> None:
        """The agent's task ended: done (its output's `checksum`, if hashed), failed,
        denied (its RAM), lost (its process)."""
        if stats is not None:  # set up first? (a class's setupInputs)
            self.setup(agent, None, stats.setup, at_task=True)
        task = self._open.pop(agent, None)
        if task is None:
            return
        task.ended, task.state, task.checksum = self._now(), state, checksum
        if stats is not None:
            task.rows_in, task.rows_out, task.bytes_out = (stats.rows_in, stats.rows_out,
                                                           stats.bytes_out)
        self._append(self._tasks, self._encode(task))

    def setup(self, agent: str, version: str | None, seconds: float, *,
              at_task: bool = False) -> None:
        """A process set its stage up in `seconds` (a class's setup): a bar of its own,
        ending as it said hello, or (`at_task`) starting with its open task; none for
        a process that set nothing up (`seconds` 0)."""
        if not seconds:
            return
        node, worker = protocol.split_name(agent)
        task = self._open.get(agent)
        start = (task.handed if at_task and task is not None else
                 max(0.0, self._now() - seconds))
        self._append(self._tasks, self._encode(TaskRecord(
            node=node, worker=worker, batch=-1,
            version=version if version is not None else task.version if task else None,
            handed=round(start, 4), ended=round(start + seconds, 4), state=SETUP,
            attempt=self.attempt)))

    def sample(self, progress: Progress, cpu: dict[str, float], rss: dict[str, int]) -> None:
        """`progress`: the engine's, made for this sample (its peak is the most since
        the previous one); `cpu`, `rss`: each node's processes' cores and bytes."""
        line = SampleRecord(t=self._now(), scratch=progress.scratch, peak=progress.recent_peak,
                            budget=progress.budget, on_line=progress.on_line,
                            queues=progress.queued, workers=progress.workers,
                            cpu={n: round(c, 3) for n, c in cpu.items()}, rss=rss,
                            attempt=self.attempt)
        self._append(self._samples, self._encode(line))

    @staticmethod
    def _append(f: IO[bytes], line: bytes) -> None:
        try:
            f.write(line + b"\n")
        except OSError:
            pass  # a view (a full disk, say): the run does not depend on it

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
