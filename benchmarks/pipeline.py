"""The TPC-H Q1 example through podpipe vs the floor (same functions, one process).

Both are timed as whole processes (interpreter start, imports, planning, reading
Parquet, the stages, writing the sink), alternating in one run so that the noise
of a shared machine falls on both alike. Reports median, min and max of each, the
ratio of medians and the median of each round's ratio (podpipe over the floor run
just before it); checks the podpipe result against the official answer.

    python benchmarks/pipeline.py [--sf 1] [--repeat 3] [--batch-rows 500000]
                                  [--baseline SRC_DIR]
    python benchmarks/pipeline.py --sweep [--repeat 5]

`--baseline` also times another podpipe source tree (its `src` directory, e.g. a
`git worktree` of an earlier commit) side by side, for before/after figures.
`--sweep` runs the batch sizes of the workers issue one after another: 500,000 and
100,000 rows at SF 1, 5,000 rows at SF 0.1 (120 batches; at SF 1 it would be 1,200),
and writes `results/pipeline-sweep.json` beside each size's own file.
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


SWEEP = ((1.0, 500_000), (1.0, 100_000), (0.1, 5_000))  # (scale factor, batch rows)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=500_000)
    parser.add_argument("--memory", default="2GiB")
    parser.add_argument("--baseline", type=Path, help="another podpipe's src directory")
    parser.add_argument("--sweep", action="store_true",
                        help="500,000 and 100,000 rows at SF 1, 5,000 at SF 0.1")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    RESULTS.mkdir(exist_ok=True)
    runs = SWEEP if args.sweep else ((args.sf, args.batch_rows),)
    results = [measure(sf, rows, args) for sf, rows in runs]
    if args.sweep:
        (RESULTS / "pipeline-sweep.json").write_text(json.dumps(
            [{k: r[k] for k in ("scale_factor", "batch_rows", "source_batches",
                                "ratio_podpipe_to_floor", "ratio_podpipe_to_floor_paired")} | {
                "podpipe_median_s": r["results"]["podpipe"]["median_s"],
                "floor_median_s": r["results"]["floor"]["median_s"]} for r in results],
            indent=2) + "\n")
        print("| batch rows | SF | batches | podpipe | floor | ratio | per round |\n"
              "|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['batch_rows']:,} | {r['scale_factor']:g} | {r['source_batches']} | "
                  f"{r['results']['podpipe']['median_s']:.2f} s | "
                  f"{r['results']['floor']['median_s']:.2f} s | "
                  f"{r['ratio_podpipe_to_floor']:.2f} | "
                  f"{r['ratio_podpipe_to_floor_paired']:.2f} |")
    return 0


def measure(sf: float, batch_rows: int, args: argparse.Namespace) -> dict:
    """podpipe and the floor (and a baseline) on Q1 at `sf` in batches of `batch_rows`,
    `args.repeat` times each, alternating; the result, also written to a file."""
    from examples.tpch import data

    lineitem = data.generate(sf, ROOT / data.default_dir(sf))
    out = Path(tempfile.mkdtemp(prefix="q1-bench-"))
    settings = ["--set", f"source.uri={lineitem}/*.parquet",
                "--set", f"source.batchRows={batch_rows}",
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
        problems = data.compare(pq.read_table(out / "q1"), sf)
        status = json.loads((out / "run" / "status.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if problems:
        raise SystemExit(f"podpipe's answer differs from the official one: {problems}")

    summary = {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                      "runs": t} for name, t in times.items()}
    ratio = summary["podpipe"]["median_s"] / summary["floor"]["median_s"]
    # each round's ratio (the floor run just before): a machine slower for a while
    # slows both sides of one round, not one side of the medians
    paired = statistics.median(p / f for p, f in zip(times["podpipe"], times["floor"]))
    if "baseline" in summary:
        summary["baseline"]["source"] = str(args.baseline)
        summary["baseline"]["ratio_to_floor"] = (summary["baseline"]["median_s"] /
                                                 summary["floor"]["median_s"])
        summary["baseline"]["ratio_to_floor_paired"] = statistics.median(
            b / f for b, f in zip(times["baseline"], times["floor"]))
    result = {
        "benchmark": "tpch-q1 pipeline vs floor", "scale_factor": sf,
        "batch_rows": batch_rows, "source_batches": status["source_batches"],
        "cores": os.cpu_count(), "results": summary, "ratio_podpipe_to_floor": ratio,
        "ratio_podpipe_to_floor_paired": paired,
        "podpipe_stage_busy_seconds": {n: s["busy_seconds"]
                                       for n, s in status["stages"].items()},
        "podpipe_workers_max": {n: s["workers_max"] for n, s in status["stages"].items()},
        "podpipe_peak_scratch_bytes": status["peak_scratch_bytes"],
        "answer": "matches the official TPC-H answer",
    }
    name = f"pipeline-sf{sf:g}-{batch_rows}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(f"SF {sf:g}, {batch_rows:,}-row batches ({status['source_batches']}):")
    for key, s in summary.items():
        print(f"{key:>8}: median {s['median_s']:.2f} s  (min {s['min_s']:.2f}, "
              f"max {s['max_s']:.2f}, {args.repeat} runs)")
    if "baseline" in summary:
        print(f"baseline / floor: {summary['baseline']['ratio_to_floor']:.2f} (median of "
              f"each round's: {summary['baseline']['ratio_to_floor_paired']:.2f})")
    print(f"podpipe / floor: {ratio:.2f} (median of each round's: {paired:.2f})   "
          "stage busy seconds: "
          f"{result['podpipe_stage_busy_seconds']}")
    print(f"written to {RESULTS / name}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
