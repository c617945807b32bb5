"""Workers per node: fixed counts against `auto`, on a line with one bottleneck.

Two workloads, each source -> light -> BOTTLENECK -> light -> sink over synthetic
data:
- `cpu`: the bottleneck sorts each batch several times (CPU-bound), 24 batches;
- `io`: the bottleneck waits 50 ms per batch (I/O-bound), 64 batches.
Each is run with the bottleneck at `workers: 1`, `2`, `8` and `auto` (every other
node `auto`), whole process, alternating, `--repeat` times. Prints the medians of
the whole run and of the bottleneck's span (its first task's start to its last
task's end, from the run's logs: its throughput), their ratios to one worker, and
writes results/workers.json.

    python benchmarks/workers.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
WORKLOADS = {"cpu": ("benchmarks.workloads.bottleneck:crunch", 24, 100_000),
             "io": ("benchmarks.workloads.bottleneck:wait", 64, 1_000)}
SETTINGS = (1, 2, 8, "auto")


def _spec(folder: Path, bottleneck: str, rows: int, workers) -> Path:
    stages = [{"name": "first", "run": "benchmarks.workloads.bottleneck:light",
               "inputs": ["source"]},
              {"name": "bottleneck", "run": bottleneck, "inputs": ["first"],
               "workers": workers},
              {"name": "last", "run": "benchmarks.workloads.bottleneck:light",
               "inputs": ["bottleneck"]}]
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline",
           "metadata": {"name": "workers"},
           "spec": {"source": {"uri": str(folder / "data" / "*.parquet"), "batchRows": rows},
                    "stages": stages, "memory": "2Gi",
                    "sinks": [{"input": "last", "uri": str(folder / "out"),
                               "mode": "overwrite"}]}}
    path = folder / f"spec-{workers}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _data(folder: Path, batches: int, rows: int) -> None:
    (folder / "data").mkdir(parents=True)
    for i in range(batches):
        start = i * rows
        pq.write_table(pa.table({"x": pa.array(range(start, start + rows), pa.int64())}),
                       folder / "data" / f"part-{i:04d}.parquet", row_group_size=rows)


def _span(folder: Path) -> float:
    """Seconds from the bottleneck's first task start to its last task end (its logs)."""
    import datetime

    stamps = []
    for log in (folder / "run" / "logs").glob("bottleneck*.log"):
        for line in log.read_text().splitlines():
            if " batch " in line and (": started" in line or ": done" in line):
                stamps.append(datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f"))
    return (max(stamps) - min(stamps)).total_seconds()


def _run(spec: Path, folder: Path) -> tuple[float, float, int]:
    shutil.rmtree(folder / "run", ignore_errors=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "podpipe", "run", str(spec), "--quiet",
                           "--run-dir", str(folder / "run")], cwd=ROOT, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"podpipe failed:\n{done.stderr}")
    status = json.loads((folder / "run" / "status.json").read_text())
    return elapsed, _span(folder), status["stages"]["bottleneck"]["workers_max"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {}
    for name, (bottleneck, batches, rows) in WORKLOADS.items():
        folder = Path(tempfile.mkdtemp(prefix=f"workers-{name}-"))
        try:
            _data(folder, batches, rows)
            specs = {w: _spec(folder, bottleneck, rows, w) for w in SETTINGS}
            times: dict[str, list[float]] = {str(w): [] for w in SETTINGS}
            spans: dict[str, list[float]] = {str(w): [] for w in SETTINGS}
            most: dict[str, int] = {}
            for _ in range(args.repeat):
                for w in SETTINGS:
                    elapsed, span, most[str(w)] = _run(specs[w], folder)
                    times[str(w)].append(elapsed)
                    spans[str(w)].append(span)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        medians = {w: statistics.median(t) for w, t in times.items()}
        span = {w: statistics.median(t) for w, t in spans.items()}
        results[name] = {"batches": batches, "rows_per_batch": rows, "runs": times,
                         "median_s": medians, "bottleneck_span_s": span,
                         "throughput_over_1": {w: span["1"] / m for w, m in span.items()},
                         "whole_run_over_1": {w: medians["1"] / m for w, m in medians.items()},
                         "auto_workers_max": most["auto"]}
        best = min(m for w, m in medians.items() if w != "auto")
        print(f"{name}: " + ", ".join(
            f"workers {w}: run {m:.2f} s, bottleneck {span[w]:.2f} s "
            f"({span['1'] / span[w]:.2f}x throughput)" for w, m in medians.items())
            + f"; auto reached {most['auto']} workers, its run {medians['auto'] / best:.2f}x "
              "the best fixed setting's")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "workers per node", "cores": len(os.sched_getaffinity(0)),
           "repeat": args.repeat, "results": results}
    (RESULTS / "workers.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"written to {RESULTS / 'workers.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
