"""What a candidate beside a stage costs the live run: `podpipe shadow` on TPC-H Q1.

examples/tpch/q1.yaml over lineitem at SF 1 in 100,000-row batches, on this
machine's cores: the run alone, and the run with a candidate of its `prices` stage
(the same function: every batch compared equal) started as soon as the run is
running; and with a broken candidate (it raises on every batch). The run alone has
a command on it at the same moment too (`podpipe status`), so that the start of the
command's Python is not counted as the candidate's. Per round, the
three side by side (in a rotating order): the run's wall time (`podpipe run`
started to ended) and, with the candidate, its coverage — batches compared out of
the stage's batches — and what it skipped or failed. Medians over the rounds.
Writes results/shadow.json.

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


CANDIDATES = {"alone": None, "equal": "examples.tpch.stages:prices",
              "broken": "benchmarks.workloads.candidates:prices_broken"}


def _run(sf: str, rows: int, run_dir: Path, candidate: str | None) -> dict[str, float]:
    started = time.perf_counter()
    run = subprocess.Popen(
        [sys.executable, "-m", "podpipe", "run", str(SPEC), "--quiet", "--run-dir",
         str(run_dir), "--set", f"source.uri=data/tpch-sf{sf}/lineitem/*.parquet",
         "--set", f"source.batchRows={rows}", "--set", f"sinks.0.uri={run_dir}-out"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while _state(run_dir) != "running" and run.poll() is None:
        time.sleep(0.005)
    # a command on the run either way (its Python's start is no part of the candidate's
    # cost): the candidate started, or the status read
    subprocess.run([sys.executable, "-m", "podpipe", "shadow", str(run_dir), "prices",
                    "--run", candidate] if candidate is not None else
                   [sys.executable, "-m", "podpipe", "status", str(run_dir), "--json"],
                   cwd=ROOT, capture_output=True, text=True)
    _, stderr = run.communicate()
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(stderr)
    prices = json.loads((run_dir / "status.json").read_text())["stages"]["prices"]
    result = {"wall_s": round(wall, 3), "batches": prices["batches_done"]}
    shadow = prices.get("shadow")
    if candidate is not None:
        if shadow is None or shadow["differing"] or (shadow["failed"] == 0) != (
                candidate == CANDIDATES["equal"]):
            raise SystemExit(f"the candidate did not compare as expected: {shadow}")
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
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in CANDIDATES}
    ways = list(CANDIDATES)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for way in ways[round_ % 3:] + ways[:round_ % 3]:  # each goes first in turn
                runs[way].append(_run(args.sf, args.batch_rows,
                                      Path(tmp) / f"run-{round_}-{way}", CANDIDATES[way]))
    median = lambda way, key: statistics.median(r[key] for r in runs[way])  # noqa: E731
    result = {
        "measured": time.strftime("%Y-%m-%d"), "sf": args.sf, "batch_rows": args.batch_rows,
        "rounds": args.rounds, "alone_wall_s": median("alone", "wall_s"),
        "with_shadow_wall_s": median("equal", "wall_s"),
        "ratio": round(median("equal", "wall_s") / median("alone", "wall_s"), 3),
        "with_broken_wall_s": median("broken", "wall_s"),
        "broken_ratio": round(median("broken", "wall_s") / median("alone", "wall_s"), 3),
        "coverage": median("equal", "coverage"), "batches": median("equal", "batches"),
        "compared": median("equal", "compared"), "skipped": median("equal", "skipped"),
        "broken_failed": median("broken", "failed"), "runs": runs}
    records.save(RESULTS / "shadow.json", result,
                 ("alone_wall_s", "with_shadow_wall_s", "ratio", "with_broken_wall_s",
                  "broken_ratio", "coverage", "compared", "skipped", "batches"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
