"""A standing line's jobs to come, in order: each a file in the line's `queue/`
folder (its sequence number and job id, holding the job's run directory), so that
the queue outlives the line's process — the next `up` of the line queues them
again (`requeue`), the job it was running first."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from podpipe.errors import PodpipeError, UsageError
from podpipe.model import spec as specs
from podpipe.runtime.conductor import Conductor
from podpipe.runtime.conductor.agents import Conn
from podpipe.runtime.plumbing import files, logline
from podpipe.runtime.rundir import layout as rundir


@dataclass
class Job:
    job: str
    run_path: Path
    overrides: list[str]
    pipeline: specs.Pipeline
    sinks: frozenset[str]  # where it writes: no other job on the line may
    queued_as: Path        # its file in queue/
    waiters: list[Conn] = field(default_factory=list)
    stop: bool = False
    conductor: Conductor | None = None  # once it started
    scratch: Path | None = None  # its folder of the line's RAM scratch, once it started
    started: float = field(default_factory=time.time)


class Queue:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._jobs: deque[Job] = deque()
        self._seq = 0

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(self._jobs)

    def popleft(self) -> Job:
        return self._jobs.popleft()

    def remove(self, job: Job) -> None:
        self._jobs.remove(job)

    def add(self, run_path: Path, overrides: list[str], pipeline: specs.Pipeline) -> Job:
        """The job at `run_path` last in the queue, and its file in queue/ (what the
        line's next `up` finds, and `status LINE` lists)."""
        queued_as = self.folder / f"{self._seq:08d}-{run_path.name}"
        self._seq += 1
        files.publish(queued_as, str(run_path))
        job = Job(run_path.name, run_path, overrides, pipeline, sinks(pipeline), queued_as)
        self._jobs.append(job)
        return job

    def requeue(self, runs: Path, log: logline.Log) -> None:
        """Jobs a line of this name had queued when it went down (run directories in
        `runs`): queued again, in their order."""
        for entry in sorted(self.folder.iterdir()):
            seq, _, job = entry.name.partition("-")
            if not seq.isdigit():
                continue  # (a file being written when the line went)
            self._seq = max(self._seq, int(seq) + 1)
            try:
                run_path = Path(files.read_ours(entry).decode())
                if run_path.parent != runs or run_path.name != job:  # (its own, no other)
                    raise UsageError(f"names {run_path}, not a run directory in {runs}")
                recorded = rundir.read(run_path)
                pipeline = specs.load(run_path / "spec.yaml", recorded.overrides)
            except (OSError, files.NotOurs, PodpipeError) as exc:
                log(f"{entry.name}: not queued again ({exc})", "warning")
                entry.unlink(missing_ok=True)
                continue
            rundir.lock(run_path)
            self._jobs.append(Job(run_path.name, run_path, recorded.overrides, pipeline,
                                  sinks(pipeline), entry))


def sinks(pipeline: specs.Pipeline) -> frozenset[str]:
    """Where a job's sinks write, as comparable as the spec lets them be."""
    return frozenset(s.uri if "://" in s.uri else os.path.abspath(s.uri) + "/"
                     for s in pipeline.sinks)
