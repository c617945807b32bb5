"""A standing line: jobs on warm processes, against warm Ray, the floor and a cold run.

Three measures (issue 27), each written to `results/line.json` and, with a chart,
to `docs/benchmarks/line.md`:

- **Q1 at SF 1 (100,000-row batches) as a job on a warm line**, timed from submit to
  the sink committed (the job's end is said on the submit's own connection), against
  the same work on a warm Ray (`ray.init` once, one warm-up run, then the work alone:
  one task chain per batch, as `../shared/BENCHMARKS.md` sets it) and against the same
  functions chained in this process (the floor, its imports done before the clock
  starts). Rounds alternate line, Ray, floor; medians and each round's ratios.
- **A one-batch job** (5,000 rows, four stages, a sink) from submit to committed:
  p50 and p99 over `--jobs` jobs, against the median of `--cold` whole `podpipe run`
  processes of the same spec.
- **Jobs back to back** (`--soak` one-batch jobs): every sink checked against the
  first; the line's process's and each stage process's RSS and the RAM scratch after
  each job (plotted); after `down`, no process and no scratch left.
- **Jobs at once** (`jobs: N`): `--at-once` jobs submitted together to a line with
  `jobs: 1` and to one with `jobs: 2` (the same spec, both up side by side, rounds
  alternating which goes first), from the first submit to the last job's end;
  one-batch jobs, and Q1 at SF 0.1 jobs (100,000-row batches, a fifth as many).

    python benchmarks/line.py [--sf 1] [--rounds 5] [--jobs 200] [--cold 10] [--soak 500]
                              [--at-once 50] [--parts one_batch q1 soak at_once]
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
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
DOCS = ROOT / "docs" / "benchmarks"
Q1 = ROOT / "examples" / "tpch" / "q1.yaml"
PODPIPE = [sys.executable, "-m", "podpipe"]
PARTS = ["one_batch", "q1", "soak", "at_once"]


def _cli(*args: str, cwd: Path) -> str:
    done = subprocess.run([*PODPIPE, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"podpipe {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def _job(line: str, overrides: list[str]) -> tuple[float, str]:
    """One job through the line's socket, as `podpipe submit --wait` does (without
    the CLI's own start): seconds from submit to its end, and its run directory."""
    from podpipe.runtime.runs import lines

    started = time.perf_counter()
    for answer in lines.submit(line, overrides, wait=True):
        pass
    elapsed = time.perf_counter() - started
    if answer.state != "succeeded":  # type: ignore[union-attr]
        raise SystemExit(f"job failed: {answer}")
    return elapsed, answer.run_dir  # type: ignore[union-attr]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def q1_against_ray(work: Path, sf: float, rounds: int) -> dict:
    """Q1 at SF `sf`, 100,000-row batches: a job on a warm line, warm Ray, the floor."""
    from benchmarks import contestants

    import ray

    uri = str(ROOT / "data" / f"tpch-sf{sf:g}" / "lineitem" / "*.parquet")
    settings = [f"source.uri={uri}", "source.batchRows=100000", "memory=2GiB"]
    floor_w = contestants.workload(str(Q1), tuple(settings + [f"sinks.0.uri={work}/floor/"]))
    ray_w = contestants.workload(str(Q1), tuple(settings + [f"sinks.0.uri={work}/ray/"]))
    _cli("up", str(Q1), "--name", "q1", *[a for s in settings for a in ("--set", s)], cwd=work)
    line = str(work / ".podpipe" / "lines" / "q1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    try:
        contestants.run_floor(floor_w)  # imports, caches: not timed
        contestants.ray_work(ray_w)     # Ray's workers warm
        _job(line, [f"sinks.0.uri={work}/warm/"])  # the line's first job: not timed
        times: dict[str, list[float]] = {"line": [], "ray": [], "floor": []}
        for i in range(rounds):
            times["line"].append(_job(line, [f"sinks.0.uri={work}/line-{i}/"])[0])
            started = time.perf_counter()
            contestants.ray_work(ray_w)
            times["ray"].append(time.perf_counter() - started)
            started = time.perf_counter()
            contestants.run_floor(floor_w)
            times["floor"].append(time.perf_counter() - started)
        checked = subprocess.run([sys.executable, "-m", "examples.tpch.data", "check",
                                  str(work / f"line-{rounds - 1}"), "--sf", f"{sf:g}"],
                                 cwd=ROOT, capture_output=True, text=True)
        if checked.returncode != 0:
            raise SystemExit(f"the line's Q1 answer is wrong: {checked.stdout}{checked.stderr}")
    finally:
        ray.shutdown()
        _cli("down", line, cwd=work)
    medians = {k: round(statistics.median(v), 4) for k, v in times.items()}
    return {"scale_factor": sf, "batch_rows": 100_000, "rounds": rounds,
            "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
            "median_seconds": medians,
            "ray_over_line": round(statistics.median(
                r / l for r, l in zip(times["ray"], times["line"])), 3),
            "line_over_floor": round(statistics.median(
                l / f for l, f in zip(times["line"], times["floor"])), 3)}


def _one_batch_spec(work: Path) -> Path:
    """Q1's four stages and its sink over one 5,000-row file."""
    source = work / "one" / "part.parquet"
    source.parent.mkdir(parents=True, exist_ok=True)
    lineitem = ROOT / "data" / "tpch-sf0.1" / "lineitem"
    pq.write_table(pq.read_table(lineitem).slice(0, 5000), source)
    text = Q1.read_text().replace("uri: data/tpch-sf0.1/lineitem/*.parquet",
                                  f"uri: {source.parent}/*.parquet")
    text = text.replace("batchRows: 200000", "batchRows: 5000")
    text = text.replace("uri: out/tpch-q1/}", f"uri: {work}/one-out/, mode: overwrite}}")
    text = text.replace("memory: 1GiB", "memory: 256MiB")
    spec = work / "one.yaml"
    spec.write_text(text)
    return spec


def one_batch(work: Path, jobs: int, cold: int) -> dict:
    spec = _one_batch_spec(work)
    cold_times = []
    for _ in range(cold):
        started = time.perf_counter()
        _cli("run", str(spec), "--quiet", cwd=work)
        cold_times.append(time.perf_counter() - started)
    _cli("up", str(spec), "--name", "one", cwd=work)
    line = str(work / ".podpipe" / "lines" / "one")
    from podpipe.runtime.runs import lines

    record = lines.read(Path(line))
    pids = {"line": record.pid, **record.processes}
    try:
        for _ in range(5):  # the line's first jobs: its processes' first calls
            _job(line, [])
        before = {name: _cpu(pid) for name, pid in pids.items()}
        times = [_job(line, [])[0] for _ in range(jobs)]
        after = {name: _cpu(pid) for name, pid in pids.items()}
    finally:
        _cli("down", line, cwd=work)
    cpu_ms = {name: [round((after[name][i] - before[name][i]) / jobs * 1e3, 2)
                     for i in (0, 1)] for name in pids}  # [user, sys] ms per job
    return {"jobs": jobs, "p50_ms": round(_pct(times, 0.5) * 1e3, 2),
            "p99_ms": round(_pct(times, 0.99) * 1e3, 2),
            "max_ms": round(max(times) * 1e3, 2),
            "cpu_ms_per_job": cpu_ms,
            "cpu_ms_per_job_total": round(sum(u + s for u, s in cpu_ms.values()), 2),
            "cold_runs": cold, "cold_median_s": round(statistics.median(cold_times), 3)}


def _cpu(pid: int) -> tuple[float, float]:
    """A process's user and system CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _rss(pid: int) -> int:
    try:
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


def soak(work: Path, count: int) -> dict:
    """`count` one-batch jobs back to back: sinks checked, memory sampled after each."""
    from podpipe.runtime.runs import lines

    spec = _one_batch_spec(work)
    shm_before = set(Path("/dev/shm").iterdir())
    _cli("up", str(spec), "--name", "soak", cwd=work)
    line = str(work / ".podpipe" / "lines" / "soak")
    record = lines.read(Path(line))
    pids = {"line": record.pid, **record.processes}
    scratch = Path(record.socket).parent
    samples: dict[str, list[int]] = {name: [] for name in [*pids, "scratch"]}
    reference = None
    wrong = 0
    try:
        for i in range(count):
            _, run_dir = _job(line, [f"sinks.0.uri={work}/soak-out/"])
            got = pq.read_table(work / "soak-out")
            if reference is None:
                reference = got
            wrong += not got.equals(reference)
            for name, pid in pids.items():
                samples[name].append(_rss(pid))
            samples["scratch"].append(_tree_bytes(scratch))
            if i > 20:  # (the first jobs' run directories are kept, for a look)
                shutil.rmtree(run_dir)
    finally:
        _cli("down", line, cwd=work)
    time.sleep(0.5)
    left_processes = [p for p in pids.values() if Path(f"/proc/{p}").exists()
                      and "Z" not in Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]]
    left_shm = sorted(str(p) for p in set(Path("/dev/shm").iterdir()) - shm_before)
    growth = {name: (max(v[20:]) - v[20]) if len(v) > 20 else 0 for name, v in samples.items()}
    return {"jobs": count, "wrong_sinks": wrong, "samples": samples,
            "growth_after_20_bytes": growth, "left_processes": left_processes,
            "left_in_dev_shm": left_shm}


def at_once(work: Path, rounds: int, count: int) -> dict:
    """`count` jobs submitted together, to a line with `jobs: 1` and one with `jobs: 2`."""
    from concurrent.futures import ThreadPoolExecutor

    q1_data = f"source.uri={ROOT}/data/tpch-sf0.1/lineitem/*.parquet"
    workloads = {"one_batch": (_one_batch_spec(work), [], count),
                 "q1_sf0.1": (Q1, [q1_data, "source.batchRows=100000"], max(4, count // 5))}
    found: dict[str, dict] = {}
    for name, (spec, settings, n) in workloads.items():
        homes = {}
        for jobs in (1, 2):
            line = f"{name.replace('_', '-').replace('.', '')}-j{jobs}"
            _cli("up", str(spec), "--name", line, "--set", f"jobs={jobs}",
                 *[a for s in settings for a in ("--set", s)], cwd=work)
            homes[jobs] = str(work / ".podpipe" / "lines" / line)
        times: dict[int, list[float]] = {1: [], 2: []}
        answers = []
        try:
            for jobs in (1, 2):  # each line's first job: not timed
                _job(homes[jobs], [f"sinks.0.uri={work}/{name}-warm-{jobs}/"])
            for r in range(rounds):
                for jobs in ((1, 2) if r % 2 == 0 else (2, 1)):
                    sinks = [f"{work}/{name}-{jobs}-{r}-{i}/" for i in range(n)]
                    started = time.perf_counter()
                    with ThreadPoolExecutor(n) as pool:
                        list(pool.map(lambda uri: _job(homes[jobs], [f"sinks.0.uri={uri}"]),
                                      sinks))
                    times[jobs].append(time.perf_counter() - started)
                    answers += [pq.read_table(uri) for uri in sinks]
        finally:
            for home in homes.values():
                _cli("down", home, cwd=work)
        found[name] = {
            "jobs_per_round": n, "rounds": rounds,
            "seconds": {f"jobs_{k}": [round(x, 4) for x in v] for k, v in times.items()},
            "median_seconds": {f"jobs_{k}": round(statistics.median(v), 4)
                               for k, v in times.items()},
            "one_over_two": round(statistics.median(a / b for a, b in zip(times[1], times[2])),
                                  3),
            "wrong_sinks": sum(not t.equals(answers[0]) for t in answers)}
    return found


def chart(soaked: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rss, shm) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, values in soaked["samples"].items():
        if name != "scratch":
            rss.plot(range(1, len(values) + 1), [v / 2**20 for v in values], label=name)
    shm.plot(range(1, len(soaked["samples"]["scratch"]) + 1),
             [v / 2**20 for v in soaked["samples"]["scratch"]])
    rss.set(title="resident memory after each job", xlabel="jobs done", ylabel="RSS, MiB")
    shm.set(title="RAM scratch after each job", xlabel="jobs done", ylabel="MiB")
    rss.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.rename(path)


def markdown(results: dict, command: str) -> str:
    q1, one, soaked = results["q1"], results["one_batch"], results["soak"]
    together = results.get("at_once", {})
    cpu = ", ".join(f"{name} {u:g} + {s:g}" for name, (u, s) in
                    one.get("cpu_ms_per_job", {}).items()) + " ms user + system"
    m = q1["median_seconds"]
    growth = ", ".join(f"{k} {v / 2**20:+.1f} MiB" for k, v in
                       soaked["growth_after_20_bytes"].items())
    def when(part: dict) -> str:
        return part.get("measured", "before 2026-12-07")
    return f"""# A standing line ({results['cores']} cores)

`{command}` ({results['date']}; a part it did not measure is as last written: each
section says when it was measured)

## Q1 at SF {q1['scale_factor']:g}, {q1['batch_rows']:,}-row batches, {q1['rounds']} rounds ({when(q1)})

| | median s | |
|---|---:|---|
| job on a warm line (submit to committed) | {m['line']} | |
| warm Ray, the work alone | {m['ray']} | Ray / line, median of rounds: **{q1['ray_over_line']}×** |
| the floor, work alone (one process) | {m['floor']} | line / floor: {q1['line_over_floor']}× |

## A one-batch job (5,000 rows, four stages, a sink), {one['jobs']} jobs ({when(one)})

p50 **{one['p50_ms']} ms**, p99 **{one['p99_ms']} ms** (max {one['max_ms']} ms) from submit
to the sink committed; a cold `podpipe run` of the same spec: {one['cold_median_s']} s
(median of {one['cold_runs']}). CPU a job, all the line's processes:
{one.get('cpu_ms_per_job_total', '?')} ms ({cpu}).

## {soaked['jobs']} jobs back to back ({when(soaked)})

Sinks that differed from the first job's: {soaked['wrong_sinks']}. Growth from job 20 to
the end: {growth}. After `down`: processes left {soaked['left_processes']}, in /dev/shm
{soaked['left_in_dev_shm']}.

![memory over jobs](line.png)
""" + "".join(f"""
## Jobs at once: {w['jobs_per_round']} {name} jobs submitted together, {w['rounds']} rounds ({when(together)})

| line | median s, first submit to last job's end |
|---|---:|
| `jobs: 1` | {w['median_seconds']['jobs_1']} |
| `jobs: 2` | {w['median_seconds']['jobs_2']} |

`jobs: 1` / `jobs: 2`, median of rounds: **{w['one_over_two']}×**; sinks that differed
from the first job's: {w['wrong_sinks']}.
""" for name, w in together.items() if isinstance(w, dict) and "rounds" in w)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--cold", type=int, default=10)
    parser.add_argument("--soak", type=int, default=500)
    parser.add_argument("--at-once", type=int, default=50)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="measure only these (the others stay as last written)")
    args = parser.parse_args()
    if not (ROOT / "data" / f"tpch-sf{args.sf:g}").exists() or \
            not (ROOT / "data" / "tpch-sf0.1").exists():
        raise SystemExit(f"make the data first: python -m examples.tpch.data generate "
                         f"--sf {args.sf:g} (and --sf 0.1)")
    results = json.loads((RESULTS / "line.json").read_text()) if args.parts != PARTS and \
        (RESULTS / "line.json").exists() else {}  # the other parts as last measured
    today = time.strftime("%Y-%m-%d")
    results.update({"date": today, "cores": os.cpu_count()})
    with tempfile.TemporaryDirectory(prefix="podpipe-line-bench-") as tmp:
        work = Path(tmp)
        if "one_batch" in args.parts:
            results["one_batch"] = one_batch(work, args.jobs, args.cold)
        if "q1" in args.parts:
            results["q1"] = q1_against_ray(work, args.sf, args.rounds)
        if "soak" in args.parts:
            results["soak"] = soak(work, args.soak)
        if "at_once" in args.parts:
            results["at_once"] = at_once(work, args.rounds, args.at_once)
    for part in args.parts:  # (each part says when it was measured)
        results[part]["measured"] = today
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "line.json").write_text(json.dumps(results, indent=2) + "\n")
    DOCS.mkdir(parents=True, exist_ok=True)
    chart(results["soak"], DOCS / "line.png")
    command = "python benchmarks/line.py " + " ".join(sys.argv[1:])
    (DOCS / "line.md").write_text(markdown(results, command.strip()))
    print(json.dumps({k: v for k, v in results.items() if k != "soak"}, indent=2))
    print({k: v for k, v in results["soak"].items() if k != "samples"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
