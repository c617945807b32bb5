"""The TPC-H Q1 example through podpipe vs the floor (same functions, one process).

Both are timed as whole processes (interpreter start, imports, planning, reading
Parquet, the stages, writing the sink), alternating in one run so that the noise
of a shared machine falls on both alike. Reports median, min and max of each and
the ratio of medians; checks the podpipe result against the official answer.

    python benchmarks/pipeline.py [--sf 1] [--repeat 3] [--batch-rows 500000]
                                  [--baseline SRC_DIR]

`--baseline` also times another podpipe source tree (its `src` directory, e.g. a
`git worktree` of an earlier commit) side by side, for before/after figures.
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

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
SPEC = ROOT / "examples" / "tpch" / "q1.yaml"


def _timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=500_000)
    parser.add_argument("--memory", default="2GiB")
    parser.add_argument("--baseline", type=Path, help="another podpipe's src directory")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from examples.tpch import data

    lineitem = data.generate(args.sf, ROOT / data.default_dir(args.sf))
    out = Path(tempfile.mkdtemp(prefix="q1-bench-"))
    settings = ["--set", f"source.uri={lineitem}/*.parquet",
                "--set", f"source.batchRows={args.batch_rows}",
                "--set", f"sinks.0.uri={out}/q1", "--set", f"memory={args.memory}"]
    floor_cmd = [sys.executable, str(ROOT / "benchmarks" / "floor.py"), str(SPEC), *settings]
    podpipe_cmd = [sys.executable, "-m", "podpipe", "run", str(SPEC), "--quiet",
                   "--run-dir", str(out / "run"), *settings]
    times: dict[str, list[float]] = {"floor": [], "podpipe": []}
    baseline_env = None
    if args.baseline:
        times["baseline"] = []
        baseline_env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
    try:
        for _ in range(args.repeat):  # podpipe last: its output and status are checked
            times["floor"].append(_timed(floor_cmd))
            if baseline_env is not None:
                shutil.rmtree(out / "run", ignore_errors=True)
                times["baseline"].append(_timed(podpipe_cmd, baseline_env))
                shutil.rmtree(out / "q1", ignore_errors=True)
            shutil.rmtree(out / "run", ignore_errors=True)
            times["podpipe"].append(_timed(podpipe_cmd))
        problems = data.compare(pq.read_table(out / "q1"), args.sf)
        status = json.loads((out / "run" / "status.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if problems:
        raise SystemExit(f"podpipe's answer differs from the official one: {problems}")

    summary = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                      "runs": t} for name, t in times.items()}
    ratio = summary["podpipe"]["median_s"] / summary["floor"]["median_s"]
    if "baseline" in summary:
        summary["baseline"]["source"] = str(args.baseline)
        summary["baseline"]["ratio_to_floor"] = (summary["baseline"]["median_s"] /
                                                 summary["floor"]["median_s"])
    result = {
        "benchmark": "tpch-q1 pipeline vs floor", "scale_factor": args.sf,
        "batch_rows": args.batch_rows, "source_batches": status["source_batches"],
        "cores": os.cpu_count(), "results": summary, "ratio_podpipe_to_floor": ratio,
        "podpipe_stage_busy_seconds": {n: s["busy_seconds"]
                                       for n, s in status["stages"].items()},
        "podpipe_peak_scratch_bytes": status["peak_scratch_bytes"],
        "answer": "matches the official TPC-H answer",
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"pipeline-sf{args.sf:g}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    for key, s in summary.items():
        print(f"{key:>8}: median {s['median_s']:.2f} s  (min {s['min_s']:.2f}, "
              f"max {s['max_s']:.2f}, {args.repeat} runs)")
    if "baseline" in summary:
        print(f"baseline / floor: {summary['baseline']['ratio_to_floor']:.2f}")
    print(f"podpipe / floor: {ratio:.2f}   stage busy seconds: "
          f"{result['podpipe_stage_busy_seconds']}")
    print(f"written to {RESULTS / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
