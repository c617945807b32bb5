"""A command stage in JavaScript: a process per batch against one serving process.

The same Node.js stage (x doubled, Arrow IPC in and out, apache-arrow) run both ways
on `--batches` batches of `--rows` rows, one worker: `tests/stages/js/double.mjs`
started for every batch (the per-batch mode), and `tests/stages/js/serve_double.mjs`
started once (`serve: true`, a JSON line per task on its stdin). Per batch, the
stage's own time (its task granted to its end, from the run's task record): medians
of each mode, and their ratio; each run's wall time too. Rounds alternate the modes;
writes results/serving.json.

    python benchmarks/serving.py [--batches 200] [--rows 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
from benchmarks import records  # noqa: E402  (run as a script: its folder is not a package)
RESULTS = Path(__file__).parent / "results"
JS = ROOT / "tests" / "stages" / "js"
MODES = {"per-batch": ("double.mjs", False), "serving": ("serve_double.mjs", True)}


def _spec(folder: Path, mode: str, rows: int) -> Path:
    script, serve = MODES[mode]
    stage = {"name": "js", "command": ["node", str(JS / script)], "inputs": ["source"],
             "workers": 1, **({"serve": True} if serve else {})}
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline",
           "metadata": {"name": f"js-{mode}"},
           "spec": {"source": {"uri": str(folder / "data.parquet"), "batchRows": rows},
                    "stages": [stage],
                    "sinks": [{"input": "js", "uri": str(folder / f"out-{mode}"),
                               "mode": "overwrite"}]}}
    path = folder / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(spec: Path, run_dir: Path, batches: int) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "podpipe", "run", str(spec), "--quiet",
                           "--run-dir", str(run_dir)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    mine = records.per_batch_seconds(run_dir, "js")
    assert len(mine) == batches, len(mine)
    return {"wall_s": round(wall, 3), "per_batch_ms": round(statistics.median(mine) * 1e3, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "serving.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="serving-"))
    total = args.batches * args.rows
    pq.write_table(pa.table({"x": pa.array(range(total), pa.int64())}),
                   folder / "data.parquet", row_group_size=args.rows)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        for mode in MODES:
            figures = _run(_spec(folder, mode, args.rows), folder / f"run-{mode}-{round_}",
                           args.batches)
            out = pq.read_table(folder / f"out-{mode}")
            assert out.num_rows == total and out["x"].to_pylist()[:3] == [0.0, 2.0, 4.0]
            runs[mode].append(figures)
            print(mode, figures, flush=True)
    medians = {mode: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
               for mode, rows in runs.items()}
    result = {
        "benchmark": "a Node.js command stage: a process per batch vs serving",
        "measured": time.strftime("%Y-%m-%d"), "batches": args.batches, "rows": args.rows,
        "rounds": args.rounds, "runs": runs, "medians": medians,
        "per_batch_ratio": round(medians["per-batch"]["per_batch_ms"] /
                                 medians["serving"]["per_batch_ms"], 1),
        "wall_ratio": round(medians["per-batch"]["wall_s"] / medians["serving"]["wall_s"], 2)}
    records.save(args.out, result, ("medians", "per_batch_ratio", "wall_ratio"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
