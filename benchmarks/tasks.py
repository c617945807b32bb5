"""What a task costs podpipe itself: the conductor's CPU and the round trip per task.

A line of identity stages (each returns its input) over tiny batches (1,000 rows of
four columns), so that nearly all the work is podpipe's: handing the task over,
the agent mapping its input and writing its output, the RAM grant, the journal,
the status. The run goes through the Python API in this process, so this
process's CPU time (`getrusage`) is the conductor's, its threads included. Per task:
the conductor's CPU, and from the run's task record the median round trip (the
conductor handing the task over to hearing it done). Writes results/tasks.json.

    python benchmarks/tasks.py [--batches 2000] [--stages 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
ROWS = 1_000


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import podpipe

    work = Path(tempfile.mkdtemp(prefix="tasks-bench-"))
    try:
        rows = args.batches * ROWS
        pq.write_table(pa.table({"a": pa.array(range(rows), pa.int64()),
                                 "b": pa.array(range(rows), pa.float64()),
                                 "c": pa.array([i % 7 for i in range(rows)], pa.int32()),
                                 "d": pa.array(range(rows), pa.int64())}),
                       work / "data.parquet", row_group_size=ROWS)
        previous = "source"
        stages = []
        for i in range(args.stages):
            stages.append({"name": f"s{i}", "run": "benchmarks.workloads.bottleneck:identity",
                           "inputs": [previous], "workers": 1})
            previous = f"s{i}"
        spec = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline",
                "metadata": {"name": "tasks"},
                "spec": {"source": {"uri": str(work / "data.parquet"), "batchRows": ROWS,
                                    "workers": 1},
                         "stages": stages,
                         "sinks": [{"input": previous, "uri": str(work / "out"),
                                    "workers": 1}],
                         "memory": "512MiB"}}
        runs = []
        for attempt in range(args.repeat):
            shutil.rmtree(work / "out", ignore_errors=True)
            started, cpu = time.perf_counter(), _cpu()
            run = podpipe.run(spec, run_dir=str(work / f"run{attempt}"))
            seconds, cpu = time.perf_counter() - started, _cpu() - cpu
            done = [json.loads(line) for line in
                    (work / f"run{attempt}" / "tasks.jsonl").read_text().splitlines()]
            trips = [t["ended"] - t["handed"] for t in done]
            runs.append({"seconds": seconds, "tasks": len(done),
                         "conductor_cpu_ms_per_task": 1000 * cpu / len(done),
                         "round_trip_ms_median": 1000 * statistics.median(trips),
                         "tasks_per_second": len(done) / seconds})
            assert run.status["state"] == "succeeded"
        assert pq.read_table(work / "out").num_rows == rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {key: statistics.median(r[key] for r in runs)
               for key in ("seconds", "conductor_cpu_ms_per_task", "round_trip_ms_median",
                           "tasks_per_second")}
    result = {"benchmark": "podpipe's own cost per task", "batches": args.batches,
              "batch_rows": ROWS, "stages": args.stages, "tasks": runs[0]["tasks"],
              "runs": runs, "median": summary}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tasks.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{runs[0]['tasks']} tasks ({args.batches} batches of {ROWS:,} rows, source, "
          f"{args.stages} identity stages, sink), median of {args.repeat}: "
          f"{summary['seconds']:.2f} s, {summary['tasks_per_second']:.0f} tasks/s, "
          f"conductor CPU {summary['conductor_cpu_ms_per_task']:.3f} ms per task, "
          f"round trip {summary['round_trip_ms_median']:.3f} ms (median task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
