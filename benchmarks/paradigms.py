"""Prove the point: the same pipeline run the three ways, by Ray, and by the floor.

One command, side by side in one run: for each workload (TPC-H Q1, and a wide
7-stage graph with fan-out and fan-in) and each contestant, whole-process wall time
(median, min, max of --repeat runs, the contestants' order rotating each round),
bytes moved between stages, and peak memory (RSS of the contestant's whole process
tree plus what it added to /dev/shm, sampled every 50 ms). Every contestant's sink
must equal the floor's, and Q1 the official answer.

    python benchmarks/paradigms.py [--sf 1] [--repeat 3] [--out docs/benchmarks]
    python benchmarks/paradigms.py --quick --out /tmp/x     # a smoke test (CI)

Writes OUT/paradigms.json, OUT/paradigms.md and OUT/paradigms.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib import metadata
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {"q1": ROOT / "examples" / "tpch" / "q1.yaml",
             "q12": ROOT / "examples" / "tpch" / "q12.yaml",  # a table: orders
             "q3": ROOT / "examples" / "tpch" / "q3.yaml",    # tables: orders, customer
             "wide": ROOT / "benchmarks" / "workloads" / "wide.yaml"}
CONTESTANTS = ("podpipe", "floor", "ray", "services", "store-dir", "store-s3")
LABELS = {"podpipe": "podpipe (paradigm 3)", "floor": "floor (one process)", "ray": "Ray tasks",
          "services": "HTTP services (paradigm 1)", "store-dir": "store: local dir (paradigm 2)",
          "store-s3": "store: S3/moto (paradigm 2)"}
SHM = Path("/dev/shm")


class MotoServer:
    """moto's standalone S3 server on a loopback port: the object store of paradigm 2."""

    def __enter__(self) -> "MotoServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                    "AWS_DEFAULT_REGION": "us-east-1",
                    "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{self.port}"}
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise SystemExit("moto's server did not start")
                time.sleep(0.1)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait()
        self.log.close()


class Sampler(threading.Thread):
    """Peak of (RSS of a process tree + growth of /dev/shm), every 50 ms."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.shm_base = shutil.disk_usage(SHM).used
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            rss = 0
            for process in tree:
                try:
                    rss += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            shm = max(0, shutil.disk_usage(SHM).used - self.shm_base)
            self.peak = max(self.peak, rss + shm)


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Wall seconds, peak bytes and stdout of one whole-process run."""
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    sampler.start()
    out, err = process.communicate()
    elapsed = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({process.returncode}):\n{err[-3000:]}")
    return elapsed, sampler.peak, out


def command(contestant: str, spec: Path, settings: list[str], work: Path,
            store_url: str | None) -> list[str]:
    if contestant == "podpipe":
        return [sys.executable, "-m", "podpipe", "run", str(spec), "--quiet",
                "--run-dir", str(work / "run"), *settings]
    kind = "store" if contestant.startswith("store") else contestant
    argv = [sys.executable, "-m", "benchmarks.contestants", kind, str(spec), *settings]
    return argv + (["--store", store_url] if store_url else [])


def moved(contestant: str, out: str, work: Path) -> dict[str, int]:
    """Bytes moved between stages, as the contestant counted them (and Ray's split of
    its time into starting its local cluster and the work)."""
    if contestant != "podpipe":
        counts = json.loads(out.strip().splitlines()[-1])
        keep = ("shared_memory_bytes", "network_storage_bytes", "ray_init_seconds",
                "ray_work_seconds")
        return {k: counts[k] for k in keep if k in counts}
    status = json.loads((work / "run" / "status.json").read_text())
    scratch = sum(s["bytes_written"] for s in status["stages"].values() if s["kind"] != "sink")
    return {"shared_memory_bytes": scratch, "network_storage_bytes": 0}


def run_workload(name: str, spec: Path, lineitem: Path, args, moto: MotoServer | None,
                 contestants: list[str]) -> dict:
    from examples.tpch import data

    from podpipe.model import spec as specs

    runs: dict[str, list[dict]] = {c: [] for c in contestants}
    tables = [t.name for t in specs.load(spec).tables]  # TPC-H tables beside lineitem
    scratch = Path(tempfile.mkdtemp(prefix=f"paradigms-{name}-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    if moto:
        env.update(moto.env)
    try:
        for round_ in range(args.repeat):
            order = contestants[round_ % len(contestants):] + \
                contestants[:round_ % len(contestants)]
            for contestant in order:
                work = scratch / f"{contestant}-{round_}"
                work.mkdir()
                settings = ["--set", f"source.uri={lineitem}/*.parquet",
                            "--set", f"source.batchRows={args.batch_rows}",
                            "--set", f"sinks.0.uri={work / 'out'}",
                            "--set", f"memory={args.memory}"] + [
                    a for t in tables for a in ("--set", f"tables.{t}.uri={lineitem.parent / t}/")]
                store = {"store-dir": f"file://{work / 'store'}",
                         "store-s3": f"s3://paradigms/{name}-{round_}"}.get(contestant)
                seconds, peak, out = measure(
                    command(contestant, spec, settings, work, store), env)
                result = pq.read_table(work / "out")
                runs[contestant].append({"seconds": seconds, "peak_bytes": peak,
                                         **moved(contestant, out, work), "result": result})
                print(f"  {name:>5} {contestant:>10}: {seconds:7.2f} s  "
                      f"peak {peak / 2**20:7.0f} MiB", flush=True)
                shutil.rmtree(work)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = runs["floor"][0]["result"]
    for contestant, results in runs.items():
        for r in results:
            if not r.pop("result").equals(reference):
                raise SystemExit(f"{name}: {contestant}'s output differs from the floor's")
    query = {"q1": 1, "q12": 12, "q3": 3}.get(name)
    official = any(abs(args.sf - s) < 1e-9 for s in data.ANSWER_SCALES)  # else: the floor's
    if query and official and (problems := data.compare(reference, args.sf, query)):
        raise SystemExit(f"{name}: the answer differs from the official one: {problems}")
    summary = {}
    for contestant, results in runs.items():
        times = [r["seconds"] for r in results]
        summary[contestant] = {
            "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "runs_s": times,
            "peak_bytes": max(r["peak_bytes"] for r in results),
            "shared_memory_bytes": results[0]["shared_memory_bytes"],
            "network_storage_bytes": results[0]["network_storage_bytes"],
        }
        for key in ("ray_init_seconds", "ray_work_seconds"):
            if key in results[0]:
                summary[contestant][f"median_{key}"] = statistics.median(r[key] for r in results)
    return summary


def machine() -> dict:
    versions = {}
    for package in ("podpipe", "pyarrow", "ray", "aiohttp", "s3fs", "moto", "duckdb"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {"cores": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(), "os": platform.platform(),
            "versions": versions}


def targets(results: dict) -> dict:
    q1 = results["workloads"]["q1"]
    p = q1["podpipe"]
    return {
        "q1_ray_over_podpipe": q1["ray"]["median_s"] / p["median_s"],             # >= 2
        "q1_store_s3_over_podpipe": q1["store-s3"]["median_s"] / p["median_s"],   # >= 5
        "q1_bytes_services_over_podpipe": _ratio(q1["services"]["network_storage_bytes"],
                                                 p["network_storage_bytes"]),       # >= 10
        "q1_bytes_store_over_podpipe": _ratio(q1["store-s3"]["network_storage_bytes"],
                                              p["network_storage_bytes"]),          # >= 10
    }


def _ratio(a: float, b: float) -> float | str:
    return a / b if b else ("infinite" if a else "n/a")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB RAM, "
             f"Python {m['python']}, " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()
                                                    if v) + ".",
             f"TPC-H SF {results['scale_factor']:g}, {results['batch_rows']:,} rows per batch, "
             f"{results['repeat']} runs each, wall time of the whole process tree.", ""]
    for name, summary in results["workloads"].items():
        p = summary["podpipe"]["median_s"]
        lines += [f"**{name}**", "",
                  "| contestant | median s | min–max s | × podpipe | moved through network/storage "
                  "| moved through shared memory | peak memory |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for contestant, s in summary.items():
            lines.append(
                f"| {LABELS[contestant]} | {s['median_s']:.2f} | {s['min_s']:.2f}–{s['max_s']:.2f} "
                f"| {s['median_s'] / p:.2f} | {_mib(s['network_storage_bytes'])} "
                f"| {_mib(s['shared_memory_bytes'])} | {_mib(s['peak_bytes'])} |")
        ray = summary.get("ray", {})
        if "median_ray_init_seconds" in ray:
            lines.append("")
            lines.append(f"Ray's median splits into {ray['median_ray_init_seconds']:.2f} s "
                         f"starting its local cluster (`ray.init`) and "
                         f"{ray['median_ray_work_seconds']:.2f} s of work "
                         f"({ray['median_ray_work_seconds'] / p:.2f} × podpipe's whole run).")
        lines.append("")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["workloads"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    contestants = list(next(iter(results["workloads"].values())))
    width = 0.8 / len(contestants)
    for i, contestant in enumerate(contestants):
        xs = [j + i * width for j in range(len(names))]
        summary = [results["workloads"][n][contestant] for n in names]
        axes[0].bar(xs, [s["median_s"] for s in summary], width, label=LABELS[contestant],
                    yerr=[[s["median_s"] - s["min_s"] for s in summary],
                          [s["max_s"] - s["median_s"] for s in summary]])
        axes[1].bar(xs, [s["network_storage_bytes"] / 2**20 for s in summary], width,
                    label=LABELS[contestant])
    for ax, title in zip(axes, ("wall time, s (median, min–max)",
                                "bytes through network or storage, MiB")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"TPC-H SF {results['scale_factor']:g} on {results['machine']['cores']} cores")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.rename(path)


def write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.rename(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sf", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=500_000)
    parser.add_argument("--memory", default="2GiB")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS),
                        default=["q1", "wide"])
    parser.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS))
    parser.add_argument("--quick", action="store_true",
                        help="SF 0.01, one run each: a smoke test, not for its timings")
    args = parser.parse_args()
    if args.quick:
        args.sf, args.repeat, args.batch_rows, args.memory = 0.01, 1, 20_000, "256MiB"
    if "floor" not in args.contestants:
        args.contestants.insert(0, "floor")  # every output is checked against it
    sys.path.insert(0, str(ROOT))
    from examples.tpch import data

    lineitem = data.generate(args.sf, ROOT / data.default_dir(args.sf))
    results = {"benchmark": "paradigms", "scale_factor": args.sf, "repeat": args.repeat,
               "batch_rows": args.batch_rows, "memory": args.memory, "quick": args.quick,
               "machine": machine(), "workloads": {}}
    with MotoServer() as moto:
        subprocess.run([sys.executable, "-c", "import fsspec; fsspec.filesystem('s3')"
                        ".mkdir('paradigms')"], env={**os.environ, **moto.env}, check=True)
        for name in args.workloads:
            results["workloads"][name] = run_workload(name, WORKLOADS[name], lineitem, args,
                                                      moto, args.contestants)
    if "q1" in results["workloads"] and set(CONTESTANTS) <= set(args.contestants):
        results["targets"] = targets(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "paradigms.json", json.dumps(results, indent=2) + "\n")
    write(args.out / "paradigms.md", markdown(results) + "\n")
    chart(results, args.out / "paradigms.png")
    print(markdown(results))
    print(json.dumps(results.get("targets", {}), indent=2))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
