"""Shards: how the source's batches are split among the pods of a pipeline.

The source plans its batches in a deterministic order (files sorted, row groups or
record batches in file order, see `runtime.source`). Batch `b` belongs to shard
`b % S` (`spec.shards: S`): round robin, so shards differ by at most one batch and
the same input always lands in the same shard. Replica `i` of `N` owns the shards
`s` with `s % N == i`. A shard is the unit of progress: its reduce runs over its
own batches, its checkpoints are its own on the durable tier, and when the number
of replicas changes a shard moves to another pod whole.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from podpipe.errors import UsageError
from podpipe.model.pipeline import Pipeline


def shard_of(batch: int, shards: int) -> int:
    return batch % shards


def owned(shards: int, replicas: int, index: int) -> tuple[int, ...]:
    """The shards replica `index` of `replicas` owns."""
    return tuple(range(index, shards, replicas))


def batches(shard: int, source_batches: int, shards: int) -> range:
    """The source batches of `shard`, in order."""
    return range(shard, source_batches, shards)


def nonempty(source_batches: int, shards: int) -> range:
    """The shards that hold at least one batch (the others have nothing to reduce)."""
    return range(min(shards, source_batches))


@dataclass(frozen=True)
class PodPlan:
    index: int
    shards: tuple[int, ...]
    batches: int
    bytes: int     # what the pod pulls from the source


def plan(sizes: list[int], shards: int, replicas: int) -> list[PodPlan]:
    """Which pod runs what, from the bytes of each source batch (in plan order)."""
    per_shard = [0] * shards
    count = [0] * shards
    for batch, size in enumerate(sizes):
        per_shard[shard_of(batch, shards)] += size
        count[shard_of(batch, shards)] += 1
    return [PodPlan(i, mine, sum(count[s] for s in mine), sum(per_shard[s] for s in mine))
            for i in range(replicas) for mine in [owned(shards, replicas, i)]]


def ordinal(explicit: int | None, environ: dict[str, str], hostname: str,
            statefulset: str) -> int | None:
    """This pod's ordinal: `--pod-index`, else `POD_INDEX`, else the suffix of a
    hostname `<statefulset>-<n>` as a StatefulSet names its pods; None when nothing
    says (a run on a workstation that starts every replica itself). Raises
    ValueError for a POD_INDEX that is not an ordinal."""
    if explicit is not None:
        return explicit
    value = environ.get("POD_INDEX")
    if value is not None:
        if not value.isdigit():
            raise ValueError(f"POD_INDEX={value!r}: expected the pod's ordinal, 0 or more")
        return int(value)
    match = re.fullmatch(re.escape(statefulset) + r"-(\d+)", hostname)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Placement:
    """Where a pod stands among the replicas: its ordinal, and so its shards."""

    ordinal: int = 0
    replicas: int = 1
    shards: int = 1

    @property
    def owned(self) -> tuple[int, ...]:
        return owned(self.shards, self.replicas, self.ordinal)

    @property
    def runs_global(self) -> bool:
        """The lowest ordinal runs what is global (a `scope: global` reduce)."""
        return self.ordinal == 0

    @property
    def sharded(self) -> bool:
        return self.replicas > 1 or self.shards > 1


def check_handover(pipeline: Pipeline, replicas: int) -> None:
    """A global reduce over several replicas needs a durable tier: the pods hand their
    shards' outputs to pod 0 through it."""
    from podpipe.model.graph import Graph

    if replicas > 1 and not pipeline.checkpoints.durable and Graph.of(pipeline).has_global:
        raise UsageError(f"--replicas {replicas}: the global reduce needs every shard's "
                         "output, which the pods hand over through the durable tier; set "
                         "spec.checkpoints.durable (an object-store URL every pod can reach)")
