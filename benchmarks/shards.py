"""Scaling out: replicas on this machine, and the plan for a simulated cluster.

1. Throughput of the sharded TPC-H Q1 example (`examples/tpch/q1-sharded.yaml`,
   S = 8 shards) with N = 1 and N = 2 replicas, alternating in one run, whole-process
   wall time of `podpipe run --replicas N` (every pod, its stage processes, the
   handover of shard outputs through the durable tier, the global reduce). The
   unsharded example (`q1.yaml`, one pod, one shard) runs alongside as the baseline.
   Every run's answer is checked against the official one, and N = 1 and N = 2 must
   give the same bytes.
2. A simulated cluster, without running a stage: 100 pods, 1,000 shards, 1 TB of
   Parquet in row groups of about 128 MiB (sizes drawn with a fixed seed, +-25%),
   through the same planner `podpipe plan` uses. Per pod: shards, batches, bytes
   pulled from the source store, and the durable-tier traffic: the checkpoint
   upload of each batch's reduce input and each shard's reduce output (handed over
   to pod 0), sized as the SF run above measured them (Q1's are a few rows each,
   whatever the batch size).

    python benchmarks/shards.py [--sf 1] [--repeat 3]

Writes benchmarks/results/shards-sf<SF>.json and docs/benchmarks/shards.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
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
DOCS = ROOT / "docs" / "benchmarks"
SHARDED = ROOT / "examples" / "tpch" / "q1-sharded.yaml"
PLAIN = ROOT / "examples" / "tpch" / "q1.yaml"
TB = 10**12
MiB = 1 << 20


def _run(spec: Path, replicas: int, settings: list[str], work: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "podpipe", "run", str(spec), "--quiet",
                           "--replicas", str(replicas), "--run-dir", str(work / "run"),
                           *settings], cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"podpipe run --replicas {replicas} failed:\n{done.stderr}")
    return elapsed, json.loads((work / "run" / "status.json").read_text())


def measure(sf: float, repeat: int, batch_rows: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from examples.tpch import data

    lineitem = data.generate(sf, ROOT / data.default_dir(sf))
    variants = {"one shard (q1.yaml)": (PLAIN, 1), "S=8, N=1": (SHARDED, 1),
                "S=8, N=2": (SHARDED, 2)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, set[str]] = {name: set() for name in variants}
    rows = 0
    per_batch, per_shard = [], []
    scratch = Path(tempfile.mkdtemp(prefix="shards-bench-"))
    try:
        for round_ in range(repeat):
            names = list(variants)
            names = names[round_ % len(names):] + names[:round_ % len(names)]  # rotate
            for name in names:
                spec, replicas = variants[name]
                work = scratch / f"{round_}-{replicas}-{spec.stem}"
                work.mkdir()
                settings = ["--set", f"source.uri={lineitem}/*.parquet",
                            "--set", f"source.batchRows={batch_rows}",
                            "--set", f"sinks.0.uri={work / 'q1'}", "--set", "memory=1GiB"]
                seconds, status = _run(spec, replicas, settings, work)
                answer = pq.read_table(work / "q1")
                if data.compare(answer, sf):
                    raise SystemExit(f"{name}: wrong answer")
                answers[name].add(hashlib.sha256(
                    next((work / "q1").glob("part-*.parquet")).read_bytes()).hexdigest())
                rows = status["stages"]["source"]["rows_out"]
                if spec == SHARDED:
                    stages = status["stages"]
                    per_batch.append(stages["partial"]["bytes_written"] /
                                     stages["partial"]["batches_done"])
                    per_shard.append(stages["merge"]["bytes_written"] /
                                     stages["merge"]["batches_done"])
                times[name].append(seconds)
                print(f"  {name:>20}: {seconds:.2f} s", flush=True)
                shutil.rmtree(work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if len(answers["S=8, N=1"] | answers["S=8, N=2"]) != 1:
        raise SystemExit("N=1 and N=2 gave different bytes")
    median = {k: statistics.median(v) for k, v in times.items()}
    return {
        "scale_factor": sf, "batch_rows": batch_rows, "rows": rows, "repeat": repeat,
        "runs_s": times, "median_s": median,
        "rows_per_s": {k: rows / v for k, v in median.items()},
        "ratio_n2_to_n1": median["S=8, N=2"] / median["S=8, N=1"],
        "ratio_sharded_to_plain": median["S=8, N=1"] / median["one shard (q1.yaml)"],
        "reduce_input_bytes_per_batch": statistics.median(per_batch),
        "shard_output_bytes_per_shard": statistics.median(per_shard),
    }


def simulate(pods: int, shards: int, total: int, per_batch: float, per_shard: float,
             seed: int = 1) -> dict:
    """The plan of a cluster, from batch sizes alone (no file is read)."""
    sys.path.insert(0, str(ROOT / "src"))
    from podpipe.model import shards as sharding

    rng = random.Random(seed)
    sizes: list[int] = []
    while sum(sizes) < total:
        sizes.append(int(128 * MiB * rng.uniform(0.75, 1.25)))
    started = time.perf_counter()
    plan = sharding.plan(sizes, shards, pods)
    planning = time.perf_counter() - started
    pulled = [p.bytes for p in plan]
    checkpoints = [int(p.batches * per_batch + len(p.shards) * per_shard) for p in plan]
    mean = statistics.mean(pulled)
    return {
        "pods": pods, "shards": shards, "source_bytes": sum(sizes), "batches": len(sizes),
        "planning_s": planning,
        "shards_per_pod": sorted({len(p.shards) for p in plan}),
        "batches_per_pod": {"min": min(p.batches for p in plan),
                            "max": max(p.batches for p in plan)},
        "pulled_per_pod": {"min": min(pulled), "median": statistics.median(pulled),
                           "max": max(pulled), "max_over_mean": max(pulled) / mean},
        "durable_upload_per_pod": {"median": statistics.median(checkpoints),
                                   "max": max(checkpoints)},
        "note": f"durable upload = each batch's reduce input ({per_batch / 1024:.1f} KiB "
                f"measured) + each shard's reduce output, handed to pod 0 "
                f"({per_shard / 1024:.1f} KiB), plus manifests",
        "per_pod": [{"ordinal": p.index, "shards": len(p.shards), "batches": p.batches,
                     "bytes": p.bytes} for p in plan],
    }


def _gib(n: float) -> str:
    return f"{n / (1 << 30):,.2f} GiB"


def report(result: dict) -> str:
    m, s = result["measured"], result["simulated"]
    lines = [
        "# Scaling out: replicas and shards",
        "",
        f"`python benchmarks/shards.py` on {result['cores']} cores, TPC-H SF {m['scale_factor']:g} "
        f"({m['rows']:,} rows, batchRows {m['batch_rows']:,}), median of {m['repeat']} "
        "alternating runs, whole-process wall time.",
        "",
        "| run | median s | rows/s |",
        "| --- | ---: | ---: |",
    ]
    for name, seconds in m["median_s"].items():
        lines.append(f"| {name} | {seconds:.2f} | {m['rows_per_s'][name]:,.0f} |")
    lines += [
        "",
        f"N=2 / N=1: **{m['ratio_n2_to_n1']:.2f}**; S=8 N=1 / one shard: "
        f"{m['ratio_sharded_to_plain']:.2f}. N=1 and N=2 wrote the same bytes.",
        "",
        f"## Simulated cluster: {s['pods']} pods, {s['shards']:,} shards, "
        f"{s['source_bytes'] / TB:.2f} TB of Parquet ({s['batches']:,} batches of ~128 MiB)",
        "",
        f"Planned in {s['planning_s'] * 1000:.1f} ms, no stage run. Each pod owns "
        f"{', '.join(map(str, s['shards_per_pod']))} shards and "
        f"{s['batches_per_pod']['min']}-{s['batches_per_pod']['max']} batches.",
        "",
        "| per pod | min | median | max |",
        "| --- | ---: | ---: | ---: |",
        f"| pulled from the source store | {_gib(s['pulled_per_pod']['min'])} | "
        f"{_gib(s['pulled_per_pod']['median'])} | {_gib(s['pulled_per_pod']['max'])} |",
        f"| uploaded to the durable tier | | "
        f"{s['durable_upload_per_pod']['median'] / 1024:,.0f} KiB"
        f" | {s['durable_upload_per_pod']['max'] / 1024:,.0f} KiB |",
        "",
        f"The busiest pod pulls {s['pulled_per_pod']['max_over_mean']:.3f}x the mean. "
        + s["note"] + ".",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true",
                        help="SF 0.01, one round: a smoke test")
    parser.add_argument("--out", type=Path,
                        help="write shards.json and shards.md here instead of "
                             "benchmarks/results and docs/benchmarks")
    args = parser.parse_args()
    if args.quick:
        args.sf, args.repeat, args.batch_rows = 0.01, 1, 5_000
    measured = measure(args.sf, args.repeat, args.batch_rows)
    simulated = simulate(100, 1000, TB, measured["reduce_input_bytes_per_batch"],
                         measured["shard_output_bytes_per_shard"])
    result = {"benchmark": "shards and replicas, tpch-q1", "cores": os.cpu_count(),
              "measured": measured, "simulated": simulated}
    text = report(result)
    print(text)
    if args.quick and args.out is None:
        return 0
    results, docs = (args.out, args.out) if args.out else (RESULTS, DOCS)
    results.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    name = "shards.json" if args.out else f"shards-sf{args.sf:g}.json"
    for path, content in ((results / name, json.dumps(result, indent=2) + "\n"),
                          (docs / "shards.md", text)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(content)
        tmp.rename(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
