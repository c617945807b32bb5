"""`podpipe report --format chrome-trace`: a run's timeline for Perfetto or
chrome://tracing, from the same records as the HTML report (`report.pods_of`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from podpipe.report import pods_of


def chrome_trace(run_dir: Path) -> dict[str, Any]:
    """The timeline in the Trace Event Format (Perfetto, chrome://tracing): a process
    per pod, a thread per node's worker, a complete event per task and per wait for
    RAM, and counter tracks from the samples (RAM scratch, each node's queue and
    cores). A resume's attempt follows the one before it on the time axis."""
    events: list[dict[str, Any]] = []
    for pid, pod in enumerate(pods_of(run_dir)):
        events.append({"ph": "M", "name": "process_name", "pid": pid,
                       "args": {"name": pod.title or pod.status.pipeline}})
        lanes = sorted({(t.node, t.worker) for t in pod.tasks + pod.setups})
        tid = {lane: i for i, lane in enumerate(lanes)}
        for (node, worker), i in tid.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": i,
                           "args": {"name": node if worker == 0 else f"{node}.{worker}"}})
        offset = 0.0
        for attempt in pod.attempts:
            def us(t: float) -> int:
                return round((offset + t) * 1e6)
            for t in attempt.tasks:
                lane = tid[(t.node, t.worker)]
                events.append({"ph": "X", "name": f"batch {t.batch}", "cat": t.node,
                               "pid": pid, "tid": lane, "ts": us(t.handed),
                               "dur": round((t.ended - t.handed) * 1e6),
                               "args": {"state": t.state, "version": t.version,
                                        "rows_out": t.rows_out, "attempt": attempt.number}})
                if t.asked is not None and t.granted is not None:
                    events.append({"ph": "X", "name": "waiting for RAM", "cat": "ram",
                                   "pid": pid, "tid": lane, "ts": us(t.asked),
                                   "dur": round((t.granted - t.asked) * 1e6)})
            for t in attempt.setups:
                events.append({"ph": "X", "name": "setting up", "cat": t.node, "pid": pid,
                               "tid": tid[(t.node, t.worker)], "ts": us(t.handed),
                               "dur": round((t.ended - t.handed) * 1e6),
                               "args": {"version": t.version, "attempt": attempt.number}})
            for x in attempt.samples:
                for name, args in (("RAM scratch (bytes)", {"in use": x.peak,
                                                            "budget": x.budget}),
                                   ("queue (batches)", x.queues), ("cores", x.cpu)):
                    if args:
                        events.append({"ph": "C", "name": name, "pid": pid, "ts": us(x.t),
                                       "args": dict(args)})
            offset += attempt.elapsed
    return {"traceEvents": events, "displayTimeUnit": "ms"}
