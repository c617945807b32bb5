"""Live metrics for Prometheus, served by the conductor (`run --metrics-port`).

A collector over the run's latest status: each scrape reads the snapshot the
conductor last made (four times a second), so serving costs the run nothing
between scrapes. The HTTP server is prometheus-client's, on a thread of its own;
prometheus-client is imported only when metrics are asked for (a run without them
does not pay for its import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator

from podpipe.errors import UsageError
from podpipe.runtime.rundir.status import Status

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# per node: (metric, help, the status field, counter?)
_PER_NODE = (
    ("podpipe_batches_done", "Batches (keys) the node has finished", "batches_done", False),
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


class Metrics:
    def __init__(self, where: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        host, port = address(where)
        self.latest: Status | None = None  # the run's status, as last flushed
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

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.latest
        if s is None:
            return
        labels = ["pipeline", "pod", "node"]
        pod = str(s.pod.ordinal if s.pod else 0)
        for name, text, field, counter in _PER_NODE:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text,
                                                                             labels=labels)
            for node, st in s.stages.items():
                family.add_metric([s.pipeline, pod, node], getattr(st, field))
            yield family
        single = [("podpipe_scratch_bytes", "RAM scratch in use", s.scratch_bytes, False),
                  ("podpipe_scratch_budget_bytes", "The RAM scratch budget", s.budget_bytes,
                   False),
                  ("podpipe_scratch_peak_bytes", "The most RAM scratch in use so far",
                   s.peak_scratch_bytes, False),
                  ("podpipe_spilled_outputs", "Outputs spilled to the node tier",
                   s.spilled_outputs, True),
                  ("podpipe_running", "1 while the run goes", int(s.state == "running"),
                   False)]
        if s.durable:
            single += [("podpipe_durable_checkpoints", "Major checkpoints written",
                        s.durable.checkpoints or 0, True),
                       ("podpipe_durable_behind", "1 if the last checkpoint is not written",
                        int(bool(s.durable.behind)), False)]
        for name, text, value, counter in single:
            family = (CounterMetricFamily if counter else GaugeMetricFamily)(
                name, text, labels=["pipeline", "pod"])
            family.add_metric([s.pipeline, pod], value)
            yield family


class Watchers:
    """Who is shown each status the conductor flushes: the caller's observer (the
    terminal's live progress, the Python API's) and Prometheus, when asked for
    (`where`: `[ADDR:]PORT`), served from `open` to `close`."""

    def __init__(self, observer: Callable[[Status], None] | None, where: str | None) -> None:
        self.observer, self.where = observer, where
        self.metrics: Metrics | None = None

    def open(self) -> None:
        if self.where:
            self.metrics = Metrics(self.where)

    def show(self, status: Status) -> None:
        if self.metrics is not None:
            self.metrics.latest = status
        if self.observer is not None:
            self.observer(status)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
