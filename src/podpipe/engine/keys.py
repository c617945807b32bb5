"""The key planner: which keys each node runs in this pod, and what each task reads.

A key is a source batch number for a per-batch node, a shard number for a per-shard
node, 0 for a global one (which only the pod of the lowest ordinal runs) and 0 for a
table (which every pod loads, and every task of its readers reads). A pod
runs the batches of the shards it owns (`model.shards`). Built once from the graph,
the number of source batches and the pod's placement; immutable (an apply makes a
new one for the new graph).
"""

from __future__ import annotations

from typing import Sequence

from podpipe.model import shards as sharding
from podpipe.model.graph import BATCH, GLOBAL, SINGLE, TABLE, Graph

Key = tuple[str, int]


class Keys:
    def __init__(self, graph: Graph, source_batches: int, *, shards: int = 1,
                 owned: tuple[int, ...] | None = None, global_here: bool = True) -> None:
        self.graph, self.source_batches, self.shards = graph, source_batches, shards
        self.owned, self.global_here = owned, global_here
        every = sharding.nonempty(source_batches, shards)
        here = frozenset(every if owned is None else owned) & frozenset(every)
        self.mine: tuple[int, ...] = tuple(b for b in range(source_batches)
                                           if sharding.shard_of(b, shards) in here)
        self.all_shards: tuple[int, ...] = tuple(every)
        self._domain = {BATCH: frozenset(self.mine), SINGLE: here,
                        GLOBAL: frozenset({0}) if global_here else frozenset(),
                        TABLE: frozenset({0})}
        self.per_batch_nodes = sum(1 for n in graph.order if graph.domain[n] == BATCH)
        # The nodes whose outputs a resume needs, copied to the node tier: what a
        # reduce reads, and what runs once (but sinks, which write no output, and
        # tables, which a resumed run loads again).
        self.kept: frozenset[str] = frozenset(graph.reduce_inputs()) | {
            n for n in graph.order if graph.domain[n] in (SINGLE, GLOBAL)
            and n not in graph.sinks}

    def regraphed(self, graph: Graph) -> "Keys":
        """The same pod's keys over a changed graph."""
        return Keys(graph, self.source_batches, shards=self.shards, owned=self.owned,
                    global_here=self.global_here)

    def of(self, node: str) -> frozenset[int]:
        """What `node` runs in this pod: source batches, shards, or {0} (global)."""
        return self._domain[self.graph.domain[node]]

    def in_domain(self, domain: str) -> frozenset[int]:
        return self._domain[domain]

    def shards_here(self) -> list[int]:
        """The shards this pod runs (those with at least one batch)."""
        return sorted(self._domain[SINGLE])

    def in_group(self, node: str, shard: int | None) -> Sequence[int]:
        """`node`'s keys that belong to `shard` (None: the global part)."""
        domain = self.graph.domain[node]
        if shard is None:
            return tuple(self._domain[GLOBAL]) if domain == GLOBAL else ()
        if domain == BATCH:
            return sharding.batches(shard, self.source_batches, self.shards)
        return (shard,) if domain == SINGLE else ()

    def reads(self, node: str, name: str, key: int) -> Sequence[int]:
        """The keys of input `name` that `node`'s task `key` reads."""
        if self.graph.domain[name] == TABLE:
            return (0,)
        if not self.graph.reads_all(node, name):
            return (key,)
        if self.graph.domain[name] == BATCH:  # a per-shard reduce: the shard's batches
            return sharding.batches(key, self.source_batches, self.shards)
        return self.all_shards  # a global reduce: every shard's output

    def input_keys(self, node: str, key: int) -> list[Key]:
        """The (node, key) outputs that `node`'s task `key` reads."""
        return [(name, k) for name in self.graph.inputs[node]
                for k in self.reads(node, name, key)]

    def key_of(self, consumer: str, node: str, key: int) -> int:
        """The key of `consumer` that `node`'s output for `key` feeds."""
        domains = (self.graph.domain[consumer], self.graph.domain[node])
        if domains == (SINGLE, BATCH):
            return sharding.shard_of(key, self.shards)
        return 0 if domains[0] == GLOBAL else key

