"""What `podpipe apply` may change in a running pipeline, and how.

A new spec is compared with the one running, node by node (stages and sinks, by
name): nodes only in the new spec are *added*, nodes only in the old are
*removed*, nodes in both whose definition differs are *changed* (swapped to the
new definition), nodes whose `workers` differ are *resized* (workers started, or
taken back once idle). A node kept must keep its inputs and its kind (per batch, reduce,
global reduce): rewiring a running stage is a remove and an add under a new name.
The source, the shards, the checkpoints and a table kept cannot change under a
running run (a table may be added or removed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from podpipe.errors import UsageError
from podpipe.model.graph import Graph
from podpipe.model.spec import Pipeline, Sink, Stage


@dataclass(frozen=True)
class Change:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    resized: tuple[str, ...] = ()  # kept nodes whose `workers` changed

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.resized)


def diff(old: Pipeline, new: Pipeline) -> Change:
    """The change from `old` to `new`; UsageError naming what cannot be applied."""
    fixed: list[tuple[str, object, object]] = [
        ("spec.source", old.source, new.source), ("spec.shards", old.shards, new.shards),
        ("spec.checkpoints", old.checkpoints, new.checkpoints),
        ("metadata.name", old.name, new.name)]
    for what, was, now in fixed:
        if was != now:
            raise UsageError(f"{what} changed: a running run cannot take that; start a new "
                             "run with the new spec")
    for table in old.tables:
        if any(t.name == table.name and t != table for t in new.tables):
            raise UsageError(f"table {table.name!r} changed: a running run keeps the table it "
                             "loaded; add the new one under another name")
    before, after = Graph.of(old), Graph.of(new)
    defined: dict[str, Stage | Sink] = {s.name: s for s in old.stages}
    defined.update({s.name: s for s in old.sinks})
    defining: dict[str, Stage | Sink] = {s.name: s for s in new.stages}
    defining.update({s.name: s for s in new.sinks})
    changed = []
    for node in after.order:
        if node not in before.inputs:
            continue
        if before.inputs[node] != after.inputs[node]:
            raise UsageError(f"{node!r}: its inputs changed ({list(before.inputs[node])} -> "
                             f"{list(after.inputs[node])}); a running stage cannot be "
                             "rewired: remove it and add one under a new name")
        if before.domain[node] != after.domain[node]:
            raise UsageError(f"{node!r}: it changed from {before.domain[node]} to "
                             f"{after.domain[node]}; a running stage keeps its kind: remove "
                             "it and add one under a new name")
        if node in defined and _definition(defined[node]) != _definition(defining[node]):
            changed.append(node)
    return Change(added=tuple(n for n in after.order if n not in before.inputs),
                  removed=tuple(n for n in before.order if n not in after.inputs),
                  changed=tuple(changed),
                  resized=tuple(n for n in after.order if n in before.inputs
                                and old.workers(n) != new.workers(n)))


def _definition(node: Stage | Sink) -> Stage | Sink:
    """What defines a node's work (its inputs were compared already; how many
    processes do it is not part of it)."""
    return replace(node, inputs=(), workers=None) if isinstance(node, Stage) else \
        replace(node, input="", workers=None)
