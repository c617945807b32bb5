"""Live metrics for Prometheus, served by the conductor (`run --metrics-port`).

A collector over the run's latest status: each scrape reads the snapshot the
conductor last made (four times a second), so serving costs the run nothing
between scrapes. The HTTP server is prometheus-client's, on a thread of its own;
prometheus-client is imported only when metrics are asked for (a run without them
does not pay for its import).

Names follow Prometheus's rules: counters end in `_total` (prometheus-client adds
it), units are in the names, and no label is one a scrape adds to the target (`pod`,
`job`, `instance`, `namespace`, `container`): a pod's ordinal is `replica`, and the
run (a job of a standing line) is `podpipe_job`. A line (`up --metrics-port`) serves
one endpoint for its life: the running (else the last) job's series, and its own
`podpipe_line_jobs{state}` and `podpipe_line_jobs_ended_total{state}`. Each node's task durations are
a histogram. `--metrics-linger` keeps the endpoint up a while after the run ends, so
that a scrape every 15 s sees its last values.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

from podpipe.errors import UsageError
from podpipe.runtime.rundir.status import Status

if TYPE_CHECKING:
    from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                        HistogramMetricFamily)

# per node: (metric, help, the status field, counter?)
_PER_NODE = (
    ("podpipe_batches_done", "Batches (keys) the node has finished", "batches_done", True),
    ("podpipe_batches", "Batches (keys) the node runs in this pod", "batches_total", False),
    ("podpipe_rows_in", "Rows the node has read", "rows_in", True),
    ("podpipe_rows_out", "Rows the node has written", "rows_out", True),
    ("podpipe_bytes_written", "Bytes the node has written to RAM scratch", "bytes_written",
     True),
    ("podpipe_busy_seconds", "Seconds the node's processes spent on tasks", "busy_seconds",
     True),
    ("podpipe_restarts", "Restarts of the node's processes", "restarts", True),
    ("podpipe_workers", "Processes the node runs now", "workers", False),
    ("podpipe_queue_length", "Batches ready that no worker of the node has taken", "queued",
     False),
    ("podpipe_tasks_in_flight", "Tasks the node's processes are on", "in_flight", False),
)


def address(text: str) -> tuple[str, int]:
    """`PORT` (on loopback) or `ADDR:PORT` (`0.0.0.0:9400` for a pod)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise UsageError(f"--metrics-port {text!r}: expected PORT or ADDR:PORT, such as 9400 "
                         "or 0.0.0.0:9400")
    return host or "127.0.0.1", number


# upper bounds of the task duration histogram's buckets, in seconds
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
LABELS = ["pipeline", "replica", "podpipe_job"]  # on every series


class Metrics:
    def __init__(self, where: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = address(where)
        # each run's status as last flushed, by run id (a line's: each job on it, and
        # those over until another job starts)
        self.latest: dict[str, Status] = {}
        # a standing line's own figures: (line, jobs queued, running, done, failed)
        self.line: Callable[[], tuple[str, int, int, int, int]] | None = None
        # run -> node -> tasks per bucket (the last: beyond every bound), and seconds
        self.durations: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
        self._over: set[str] = set()
        self.registry = CollectorRegistry()
        self.registry.register(self)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-port {where}: cannot listen there: "
                             f"{exc.strerror}") from None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def opened(self, run: str) -> None:
        """Run `run` starts: the series of those over go."""
        for gone in self._over:
            self.latest.pop(gone, None)
            self.durations.pop(gone, None)
        self._over = set()
        self.durations[run] = {}

    def closed(self, run: str) -> None:
        """Run `run` is over: its last values stay until another starts."""
        self._over.add(run)

    def task_done(self, run: str, node: str, seconds: float) -> None:
        counts, total = self.durations.setdefault(run, {}).setdefault(
            node, ([0] * (len(BUCKETS) + 1), [0.0]))
        counts[next((i for i, bound in enumerate(BUCKETS) if seconds <= bound),
                    len(BUCKETS))] += 1
        total[0] += seconds

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily |
                                  HistogramMetricFamily]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)

        if self.line is not None:
            yield from _line_families(*self.line())
        statuses = list(self.latest.values())
        labels = {s.run_id: [s.pipeline, str(s.pod.ordinal if s.pod else 0), s.run_id]
                  for s in statuses}
        for name, text, field, counter in _PER_NODE:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                name, text, labels=LABELS + ["node"])
            for s in statuses:
                for node, st in s.stages.items():
                    family.add_metric(labels[s.run_id] + [node], getattr(st, field))
            yield family
        histogram = HistogramMetricFamily(
            "podpipe_task_duration_seconds", "Seconds each task of the node took",
            labels=LABELS + ["node"])
        for s in statuses:
            for node, (counts, total) in sorted(dict(self.durations.get(s.run_id, {})).items()):
                counts, so_far = list(counts), 0  # (a copy: the run adds on)
                buckets = []
                for bound, count in zip([*map(str, BUCKETS), "+Inf"], counts):
                    so_far += count
                    buckets.append((bound, so_far))
                histogram.add_metric(labels[s.run_id] + [node], buckets, total[0])
        yield histogram
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for s in statuses:
            for name, text, value, counter in _single(s):
                family = families.setdefault(name, (
                    CounterMetricFamily if counter else GaugeMetricFamily)(
                        name, text, labels=LABELS))
                family.add_metric(labels[s.run_id], value)
        yield from families.values()


def _single(s: Status) -> list[tuple[str, str, float, bool]]:
    """A run's series without a node: name, help, value, a counter?"""
    single: list[tuple[str, str, float, bool]] = [
        ("podpipe_scratch_bytes", "RAM scratch in use", s.scratch_bytes, False),
        ("podpipe_scratch_budget_bytes", "The RAM scratch budget", s.budget_bytes, False),
        ("podpipe_scratch_peak_bytes", "The most RAM scratch in use so far",
         s.peak_scratch_bytes, False),
        ("podpipe_spilled_outputs", "Outputs spilled to the node tier", s.spilled_outputs,
         True),
        ("podpipe_running", "1 while the run goes", int(s.state == "running"), False)]
    if s.durable:
        single += [("podpipe_durable_checkpoints", "Major checkpoints written",
                    s.durable.checkpoints or 0, True),
                   ("podpipe_durable_behind", "1 if the last checkpoint is not written",
                    int(bool(s.durable.behind)), False)]
    return single


def _line_families(line: str, queued: int, running: int, done: int,
                   failed: int) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """A standing line's jobs: queued and running now, done and failed so far."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    jobs = GaugeMetricFamily("podpipe_line_jobs", "The line's jobs now, by state",
                             labels=["line", "state"])
    jobs.add_metric([line, "queued"], queued)
    jobs.add_metric([line, "running"], running)
    yield jobs
    ended = CounterMetricFamily("podpipe_line_jobs_ended", "The line's jobs that ended, "
                                "by how", labels=["line", "state"])
    ended.add_metric([line, "succeeded"], done)
    ended.add_metric([line, "failed"], failed)
    yield ended


class Watchers:
    """Who is shown each status the conductor flushes: the caller's observer (the
    terminal's live progress, the Python API's) and Prometheus, when asked for
    (`where`: `[ADDR:]PORT`), served from `open` to `close`."""

    def __init__(self, run: str, observer: Callable[[Status], None] | None,
                 where: str | None, linger: float = 0.0, lent: Metrics | None = None) -> None:
        """`lent`: a standing line's endpoint, serving each of its jobs."""
        self.run, self.observer, self.where, self.linger = run, observer, where, linger
        self.metrics, self.lent = lent, lent is not None

    def open(self) -> None:
        if self.metrics is None and self.where:
            self.metrics = Metrics(self.where)
        if self.metrics is not None:
            self.metrics.opened(self.run)

    def show(self, status: Status) -> None:
        if self.metrics is not None:
            self.metrics.latest[self.run] = status
        if self.observer is not None:
            self.observer(status)

    def task_done(self, node: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.task_done(self.run, node, seconds)

    def close(self) -> None:
        """The run ended: the endpoint goes, after `linger` seconds (its final values
        are served meanwhile); never, for a pod that holds once its run is over (the
        endpoint goes with the process)."""
        if self.metrics is not None and self.lent:
            self.metrics.closed(self.run)
        elif self.metrics is not None and self.linger != float("inf"):
            time.sleep(self.linger)
            self.metrics.close()
