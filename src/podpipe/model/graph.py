"""The pipeline as a DAG: who feeds whom, in which order, over which batches.

Nodes are the source, the stages and the sinks. A node's *domain* is `batch` when
it runs once per source batch and `single` when it runs once (a reduce stage, and
everything downstream of one). Fan-in must not mix the two domains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from podpipe.errors import SpecError
from podpipe.model.spec import SOURCE, Pipeline

BATCH, SINGLE = "batch", "single"


@dataclass(frozen=True)
class Graph:
    order: tuple[str, ...]                      # source, stages in topological order, sinks
    inputs: dict[str, tuple[str, ...]]          # node -> its inputs, in spec order
    consumers: dict[str, tuple[str, ...]]       # node -> the nodes that read it
    domain: dict[str, str]                      # node -> BATCH | SINGLE
    reduce: frozenset[str]                      # stages that run once over all batches
    sinks: frozenset[str]

    @classmethod
    def of(cls, pipeline: Pipeline,
           fail: Callable[[str, str], Exception] | None = None) -> "Graph":
        fail = fail or (lambda field, msg: SpecError(msg, file=pipeline.file, field=field))
        inputs: dict[str, tuple[str, ...]] = {SOURCE: ()}
        known = {SOURCE} | {s.name for s in pipeline.stages}
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
            if sink.input not in known:
                raise fail(f"spec.sinks[{i}].input", f"unknown input {sink.input!r}; "
                           f"expected one of {sorted(known)}")
            inputs[sink.name] = (sink.input,)

        order = _topological(inputs, fail, pipeline)
        consumers = {n: tuple(m for m in order if n in inputs[m]) for n in order}
        for i, stage in enumerate(pipeline.stages):
            if not consumers[stage.name]:
                raise fail(f"spec.stages[{i}].name", f"the output of stage {stage.name!r} is "
                           "read by no stage and no sink")
        reduce = frozenset(s.name for s in pipeline.stages if s.reduce)
        domain: dict[str, str] = {}
        for node in order:
            ins = inputs[node]
            if node == SOURCE:
                domain[node] = BATCH
            elif node in reduce:
                domain[node] = SINGLE
            else:
                kinds = {domain[i] for i in ins}
                if len(kinds) > 1:
                    field = _field_of(pipeline, node)
                    raise fail(field, f"{node!r} mixes per-batch and reduced inputs "
                               f"({', '.join(f'{i}: {domain[i]}' for i in ins)}); "
                               "inputs of one stage must all be per-batch or all reduced")
                domain[node] = kinds.pop()
        return cls(order=order, inputs=inputs, consumers=consumers, domain=domain,
                   reduce=reduce, sinks=frozenset(s.name for s in pipeline.sinks))

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if n != SOURCE and n not in self.sinks)

    def reduce_inputs(self) -> list[str]:
        """The per-batch nodes that something running once (a reduce) reads: what a
        resumed run needs kept, batch by batch."""
        return [n for n in self.order if self.domain[n] == BATCH and
                any(self.domain[c] != BATCH for c in self.consumers[n])]

    def batches(self, node: str, source_batches: int) -> int:
        """How many batches `node` processes."""
        return source_batches if self.domain[node] == BATCH else 1


def _topological(inputs: dict[str, tuple[str, ...]], fail, pipeline: Pipeline) -> tuple[str, ...]:
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
