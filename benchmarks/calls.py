"""A call stage's throughput against a service with 100 ms of latency.

The stub service (tests/stages/stub_service.py, a real aiohttp process on loopback)
answers each request after `--latency` seconds. The pipeline sends 8 batches of
10,000 rows in requests of 100 rows (800 requests) with `concurrency: 16`: at best
16 / 0.1 s = 160 requests a second. The call stage's span (its first task handed
out to its last task's end, from the run's task record) gives its requests per
second; the stub says how many were in flight at most. `--repeat` runs, medians;
writes results/calls.json.

    python benchmarks/calls.py [--repeat 3] [--latency 0.1] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks import records  # noqa: E402  (run as a script: its folder is not a package)
RESULTS = Path(__file__).parent / "results"
BATCHES, ROWS, PER_REQUEST = 8, 10_000, 100


def _spec(folder: Path, url: str, concurrency: int) -> Path:
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "calls"},
           "spec": {"source": {"uri": str(folder / "data.parquet"), "batchRows": ROWS},
                    "stages": [{"name": "ask", "inputs": ["source"],
                                "call": {"url": url, "rowsPerRequest": PER_REQUEST,
                                         "concurrency": concurrency}}],
                    "sinks": [{"input": "ask", "uri": str(folder / "out"),
                               "mode": "overwrite"}]}}
    path = folder / "calls.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _span(run_dir: Path, node: str) -> float:
    mine = records.done_tasks(run_dir, node)
    return max(t["ended"] for t in mine) - min(t["handed"] for t in mine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "calls.json")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="calls-"))
    stub = subprocess.Popen([sys.executable, str(ROOT / "tests" / "stages" / "stub_service.py"),
                             "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    runs = []
    try:
        url = f"http://127.0.0.1:{int(stub.stdout.readline())}/"
        pq.write_table(pa.table({"x": pa.array(range(BATCHES * ROWS), pa.int64())}),
                       folder / "data.parquet", row_group_size=ROWS)
        spec = _spec(folder, url, args.concurrency)
        for i in range(args.repeat):
            run_dir = folder / f"run-{i}"
            done = subprocess.run([sys.executable, "-m", "podpipe", "run", str(spec), "--quiet",
                                   "--run-dir", str(run_dir)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            calls = json.loads((run_dir / "status.json").read_text())["stages"]["ask"]["calls"]
            span = _span(run_dir, "ask")
            runs.append({"requests": calls["requests"], "span_s": round(span, 3),
                         "requests_per_s": round(calls["requests"] / span, 1),
                         "latency_p50_s": calls["latency_p50"],
                         "latency_p99_s": calls["latency_p99"]})
            print(f"  run {i}: {calls['requests']} requests in {span:.2f} s: "
                  f"{calls['requests'] / span:.0f}/s (p50 {calls['latency_p50']:.3f} s)",
                  flush=True)
        with urllib.request.urlopen(url + "stats") as reply:
            seen = json.loads(reply.read())
    finally:
        stub.kill()
        stub.wait()
        shutil.rmtree(folder, ignore_errors=True)
    best = args.concurrency / args.latency
    rate = statistics.median(r["requests_per_s"] for r in runs)
    result = {"benchmark": "calls", "latency_s": args.latency, "concurrency": args.concurrency,
              "requests_per_run": BATCHES * ROWS // PER_REQUEST, "runs": runs,
              "median_requests_per_s": rate, "ideal_requests_per_s": best,
              "share_of_ideal": round(rate / best, 3),
              "stub_max_in_flight": seen["max_in_flight"],
              "stub_answered": seen["answered"], "stub_distinct": seen["distinct"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.rename(args.out)
    print(f"median {rate:.0f} requests/s = {rate / best:.0%} of {best:.0f}/s; at most "
          f"{seen['max_in_flight']} in flight (concurrency {args.concurrency}); written to "
          f"{args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
