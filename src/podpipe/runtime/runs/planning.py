"""`podpipe plan`: what a run would do, without running it — which replica runs
which shards and the bytes each pulls (from the source's footers alone), and how a
number of cores would be split among the nodes, from a finished run's figures."""

from __future__ import annotations

from typing import Any

from podpipe.errors import UsageError
from podpipe.model import shards as sharding
from podpipe.model.graph import Graph
from podpipe.runtime.rundir import status
from podpipe.runtime.runs import following as runs
from podpipe.runtime.runs.pod import validate


def plan(spec_path: str, *, overrides: list[str] | tuple[str, ...] = (),
         replicas: int = 1) -> dict[str, Any]:
    """Which replica runs which shards, and the source bytes each pulls, from the
    source's footers alone (`podpipe plan`)."""
    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: expected at least 1")
    pipeline = validate(spec_path, overrides)
    from podpipe.runtime.data import source

    batches = source.plan(pipeline.source)
    pods = sharding.plan([b.nbytes for b in batches], pipeline.shards, replicas)
    return {"pipeline": pipeline.name, "shards": pipeline.shards, "replicas": replicas,
            "source_batches": len(batches), "source_bytes": sum(b.nbytes for b in batches),
            "files": len({b.file for b in batches}),
            "pods": [{"ordinal": p.index, "shards": list(p.shards), "batches": p.batches,
                      "bytes": p.bytes} for p in pods]}


def cores(spec_path: str, cpus: float, measured: str, *,
          overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """`podpipe plan --cpus C --from RUN_DIR`: from a finished run's busy time per
    batch of each per-batch node, how `cpus` cores would be split among them
    (workers each) and the batches per second, rows per second and run time that
    predicts (`engine.workers.split`)."""
    from podpipe.engine.workers import split

    if cpus <= 0:
        raise UsageError(f"--cpus {cpus:g}: expected the cores of a pod, above 0")
    pipeline = validate(spec_path, overrides)
    graph = Graph.of(pipeline)
    ran = status.read(runs.resolve(measured))
    if ran.state != "succeeded":
        raise UsageError(f"--from {measured}: the run {ran.state}; a finished run's "
                         "figures are needed")
    stages = ran.stages
    per_batch = [n for n in graph.order if graph.domain[n] == "batch"]
    missing = [n for n in per_batch if n not in stages or not stages[n].batches_done]
    if missing:
        raise UsageError(f"--from {measured}: the run has no figures for {missing}; is it "
                         f"a run of {pipeline.name!r}?")
    costs = {n: stages[n].busy_seconds / stages[n].batches_done for n in per_batch}
    workers, pace = split(costs, cpus)
    batches = ran.source_batches or stages["source"].batches_done
    rows = stages["source"].rows_out / max(1, stages["source"].batches_done)
    once = sum(s.busy_seconds for n, s in stages.items() if n not in per_batch)
    return {"pipeline": pipeline.name, "cpus": cpus, "from": str(runs.resolve(measured)),
            "nodes": [{"node": n, "seconds_per_batch": round(costs[n], 6),
                       "workers": workers[n]} for n in per_batch],
            "batches_per_second": round(pace, 3), "rows_per_second": round(pace * rows),
            "batches": batches, "predicted_seconds": round(batches / pace + once, 3),
            "measured_seconds": ran.elapsed_seconds}
