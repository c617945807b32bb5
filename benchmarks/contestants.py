"""The other ways to run a pipeline's stages, for benchmarks/paradigms.py.

Every contestant runs the same spec: the same source batches (podpipe's source
plan), the same stage functions, the same reduce, and writes the same sink files.
Each is one process tree, started fresh, that prints one JSON line of counts last.

    python -m benchmarks.contestants floor    SPEC [--set K=V]...
    python -m benchmarks.contestants ray      SPEC [--set K=V]...
    python -m benchmarks.contestants services SPEC [--set K=V]... [--inflight N]
    python -m benchmarks.contestants store    SPEC --store URL [--set K=V]...

(from the repository root: Ray's workers and the steps import this module).

- floor: the functions chained in one process (floor.py).
- ray: `ray.remote` tasks chained per batch through Ray's object store.
- services (paradigm 1): every node an aiohttp service on loopback; a driver
  POSTs each batch from service to service as an Arrow IPC stream.
- store (paradigm 2): every node a step, a fresh process started once its inputs'
  steps are done, as Argo Workflows runs a DAG; each step reads its inputs from
  the store (s3:// or file://) and writes its output back, Parquet between steps.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import io
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Ray's workers, the services and the steps import this module and the stages.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from podpipe.model import spec as specs  # noqa: E402
from podpipe.model.graph import BATCH, Graph  # noqa: E402
from podpipe.model.spec import SOURCE  # noqa: E402
from podpipe.runtime.data import arrowfile, sink, source  # noqa: E402


class Workload:
    """A spec, as every contestant needs it: graph, functions, source plan, sinks."""

    def __init__(self, spec_path: str, overrides: list[str]) -> None:
        self.spec_path, self.overrides = spec_path, overrides
        self.pipeline = specs.load(spec_path, overrides)
        self.graph = Graph.of(self.pipeline)
        self.plan = source.plan(self.pipeline.source)
        self.per_batch = [n for n in self.graph.order
                          if self.graph.domain[n] == BATCH and n != SOURCE]
        self.once = [n for n in self.graph.order
                     if self.graph.domain[n] != BATCH and n not in self.graph.tables]
        self.tables = list(t.name for t in self.pipeline.tables)
        self.sinks = {s.name: s for s in self.pipeline.sinks}
        self._functions: dict = {}
        self._loader = None
        self._writers: dict = {}
        self._tables: dict = {}

    def function(self, node: str):
        if node not in self._functions:
            module, _, name = self.pipeline.stage(node).run.partition(":")
            self._functions[node] = getattr(importlib.import_module(module), name)
        return self._functions[node]

    def table(self, name: str) -> pa.Table:
        """A table of the spec, loaded once per process (as podpipe loads it)."""
        if name not in self._tables:
            from podpipe.runtime.data import tables

            self._tables[name] = tables.load(self.pipeline.table(name))
        return self._tables[name]

    def load(self, batch: int) -> pa.Table:
        if self._loader is None:
            self._loader = source.Loader(self.pipeline.source)
        return self._loader.load(self.plan[batch])

    def apply(self, node: str, inputs: list[pa.Table], batch: int) -> pa.Table | None:
        """Run `node` on its inputs: a stage's function, or a sink's write."""
        if node in self.sinks:
            if node not in self._writers:
                self._writers[node] = sink.Writer(self.sinks[node], "")  # (no staging)
            self._writers[node].write(inputs[0], batch)
            return None
        return arrowfile.to_arrow(self.function(node)(*inputs))

    def is_reduce_input(self, node: str) -> bool:
        return any(self.graph.domain[c] != BATCH for c in self.graph.consumers[node])


@functools.lru_cache(maxsize=4)
def workload(spec_path: str, overrides: tuple[str, ...]) -> Workload:
    return Workload(spec_path, list(overrides))


# -- floor -------------------------------------------------------------------------


def run_floor(w: Workload) -> dict:
    kept: dict[str, list[pa.Table]] = {}
    tables = {name: w.table(name) for name in w.tables}
    for batch in range(len(w.plan)):
        outputs = {SOURCE: w.load(batch), **tables}
        for node in w.per_batch:
            outputs[node] = w.apply(node, [outputs[i] for i in w.graph.inputs[node]], batch)
        for node, table in outputs.items():
            if w.is_reduce_input(node):
                kept.setdefault(node, []).append(table)
    outputs = {node: pa.concat_tables(parts) for node, parts in kept.items()}
    outputs.update(tables)
    for node in w.once:
        outputs[node] = w.apply(node, [outputs[i] for i in w.graph.inputs[node]], 0)
    return {"shared_memory_bytes": 0, "network_storage_bytes": 0}


# -- Ray ---------------------------------------------------------------------------


def _ray_load(spec_path, overrides, batch):
    table = workload(spec_path, overrides).load(batch)
    return table, table.nbytes


def _ray_step(spec_path, overrides, node, batch, groups, *tables):
    """`groups`: how many tables each input has (a reduce gets every batch's)."""
    inputs, at = [], 0
    for count in groups:
        inputs.append(pa.concat_tables(tables[at:at + count]))
        at += count
    table = workload(spec_path, overrides).apply(node, inputs, batch)
    return table, (table.nbytes if table is not None else 0)


def run_ray(w: Workload) -> dict:
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    init_seconds = time.perf_counter() - started
    moved = ray_work(w)
    work_seconds = time.perf_counter() - started - init_seconds
    ray.shutdown()
    return {"shared_memory_bytes": moved, "network_storage_bytes": 0,
            "ray_init_seconds": round(init_seconds, 3),
            "ray_work_seconds": round(work_seconds, 3)}


def ray_work(w: Workload) -> int:
    """The workload on a Ray that is up (`ray.init` done): one task chain per batch,
    the reduce over every chain's last output; the bytes its object store held."""
    import ray

    from benchmarks import contestants  # by name, not as __main__: workers import it

    load = ray.remote(num_returns=2)(contestants._ray_load)
    step = ray.remote(num_returns=2)(contestants._ray_step)
    args = (w.spec_path, tuple(w.overrides))
    sizes, kept, done = [], {}, []
    tables = {name: ray.put(w.table(name)) for name in w.tables}  # once, in its store
    put = sum(w.table(name).nbytes for name in w.tables)
    for batch in range(len(w.plan)):
        refs = dict(tables)
        refs[SOURCE], size = load.remote(*args, batch)
        sizes.append(size)
        for node in w.per_batch:
            ins = [refs[i] for i in w.graph.inputs[node]]
            refs[node], size = step.remote(*args, node, batch, [1] * len(ins), *ins)
            sizes.append(size)
            if node in w.sinks:
                done.append(refs[node])
        for node, ref in refs.items():
            if w.is_reduce_input(node):
                kept.setdefault(node, []).append(ref)
    refs = {**kept, **tables}
    for node in w.once:
        groups = [refs[i] if isinstance(refs[i], list) else [refs[i]]
                  for i in w.graph.inputs[node]]
        refs[node], size = step.remote(*args, node, 0, [len(g) for g in groups],
                                       *[r for g in groups for r in g])
        sizes.append(size)
        if node in w.sinks:
            done.append(refs[node])
    ray.get(done)
    return sum(ray.get(sizes)) + put


# -- paradigm 1: services ----------------------------------------------------------

_LEN = struct.Struct("!Q")


def encode(streams: list[bytes]) -> bytes:
    """Several Arrow IPC streams in one body, each after its length."""
    return b"".join(_LEN.pack(len(s)) + s for s in streams)


def decode(body: bytes) -> list[bytes]:
    streams, at = [], 0
    while at < len(body):
        (size,) = _LEN.unpack_from(body, at)
        streams.append(body[at + _LEN.size:at + _LEN.size + size])
        at += _LEN.size + size
    return streams


def to_stream(table: pa.Table) -> bytes:
    sink_ = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink_, table.schema) as writer:
        writer.write_table(table)
    return sink_.getvalue().to_pybytes()


def from_stream(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def serve(w: Workload, node: str) -> None:
    """One node as an HTTP service; prints its port, serves until killed."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        batch = int(request.query.get("batch", "0"))
        if node == SOURCE:
            table = w.load(batch)
        elif node in w.tables:
            table = w.table(node)
        else:
            table = w.apply(node, [from_stream(s) for s in decode(body)], batch)
        return web.Response(body=to_stream(table) if table is not None else b"")

    async def main() -> None:
        app = web.Application(client_max_size=4 << 30)
        app.router.add_post("/", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        print(port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_services(w: Workload, spec_path: str, overrides: list[str], inflight: int) -> dict:
    import aiohttp

    flags = [a for o in overrides for a in ("--set", o)]
    services, ports = {}, {}
    for node in w.graph.order:
        services[node] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.contestants", "serve", spec_path, "--node", node, *flags],
            stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        for node, process in services.items():
            ports[node] = int(process.stdout.readline())
        moved = [0]

        async def post(session, node: str, body: bytes, batch: int) -> bytes:
            url = f"http://127.0.0.1:{ports[node]}/?batch={batch}"
            async with session.post(url, data=body) as response:
                response.raise_for_status()
                out = await response.read()
            moved[0] += len(body) + len(out)
            return out

        async def one(session, gate, tables, batch: int) -> dict[str, bytes]:
            async with gate:  # (a table goes with every call that reads it)
                out = {SOURCE: await post(session, SOURCE, b"", batch), **tables}
                for node in w.per_batch:
                    body = encode([out[i] for i in w.graph.inputs[node]])
                    out[node] = await post(session, node, body, batch)
                return {n: s for n, s in out.items() if w.is_reduce_input(n)}

        async def drive() -> None:
            gate = asyncio.Semaphore(inflight)
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                tables = {t: await post(session, t, b"", 0) for t in w.tables}
                kept = await asyncio.gather(*[one(session, gate, tables, b)
                                              for b in range(len(w.plan))])
                outs: dict[str, bytes] = dict(tables)
                for node in {n for k in kept for n in k}:
                    table = pa.concat_tables([from_stream(k[node]) for k in kept])
                    outs[node] = to_stream(table)
                for node in w.once:
                    body = encode([outs[i] for i in w.graph.inputs[node]])
                    outs[node] = await post(session, node, body, 0)

        asyncio.run(drive())
    finally:
        for process in services.values():
            process.kill()
            process.wait()
            process.stdout.close()
    return {"shared_memory_bytes": 0, "network_storage_bytes": moved[0]}


# -- paradigm 2: a store between steps ---------------------------------------------


def _key(store: str, node: str, batch: int) -> str:
    return f"{store.rstrip('/')}/{node}/{batch:06d}.parquet"


def step(w: Workload, node: str, store: str) -> dict:
    """One step (a fresh process): every batch of `node`, inputs read from the store."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(store)
    counts = {"put": 0, "get": 0}

    def get(key: str) -> pa.Table:
        data = fs.cat_file(key)
        counts["get"] += len(data)
        return pq.read_table(pa.BufferReader(data))

    def put(key: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        fs.pipe_file(key, buffer.getvalue())
        counts["put"] += buffer.tell()

    single = w.graph.domain[node] != BATCH
    if node not in w.sinks:
        fs.makedirs(f"{store.rstrip('/')}/{node}", exist_ok=True)
    for batch in [0] if single else range(len(w.plan)):
        if node == SOURCE:
            inputs = []
            table = w.load(batch)
        elif node in w.tables:
            table = w.table(node)
        else:
            inputs = []
            for name in w.graph.inputs[node]:
                if name in w.tables:  # read from the store by every function that needs it
                    inputs.append(get(_key(store, name, 0)))
                elif single and w.graph.domain[name] == BATCH:
                    inputs.append(pa.concat_tables(
                        [get(_key(store, name, b)) for b in range(len(w.plan))]))
                else:
                    inputs.append(get(_key(store, name, batch)))
            table = w.apply(node, inputs, batch)
        if table is not None:
            put(_key(store, node, batch), table)
    return counts


def run_store(w: Workload, spec_path: str, overrides: list[str], store: str) -> dict:
    """Steps in DAG order, each once its inputs' steps are done, at most one per core."""
    flags = [a for o in overrides for a in ("--set", o)]
    waiting = list(w.graph.order)
    running: dict[str, subprocess.Popen] = {}
    finished: set[str] = set()
    moved = 0
    while waiting or running:
        for node in list(waiting):
            if len(running) < (os.cpu_count() or 1) and \
                    all(i in finished for i in w.graph.inputs[node]):
                waiting.remove(node)
                running[node] = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.contestants", "step", spec_path, "--node", node,
                     "--store", store, *flags], stdout=subprocess.PIPE, text=True)
        pid, status = os.wait()
        node = next(n for n, p in running.items() if p.pid == pid)
        process = running.pop(node)
        process.returncode = os.waitstatus_to_exitcode(status)
        out = process.stdout.read()
        process.stdout.close()
        if process.returncode != 0:
            raise SystemExit(f"step {node} failed with code {process.returncode}")
        counts = json.loads(out.strip().splitlines()[-1])
        moved += counts["put"] + counts["get"]
        finished.add(node)
    return {"shared_memory_bytes": 0, "network_storage_bytes": moved}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("contestant", choices=("floor", "ray", "services", "store",
                                               "serve", "step"))
    parser.add_argument("spec")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--store", help="store URL (store, step)")
    parser.add_argument("--node", help="the node (serve, step)")
    parser.add_argument("--inflight", type=int, default=4,
                        help="services: batches on the line at once")
    args = parser.parse_args()
    w = workload(args.spec, tuple(args.set))
    started = time.perf_counter()
    if args.contestant == "serve":
        serve(w, args.node)
        return 0
    if args.contestant == "step":
        counts = step(w, args.node, args.store)
    elif args.contestant == "floor":
        counts = run_floor(w)
    elif args.contestant == "ray":
        counts = run_ray(w)
    elif args.contestant == "services":
        counts = run_services(w, args.spec, args.set, args.inflight)
    else:
        counts = run_store(w, args.spec, args.set, args.store)
    counts["inner_seconds"] = round(time.perf_counter() - started, 4)
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    code = main()
    sys.stdout.flush()
    os._exit(code)  # skip pyarrow's slow teardown, as podpipe's processes do
