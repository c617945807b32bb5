"""A stage with a model: loaded once per worker (a class stage) or on every batch.

examples/model/score.yaml scores TPC-H lineitem with the example's random forest
(`examples.model.train`) in 20,000-row batches, two workers: its `score` stage as
`LateScorer` (the model loaded in its setup, once per worker) and as
`late_loading_each_batch` (the same model loaded on every call). Per batch, the
stage's own time (task granted to its end, from the run's task record), medians;
the whole run's wall time; the class's setup time. Rounds alternate the two; both
answers must be equal. Writes results/model.json.

    python benchmarks/model.py [--sf 0.1] [--batch-rows 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import records  # noqa: E402  (run as a script: its folder is not a package)
RESULTS = Path(__file__).parent / "results"
SPEC = ROOT / "examples" / "model" / "score.yaml"
WAYS = {"setup once": "examples.model.stages:LateScorer",
        "loaded per batch": "examples.model.stages:late_loading_each_batch"}


def _run(way: str, sf: str, rows: int, folder: Path, round_: int) -> dict[str, float]:
    run_dir, out = folder / f"run-{round_}-{way.replace(' ', '-')}", folder / f"out-{way}"
    model = ROOT / "data" / f"tpch-sf{sf}" / "models" / "late.pkl"
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "podpipe", "run", str(SPEC), "--quiet", "--run-dir",
         str(run_dir), "--set", f"source.uri=data/tpch-sf{sf}/lineitem/*.parquet",
         "--set", f"source.batchRows={rows}", "--set", f"stages.score.run={WAYS[way]}",
         "--set", f"stages.score.params.model={model}", "--set", "stages.score.workers=2",
         "--set", f"sinks.0.uri={out}"], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    mine = records.per_batch_seconds(run_dir, "score")
    status = json.loads((run_dir / "status.json").read_text())
    return {"wall_s": round(wall, 3), "per_batch_ms": round(statistics.median(mine) * 1e3, 1),
            "batches": len(mine),
            "setup_s": round(status["stages"]["score"].get("setup_seconds", 0.0), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", default="0.1")
    parser.add_argument("--batch-rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "model.json")
    args = parser.parse_args()
    if not (ROOT / "data" / f"tpch-sf{args.sf}" / "models" / "late.pkl").exists():
        subprocess.run([sys.executable, "-m", "examples.model.train", "--sf", args.sf],
                       cwd=ROOT, check=True)
    folder = Path(tempfile.mkdtemp(prefix="model-"))
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in WAYS:
            runs[way].append(_run(way, args.sf, args.batch_rows, folder, round_))
            print(way, runs[way][-1], flush=True)
    answers = [pq.read_table(folder / f"out-{way}") for way in WAYS]
    if not answers[0].equals(answers[1]):
        raise SystemExit("the two ways scored differently")
    medians = {way: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
               for way, rows in runs.items()}
    result = {
        "benchmark": "a model stage: loaded once per worker vs on every batch",
        "measured": time.strftime("%Y-%m-%d"), "sf": args.sf,
        "batch_rows": args.batch_rows, "rounds": args.rounds, "runs": runs,
        "medians": medians,
        "per_batch_ratio": round(medians["loaded per batch"]["per_batch_ms"] /
                                 medians["setup once"]["per_batch_ms"], 2),
        "wall_ratio": round(medians["loaded per batch"]["wall_s"] /
                            medians["setup once"]["wall_s"], 2)}
    records.save(args.out, result, ("medians", "per_batch_ratio", "wall_ratio"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
