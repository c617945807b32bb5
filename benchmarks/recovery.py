"""What checkpoints and recovery cost, on the TPC-H Q1 example.

Three ways, alternating in one run, whole-process wall time of `podpipe run`:

- `off`: no durable tier (the node tier copies what a resume needs; it is always on);
- `on`: node + durable (`file://`) checkpoints, a major one every 2 batches;
- `kill`: as `off`, but one stage process (`prices`) is killed with SIGKILL once the
  reduce inputs of 4 batches exist; the conductor restarts it and requeues its batch.

Reports the medians, the ratio on/off (target <= 1.15), and the extra time of the
killed runs over `off` next to the killed stage's time per batch plus one second
(the target).

    python benchmarks/recovery.py [--sf 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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


def _status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _run(settings: list[str], work: Path, kill: str | None) -> tuple[float, dict]:
    run_dir = work / "run"
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "podpipe", "run", str(SPEC), "--quiet",
                                "--run-dir", str(run_dir), *settings], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill:
        while process.poll() is None:
            status = _status(run_dir)
            if status.get("stages", {}).get("partial", {}).get("batches_done", 0) >= 4:
                pid = next(p["pid"] for p in status["processes"] if p["stage"] == kill)
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    _, err = process.communicate()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"podpipe run failed:\n{err}")
    return elapsed, _status(run_dir)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=500_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from examples.tpch import data

    lineitem = data.generate(args.sf, ROOT / data.default_dir(args.sf))
    scratch = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    times: dict[str, list[float]] = {"off": [], "on": [], "kill": []}
    per_batch: list[float] = []
    try:
        for round_ in range(args.repeat):
            for variant in times:
                work = scratch / f"{variant}-{round_}"
                work.mkdir()
                settings = ["--set", f"source.uri={lineitem}/*.parquet",
                            "--set", f"source.batchRows={args.batch_rows}",
                            "--set", f"sinks.0.uri={work / 'q1'}", "--set", "memory=2GiB"]
                if variant == "on":
                    settings += ["--set", f"checkpoints.durable=file://{work / 'store'}",
                                 "--set", "checkpoints.everyBatches=2"]
                seconds, status = _run(settings, work, "prices" if variant == "kill" else None)
                if data.compare(pq.read_table(work / "q1"), args.sf):
                    raise SystemExit(f"{variant}: wrong answer")
                if variant == "kill":
                    prices = status["stages"]["prices"]
                    assert prices["restarts"] == 1, prices
                    per_batch.append(prices["busy_seconds"] / prices["batches_done"])
                if variant == "on":
                    assert status["durable"]["checkpoints"] >= 1, status["durable"]
                times[variant].append(seconds)
                print(f"  {variant:>4}: {seconds:.2f} s", flush=True)
                shutil.rmtree(work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "checkpoints and recovery, tpch-q1", "scale_factor": args.sf,
        "batch_rows": args.batch_rows, "cores": os.cpu_count(), "repeat": args.repeat,
        "runs_s": times, "median_s": median,
        "ratio_on_to_off": median["on"] / median["off"],
        "kill_extra_s": median["kill"] - median["off"],
        "killed_stage_seconds_per_batch": statistics.median(per_batch),
        "kill_target_s": statistics.median(per_batch) + 1.0,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"recovery-sf{args.sf:g}.json"
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.rename(out)
    print(json.dumps({k: v for k, v in result.items() if k != "runs_s"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
