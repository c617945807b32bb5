"""The run as `status.json` shows it: per-stage counters, and the snapshot of everything.

`Counters` adds up what agents report per task (rows, busy time, bytes) and the
versions they ran; `snapshot` puts it together with the engine's progress, the
processes and the tiers into the status record (`runtime.status`).
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from podpipe.engine.events import Progress
from podpipe.model.graph import Graph
from podpipe.model.output import TIERS
from podpipe.model.pipeline import SOURCE
from podpipe.runtime.plumbing import protocol
from podpipe.runtime.rundir import status
from podpipe.runtime.conductor.checkpoints import Checkpoints
from podpipe.runtime.conductor.run import Run
from podpipe.runtime.data.scratch import process_start

if TYPE_CHECKING:
    from podpipe.runtime.data.sink import Written


@dataclass
class _Stage:
    rows_in: int = 0
    rows_out: int = 0
    busy: float = 0.0
    wanted: float = 0.0     # of a core, as its tasks said (ran, or waited for a core)
    setup: float = 0.0      # the longest setup of one of its processes (a class stage)
    bytes_written: int = 0
    bytes_read: int = 0
    reused: int = 0
    reading: dict[int, int] = field(default_factory=dict)  # batch -> bytes its task maps
    version: str | None = None
    versions: dict[str, int] = field(default_factory=dict)  # version -> batches
    calls: "_Calls | None" = None  # a call stage's requests


@dataclass
class _Calls:
    requests: int = 0
    memo_hits: int = 0
    retries: int = 0
    failures: int = 0
    in_flight_max: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    now: dict[str, int] = field(default_factory=dict)  # agent -> requests in flight

    def add(self, calls: protocol.CallStats) -> None:
        self.requests += calls.requests
        self.memo_hits += calls.memo_hits
        self.retries += calls.retries
        self.failures += calls.failures
        self.in_flight_max = max(self.in_flight_max, calls.in_flight_max)
        self.latencies.extend(calls.latencies)

    def status(self) -> status.CallStatus:
        p50 = p99 = None
        if len(self.latencies) == 1:
            p50 = p99 = self.latencies[0]
        elif self.latencies:
            cuts = statistics.quantiles(self.latencies, n=100)
            p50, p99 = cuts[49], cuts[98]
        return status.CallStatus(
            requests=self.requests, memo_hits=self.memo_hits, retries=self.retries,
            failures=self.failures, in_flight=sum(self.now.values()),
            in_flight_max=self.in_flight_max,
            latency_p50=None if p50 is None else round(p50, 5),
            latency_p99=None if p99 is None else round(p99, 5))


class Counters:
    def __init__(self, graph: Graph) -> None:
        self.stages = {node: _Stage() for node in graph.order}
        self.tasks: dict[str, int] = {}  # agent -> tasks handed out, to tell them apart
        self.started = time.time()
        self.ended: float | None = None
        self.sinks: dict[str, Written] = {}  # what each sink wrote, once the run succeeded
        self._sampled: tuple[float, dict[str, float]] = (time.monotonic(), {})

    def cpu_wanted(self) -> dict[str, float]:
        """Each node's cores since the last call, from what its tasks said they
        wanted: what `workers: auto` judges containers by, whose processes the conductor
        cannot see (a task's seconds count when it ends)."""
        now, wanted = time.monotonic(), {n: s.wanted for n, s in self.stages.items()}
        then, before = self._sampled
        self._sampled = (now, wanted)
        return {n: (w - before.get(n, 0.0)) / max(now - then, 1e-3) for n, w in wanted.items()}

    def add(self, node: str) -> None:
        self.stages.setdefault(node, _Stage())

    def hello(self, node: str, version: str, setup: float = 0.0) -> None:
        """A process of `node` is up, running `version`; its setup took `setup` s."""
        s = self.stages[node]
        s.version, s.setup = version, max(s.setup, setup)

    def dispatched(self, node: str, agent: str, batch: int, nbytes: int) -> int:
        """Count a task handed out to `agent`; returns its number (per agent)."""
        self.stages[node].reading[batch] = nbytes
        self.tasks[agent] = self.tasks.get(agent, 0) + 1
        return self.tasks[agent]

    def calling(self, agent: str, in_flight: int) -> None:
        """A call stage's worker says how many requests it has in flight now."""
        s = self.stages[protocol.split_name(agent)[0]]
        if s.calls is not None or in_flight:
            s.calls = s.calls or _Calls()
            s.calls.now[agent] = in_flight

    def failed(self, agent: str, calls: protocol.CallStats | None) -> None:
        """Count what a failed task's requests did (a call stage's)."""
        self._task_over(agent, calls)

    def _task_over(self, agent: str, calls: protocol.CallStats | None) -> None:
        s = self.stages[protocol.split_name(agent)[0]]
        if calls is not None:
            s.calls = s.calls or _Calls()
            s.calls.add(calls)
        if s.calls is not None:
            s.calls.now[agent] = 0  # its task is over: nothing of it in flight

    def done(self, agent: str, batch: int, stats: protocol.Stats) -> str:
        """Count a task `agent` finished; returns the version that did it."""
        s = self.stages[protocol.split_name(agent)[0]]
        self._task_over(agent, stats.calls)
        s.rows_in += stats.rows_in
        s.rows_out += stats.rows_out
        s.busy += stats.busy
        s.wanted += stats.wanted or 0.0
        s.bytes_read += s.reading.pop(batch, 0)
        s.bytes_written += stats.bytes_out
        s.reused += stats.reused
        s.setup = max(s.setup, stats.setup)  # (a class set up at its first task)
        version = s.version or ""
        s.versions[version] = s.versions.get(version, 0) + 1
        return version


def kind(node: str, graph: Graph) -> str:
    if node == SOURCE:
        return "source"
    if node in graph.sinks:
        return "sink"
    if node in graph.tables:
        return "table"
    if node in graph.calls:
        return "call"
    return "reduce" if node in graph.reduce else "stage"


def snapshot(run: Run, progress: Progress, counters: Counters, checkpoints: Checkpoints,
             processes: list[status.ProcessInfo], state: str, error: str | None,
             shadows: dict[str, status.ShadowStatus] | None = None) -> status.Status:
    """The status record of this pod's run, as it is now (`shadows`: stages'
    candidates)."""
    me, graph, placement = os.getpid(), run.graph, run.placement
    listed = [status.ProcessInfo("conductor", None, me, run.pod, start=process_start(me)),
              *processes]
    stages = {}
    for node in graph.order:
        s, p = counters.stages[node], progress.nodes[node]
        stages[node] = status.StageStatus(
            kind=kind(node, graph), version=s.version, versions=s.versions,
            held=p.held, batches_done=p.done, batches_total=p.total,
            rows_in=s.rows_in, rows_out=s.rows_out, busy_seconds=round(s.busy, 4),
            setup_seconds=round(s.setup, 4),
            bytes_written=s.bytes_written, bytes_read=s.bytes_read,
            restarts=p.restarts,
            restored={tier: checkpoints.restored.get(node, {}).get(tier, 0) for tier in TIERS},
            recomputed=checkpoints.recomputed.get(node, 0), reused=s.reused,
            nondeterministic=sorted(checkpoints.verdicts.nondeterministic.get(node, ())),
            workers=p.workers, workers_max=p.workers_max, queued=p.queued,
            in_flight=p.in_flight, tier=p.tier,
            calls=s.calls.status() if s.calls is not None else None,
            shadow=(shadows or {}).get(node))
    ended = counters.ended
    durable = checkpoints.durable
    return status.Status(
        run_id=run.run_id, pipeline=run.pipeline.name, state=state, error=error,
        run_dir=str(run.run_dir), scratch=str(run.scratch.socket.parent),
        started=counters.started, ended=ended,
        elapsed_seconds=round((ended or time.time()) - counters.started, 3),
        budget_bytes=run.pipeline.memory, scratch_bytes=progress.scratch,
        peak_scratch_bytes=progress.peak, source_batches=len(run.plan),
        spilled_outputs=progress.spills,
        pod=status.PodInfo(placement.ordinal, placement.replicas, progress.shards_here,
                           progress.waiting_for),
        shards=placement.shards, processes=listed, stages=stages,
        sinks={name: status.SinkInfo(w.uri, w.files, w.rows, w.nbytes)
               for name, w in counters.sinks.items()},
        restore_notes=list(checkpoints.notes), resumed_done=checkpoints.done_before,
        durable=status.DurableInfo(**durable.status()) if durable else None,
        node_tier=status.NodeTierInfo(checkpoints.copies,  # journaled
                                      ([checkpoints.journal.error] if checkpoints.journal.error
                                       else []) + checkpoints.node_tier.errors[-5:]))
