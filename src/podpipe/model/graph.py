"""The pipeline as a DAG: who feeds whom, in which order, over which batches.

Nodes are the source, the tables, the stages and the sinks. A node's *domain* is
`batch` when it runs once per source batch, `single` when it runs once per shard (a
reduce stage over the shard's batches, and everything downstream of one; with one
shard, once), `global` when it runs once for the whole pipeline (a `scope: global`
reduce over every shard's reduce output, and what follows it) and `table` for a
table, loaded once per pod and read whole by every task of the stages that list it.
Fan-in must not mix domains (tables aside: they go with any).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from podpipe.errors import SpecError
from podpipe.model.pipeline import SOURCE, Pipeline

BATCH, SINGLE, GLOBAL, TABLE = "batch", "single", "global", "table"


@dataclass(frozen=True)
class Graph:
    order: tuple[str, ...]                      # source, stages in topological order, sinks
    inputs: dict[str, tuple[str, ...]]          # node -> its inputs, in spec order
    consumers: dict[str, tuple[str, ...]]       # node -> the nodes that read it
    domain: dict[str, str]                      # node -> BATCH | SINGLE | GLOBAL | TABLE
    reduce: frozenset[str]                      # stages that run once per shard or globally
    sinks: frozenset[str]
    tables: frozenset[str] = frozenset()
    calls: frozenset[str] = frozenset()         # stages that call a service (`call:`)

    @classmethod
    def of(cls, pipeline: Pipeline,
           fail: Callable[[str, str], Exception] | None = None) -> "Graph":
        fail = fail or (lambda field, msg: SpecError(msg, file=pipeline.file, field=field))
        inputs: dict[str, tuple[str, ...]] = {SOURCE: ()}
        tables = frozenset(t.name for t in pipeline.tables)
        inputs.update({t.name: () for t in pipeline.tables})
        known = {SOURCE} | tables | {s.name for s in pipeline.stages}
        for i, stage in enumerate(pipeline.stages):
            for j, name in enumerate(stage.inputs):
                if name not in known:
                    raise fail(f"spec.stages[{i}].inputs[{j}]", f"unknown input {name!r}; "
                               f"expected one of {sorted(known - {stage.name})}")
                if name == stage.name:
                    raise fail(f"spec.stages[{i}].inputs[{j}]",
                               f"stage {name!r} cannot read its own output")
            inputs[stage.name] = stage.inputs
        for i, sink in enumerate(pipeline.sinks):
            if sink.input not in known - tables:
                raise fail(f"spec.sinks[{i}].input", f"unknown input {sink.input!r}; "
                           f"expected one of {sorted(known - tables)}"
                           + (" (a table is an input of stages, not something to write)"
                              if sink.input in tables else ""))
            inputs[sink.name] = (sink.input,)

        order = _topological(inputs, fail, pipeline)
        consumers = {n: tuple(m for m in order if n in inputs[m]) for n in order}
        reduce = frozenset(s.name for s in pipeline.stages if s.reduce)
        scope = {s.name: s.reduce for s in pipeline.stages if s.reduce}
        domain: dict[str, str] = {}
        for node in order:
            ins = tuple(i for i in inputs[node] if i not in tables)
            if node == SOURCE:
                domain[node] = BATCH
            elif node in tables:
                domain[node] = TABLE
            elif not ins:
                raise fail(_field_of(pipeline, node), f"{node!r} reads only tables "
                           f"({', '.join(inputs[node])}); a table is read whole with each "
                           "batch of another input: add the source or a stage to its inputs")
            elif node in reduce:
                kinds = {domain[i] for i in ins}
                if scope[node] == "shard" and GLOBAL in kinds:
                    raise fail(_field_of(pipeline, node), f"reduce {node!r} runs per shard "
                               "but reads a global output; make it 'scope: global'")
                if scope[node] == "global" and BATCH in kinds:
                    per_batch = [i for i in ins if domain[i] == BATCH]
                    raise fail(_field_of(pipeline, node), f"global reduce {node!r} "
                               f"combines the shards' reduce outputs, but {per_batch} run per "
                               "batch; reduce each shard first (a stage with 'reduce: true')")
                if len(kinds) > 1:
                    raise fail(_field_of(pipeline, node), f"{node!r} mixes per-shard and "
                               f"global inputs ({', '.join(f'{i}: {domain[i]}' for i in ins)})")
                domain[node] = SINGLE if scope[node] == "shard" else GLOBAL
            else:
                kinds = {domain[i] for i in ins}
                if len(kinds) > 1:
                    field = _field_of(pipeline, node)
                    raise fail(field, f"{node!r} mixes per-batch and reduced inputs "
                               f"({', '.join(f'{i}: {domain[i]}' for i in ins)}); "
                               "inputs of one stage must all be per-batch, all reduced "
                               "per shard, or all global")
                domain[node] = kinds.pop()
        for i, stage in enumerate(pipeline.stages):
            if not consumers[stage.name]:
                raise fail(f"spec.stages[{i}].name", f"the output of stage {stage.name!r} is "
                           "read by no stage and no sink")
        for i, table in enumerate(pipeline.tables):
            if not consumers[table.name]:
                raise fail(f"spec.tables[{i}].name", f"table {table.name!r} is read by no "
                           "stage (list it among a stage's inputs)")
        return cls(order=order, inputs=inputs, consumers=consumers, domain=domain,
                   reduce=reduce, sinks=frozenset(s.name for s in pipeline.sinks),
                   tables=tables,
                   calls=frozenset(s.name for s in pipeline.stages if s.call is not None))

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(n for n in self.order
                     if n != SOURCE and n not in self.sinks and n not in self.tables)

    def reduce_inputs(self) -> list[str]:
        """The nodes a reduce reads whole: per-batch nodes under a per-shard reduce, and
        per-shard nodes under a global one. What a resumed run needs kept, and what
        the shards hand over to the pod that runs the global reduce."""
        return [n for n in self.order if any(self.reads_all(c, n) for c in self.consumers[n])]

    def reads_all(self, node: str, name: str) -> bool:
        """Does `node` read every key of its input `name` at once: all batches of a shard
        (a per-shard reduce), or every shard's output (a global reduce)?"""
        return (self.domain[node], self.domain[name]) in ((SINGLE, BATCH), (GLOBAL, SINGLE))

    @property
    def has_global(self) -> bool:
        return GLOBAL in self.domain.values()


def _topological(inputs: dict[str, tuple[str, ...]], fail: Callable[[str, str], Exception],
                pipeline: Pipeline) -> tuple[str, ...]:
    """Kahn's order, stable in spec order; a cycle is reported as a path."""
    declared = list(inputs)
    done: list[str] = []
    placed: set[str] = set()
    while len(done) < len(declared):
        ready = [n for n in declared if n not in placed and all(i in placed for i in inputs[n])]
        if not ready:
            cycle = _cycle({n: inputs[n] for n in declared if n not in placed})
            raise fail(_field_of(pipeline, cycle[0]),
                       "the stages form a cycle: " + " -> ".join(cycle))
        done.append(ready[0])
        placed.add(ready[0])
    return tuple(done)


def _cycle(inputs: dict[str, tuple[str, ...]]) -> list[str]:
    start = next(iter(inputs))
    path, node = [start], start
    while True:
        node = next(i for i in inputs[node] if i in inputs)
        if node in path:
            loop = path[path.index(node):] + [node]
            return list(reversed(loop))
        path.append(node)


def _field_of(pipeline: Pipeline, node: str) -> str:
    for i, stage in enumerate(pipeline.stages):
        if stage.name == node:
            return f"spec.stages[{i}].inputs"
    for i, sink in enumerate(pipeline.sinks):
        if sink.name == node:
            return f"spec.sinks[{i}].input"
    return "spec"
