"""The floor: a spec's stage functions chained in one process, on the same batches.

No isolation, no copies, no overlap: every batch goes through every per-batch stage
in turn, then the reduce stages run once, and sinks are written the same way. It
is what podpipe's isolation must pay for.

    python benchmarks/floor.py SPEC [--set KEY=VALUE]...
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections import defaultdict

import pyarrow as pa

from podpipe.model import spec as specs
from podpipe.model.graph import BATCH, Graph
from podpipe.model.spec import SOURCE
from podpipe.runtime.data import arrowfile, sink, source


def run(pipeline: specs.Pipeline) -> None:
    graph = Graph.of(pipeline)
    functions = {}
    for stage in pipeline.stages:
        if stage.run is None:
            raise SystemExit(f"stage {stage.name!r} is a command; the floor runs functions")
        module, _, name = stage.run.partition(":")
        functions[stage.name] = getattr(importlib.import_module(module), name)
    writers = {s.name: sink.Writer(s, "") for s in pipeline.sinks}  # (no staging)
    loader = source.Loader(pipeline.source)
    per_batch = [n for n in graph.order if graph.domain[n] == BATCH and n != SOURCE]
    once = [n for n in graph.order if graph.domain[n] != BATCH]
    kept: dict[str, list[pa.Table]] = defaultdict(list)  # per-batch outputs a reduce reads
    for batch, planned in enumerate(source.plan(pipeline.source)):
        outputs = {SOURCE: loader.load(planned)}
        for node in per_batch:
            _step(node, graph, functions, writers, outputs, batch)
        for node in graph.order:
            if any(graph.domain[c] != BATCH for c in graph.consumers[node]) and node in outputs:
                kept[node].append(outputs[node])
    outputs = {node: pa.concat_tables(tables) for node, tables in kept.items()}
    for node in once:
        _step(node, graph, functions, writers, outputs, 0)


def _step(node, graph, functions, writers, outputs, batch) -> None:
    inputs = [outputs[i] for i in graph.inputs[node]]
    if node in writers:
        writers[node].write(inputs[0], batch)
    else:
        outputs[node] = arrowfile.to_arrow(functions[node](*inputs))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    sys.path.insert(0, ".")
    run(specs.load(args.spec, args.set))
    return 0


if __name__ == "__main__":
    sys.exit(main())
