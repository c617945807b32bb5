"""Handoff cost: from "producer finished the batch" to "consumer holds the table".

Three real processes, as in a pod: a producer writes a batch into RAM scratch with
podpipe's writer and reports it; a relay (standing in for the conductor) passes
the metadata on; the consumer memory-maps the file with podpipe's reader. Both
ends stamp CLOCK_MONOTONIC, which all processes share. For contrast the consumer
also reads the same file by copying it into memory (what a store-in-between
pipeline pays at best). Batch sizes run from 1 MiB to 1 GiB.

Also the cost of writing a batch into fresh tmpfs pages against writing it over a
file already there (what the pool of warm files saves), with podpipe's writer.

    python benchmarks/handoff.py [--max-mib 1024] [--repeat 9]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from podpipe.runtime.data import arrowfile

RESULTS = Path(__file__).parent / "results"
PAUSE_S = 0.25


def _send(sock: socket.socket, message: dict) -> None:
    """A length-prefixed JSON message (the benchmark's own wire: podpipe's typed one
    carries no timestamps; the framing costs the same)."""
    data = json.dumps(message).encode()
    sock.sendall(len(data).to_bytes(4, "big") + data)


def _recv(sock: socket.socket) -> dict:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data
    return json.loads(exactly(int.from_bytes(exactly(4), "big")))


def _table(nbytes: int) -> pa.Table:
    rows = nbytes // 16
    values = np.arange(rows, dtype=np.int64)
    return pa.table({"a": values, "b": values.astype(np.float64)})


def producer(sock_path: str, sizes: list[int], repeat: int, folder: str) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    for size in sizes:
        table = _table(size)
        for i in range(repeat):
            path = os.path.join(folder, f"{size}-{i}.arrow")
            nbytes, checksum = arrowfile.write_table(table, path)
            # The same idle time before every handoff, whatever the size: otherwise
            # the relay and consumer idle longer while a larger batch is written and
            # wake slower (deeper CPU idle states, colder caches), which is not a
            # cost of the handoff.
            time.sleep(PAUSE_S)
            _send(sock, {"type": "done", "path": path, "nbytes": nbytes,
                                 "t": time.monotonic_ns()})
            _recv(sock)  # wait until the consumer is done with it
    _send(sock, {"type": "stop"})


def relay(listener: socket.socket) -> None:
    """The conductor's part: metadata in from one agent, a task out to the next."""
    prod, _ = listener.accept()
    cons, _ = listener.accept()
    while True:
        message = _recv(prod)
        _send(cons, message)
        if message["type"] == "stop":
            return
        _send(prod, _recv(cons))


def consumer(sock_path: str, out: str) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sock_path)
    rows = []
    while True:
        message = _recv(sock)
        received = time.monotonic_ns()
        if message["type"] == "stop":
            break
        table = arrowfile.read_table(message["path"])
        held = time.monotonic_ns()
        assert table.num_rows > 0
        start = time.monotonic_ns()
        with pa.OSFile(message["path"]) as f:  # the copying read, for contrast
            copied = pa.ipc.open_file(f).read_all()
        copy_ns = time.monotonic_ns() - start
        assert copied.num_rows == table.num_rows
        rows.append({"bytes": message["nbytes"], "handoff_ns": held - message["t"],
                     "map_ns": held - received,
                     "copy_read_ns": copy_ns})
        del table, copied
        os.unlink(message["path"])
        _send(sock, {"type": "ack"})
    Path(out).write_text(json.dumps(rows))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--role", choices=["producer", "consumer"])
    parser.add_argument("--socket")
    parser.add_argument("--sizes")
    parser.add_argument("--folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.role == "producer":
        producer(args.socket, json.loads(args.sizes), args.repeat, args.folder)
        return 0
    if args.role == "consumer":
        consumer(args.socket, args.out)
        return 0

    sizes = [mib << 20 for mib in (1, 4, 16, 64, 256, 1024) if mib <= args.max_mib]
    warmup = 3 << 19  # 1.5 MiB, a size no other round has: discarded
    with tempfile.TemporaryDirectory(prefix="handoff-bench-", dir="/dev/shm") as folder:
        sock_path = os.path.join(folder, "relay.sock")
        out = os.path.join(folder, "result.json")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(sock_path)
        listener.listen(2)
        me = [sys.executable, __file__, "--socket", sock_path, "--repeat", str(args.repeat)]
        prod = subprocess.Popen(me + ["--role", "producer", "--sizes",
                                      json.dumps([warmup] + sizes),
                                      "--folder", folder])
        time.sleep(0.5)  # the producer connects first
        cons = subprocess.Popen(me + ["--role", "consumer", "--out", out])
        relay(listener)
        prod.wait()
        cons.wait()
        rows = json.loads(Path(out).read_text())
    report = []
    for size in sizes:
        mine = [r for r in rows if abs(r["bytes"] - size) < size * 0.01 + 4096]
        report.append({
            "batch_bytes": size,
            "handoff_ms_median": statistics.median(r["handoff_ns"] for r in mine) / 1e6,
            "handoff_ms_max": max(r["handoff_ns"] for r in mine) / 1e6,
            "of_which_map_ms_median": statistics.median(r["map_ns"] for r in mine) / 1e6,
            "copy_read_ms_median": statistics.median(r["copy_read_ns"] for r in mine) / 1e6,
            "runs": len(mine),
        })
    first, last = report[0]["handoff_ms_median"], report[-1]["handoff_ms_median"]
    result = {"benchmark": "handoff", "repeat": args.repeat, "sizes": report,
              "ratio_largest_to_smallest": last / first,
              "write_64mib": warm_pages(args.repeat)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "handoff.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'batch':>10} {'handoff median':>15} {'max':>9} {'(map)':>9} {'copying read':>13}")
    for r in report:
        print(f"{r['batch_bytes'] >> 20:>6} MiB {r['handoff_ms_median']:>12.3f} ms "
              f"{r['handoff_ms_max']:>6.3f} ms {r['of_which_map_ms_median']:>6.3f} ms "
              f"{r['copy_read_ms_median']:>10.2f} ms")
    print(f"largest / smallest handoff: {result['ratio_largest_to_smallest']:.2f}x")
    w = result["write_64mib"]
    print(f"writing 64 MiB: fresh pages {w['fresh_ms_median']:.1f} ms, over a warm file "
          f"{w['warm_ms_median']:.1f} ms ({w['fresh_ms_median'] / w['warm_ms_median']:.2f}x)")
    return 0


def warm_pages(repeat: int) -> dict[str, float]:
    """Median time to write a 64 MiB table with podpipe's writer into a new file, and
    over a file of the same size (the pool's warm pages)."""
    import numpy as np
    import pyarrow as pa

    from podpipe.runtime.data import arrowfile

    table = pa.table({f"c{i}": np.random.default_rng(i).random(1 << 20) for i in range(8)})
    fresh, warm = [], []
    with tempfile.TemporaryDirectory(prefix="warm-bench-", dir="/dev/shm") as folder:
        for i in range(repeat):
            start = time.perf_counter()
            arrowfile.write_table(table, f"{folder}/fresh-{i}.arrow")
            fresh.append(time.perf_counter() - start)
            os.unlink(f"{folder}/fresh-{i}.arrow")
        arrowfile.write_table(table, f"{folder}/pooled.arrow")
        for _ in range(repeat):
            start = time.perf_counter()
            arrowfile.write_table(table, f"{folder}/out.arrow", reuse=f"{folder}/pooled.arrow")
            warm.append(time.perf_counter() - start)
            os.rename(f"{folder}/out.arrow", f"{folder}/pooled.arrow")
    return {"fresh_ms_median": statistics.median(fresh) * 1e3,
            "warm_ms_median": statistics.median(warm) * 1e3}


if __name__ == "__main__":
    sys.exit(main())
