"""What a candidate beside a stage costs the live run: `podpipe shadow` on TPC-H Q1.

examples/tpch/q1.yaml over lineitem at SF 1 in 100,000-row batches, on this
machine's cores: the run alone, and the run with a candidate of its `prices` stage
(the same function: every batch compared equal) started as soon as the run is
running. Per round, both side by side (alternating which goes first): the run's wall
time (`podpipe run` started to ended) and, with the candidate, its coverage —
batches compared out of the stage's batches — and what it skipped or failed.
Medians over the rounds. Writes results/shadow.json.

    python benchmarks/shadow.py [--sf 1] [--batch-rows 100000] [--rounds 5]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import records  # noqa: E402  (run as a script: its folder is not a package)
RESULTS = Path(__file__).parent / "results"
SPEC = ROOT / "examples" / "tpch" / "q1.yaml"


def _run(sf: str, rows: int, run_dir: Path, shadowed: bool) -> dict[str, float]:
    started = time.perf_counter()
    run = subprocess.Popen(
        [sys.executable, "-m", "podpipe", "run", str(SPEC), "--quiet", "--run-dir",
         str(run_dir), "--set", f"source.uri=data/tpch-sf{sf}/lineitem/*.parquet",
         "--set", f"source.batchRows={rows}", "--set", f"sinks.0.uri={run_dir}-out"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if shadowed:
        while _state(run_dir) != "running" and run.poll() is None:
            time.sleep(0.005)
        subprocess.run([sys.executable, "-m", "podpipe", "shadow", str(run_dir), "prices",
                        "--run", "examples.tpch.stages:prices"], cwd=ROOT,
                       capture_output=True, text=True)
    _, stderr = run.communicate()
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(stderr)
    prices = json.loads((run_dir / "status.json").read_text())["stages"]["prices"]
    result = {"wall_s": round(wall, 3), "batches": prices["batches_done"]}
    shadow = prices.get("shadow")
    if shadowed:
        if shadow is None or shadow["differing"]:
            raise SystemExit(f"the candidate did not compare equal: {shadow}")
        result.update(compared=shadow["compared"], skipped=shadow["skipped"],
                      failed=shadow["failed"],
                      coverage=round(shadow["compared"] / prices["batches_done"], 3))
    return result


def _state(run_dir: Path) -> str | None:
    try:
        return str(json.loads((run_dir / "status.json").read_text())["state"])
    except (OSError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", default="1")
    parser.add_argument("--batch-rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if not (ROOT / "data" / f"tpch-sf{args.sf}" / "lineitem").is_dir():
        raise SystemExit(f"no data: python -m examples.tpch.data generate --sf {args.sf}")
    alone: list[dict[str, float]] = []
    beside: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for shadowed in ((False, True) if round_ % 2 == 0 else (True, False)):
                run_dir = Path(tmp) / f"run-{round_}-{int(shadowed)}"
                (beside if shadowed else alone).append(_run(args.sf, args.batch_rows,
                                                            run_dir, shadowed))
    median = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    result = {
        "measured": time.strftime("%Y-%m-%d"), "sf": args.sf, "batch_rows": args.batch_rows,
        "rounds": args.rounds, "alone_wall_s": median(alone, "wall_s"),
        "with_shadow_wall_s": median(beside, "wall_s"),
        "ratio": round(median(beside, "wall_s") / median(alone, "wall_s"), 3),
        "coverage": median(beside, "coverage"), "batches": median(beside, "batches"),
        "compared": median(beside, "compared"), "skipped": median(beside, "skipped"),
        "failed": median(beside, "failed"), "alone": alone, "with_shadow": beside}
    records.save(RESULTS / "shadow.json", result,
                 ("alone_wall_s", "with_shadow_wall_s", "ratio", "coverage", "compared",
                  "skipped", "batches"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
