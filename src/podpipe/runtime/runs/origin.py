"""Where a run starts from: fresh, its RAM scratch and node tier, or the durable tier.

One decision for a single-pod run, a replica and a resume alike (`start_from`):

- `fresh`: nothing kept; every batch from the source;
- a **resume** (`journal=True`): what the run's journal says finished, with the
  copies that check out, nearest tier first (RAM scratch if the pod stayed, else
  the node tier);
- a **new run with a durable tier**: each group of this pod (its shards, the
  global part if it runs it) from its latest major checkpoint there, wherever it
  was made (a rescheduled pod, a rescaled StatefulSet).

A store that cannot be read is a `StoreError` (the run fails naming the URL),
never "no checkpoint": starting over is only ever asked for (`--fresh`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from podpipe.engine.events import Key
from podpipe.engine.resume import restored
from podpipe.errors import RunError
from podpipe.model import shards as sharding
from podpipe.model.batch import SourceBatch
from podpipe.model.graph import Graph
from podpipe.model.output import TIERS, Output
from podpipe.model.pipeline import Pipeline
from podpipe.runtime.rundir import layout
from podpipe.runtime.storage import durable, tiers
from podpipe.runtime.storage.journal import CorruptJournal, Journal

if TYPE_CHECKING:  # imported where used: a run imports this module before its fork
    from podpipe.runtime.conductor import Restored  # server starts, and these (pyarrow,
                                                     # the conductor) while it does


@dataclass(frozen=True)
class Origin:
    """What a run may start from."""

    journal: bool = False          # a resume: the run's own journal and copies
    durable: bool = False          # the spec's latest checkpoints on the durable tier
    source_batches: int | None = None  # a resume: the plan's size when it started


def start_from(origin: Origin, pipeline: Pipeline, graph: Graph, plan: list[SourceBatch],
               run_path: Path, placement: sharding.Placement, spec_digest: str,
               source_digest: str, scratch: Path | None = None) -> Restored | None:
    """The state the run starts from; None: from nothing. `spec_digest` names the
    checkpoints of the spec as run; only those made from the source as it is now
    (`source_digest`) are used. Copies are trusted only inside the node tier and the
    run's RAM `scratch`."""
    roots = [run_path / tiers.DIR] + ([scratch] if scratch is not None else [])
    if origin.journal:
        if origin.source_batches is not None and len(plan) != origin.source_batches:
            raise RunError(f"the source has {len(plan)} batches now, {origin.source_batches} "
                           "when the run started: it changed; start a new run")
        try:
            journal = Journal(run_path)
            try:
                finished, copies = journal.done(), journal.copies()
                made_by = journal.made_by()
            finally:
                journal.close()
        except CorruptJournal as exc:  # a damaged file: input, not a reason to crash
            aside = Journal.set_aside(run_path)
            note = (f"the journal is corrupt ({exc}; kept as {aside.name}): resumed from "
                    "the other tiers")
            if origin.durable and pipeline.checkpoints.durable:
                restored = _from_durable(pipeline, graph, plan, run_path, placement,
                                         spec_digest, source_digest, roots)
                restored.notes.insert(0, note)
                return restored
            return _restore(pipeline, graph, plan, {}, [], [note], placement, roots,
                            staging=layout.read(run_path).staging)
        return _restore(pipeline, graph, plan, finished, copies, [], placement, roots,
                        made_by, staging=layout.read(run_path).staging)
    if origin.durable and pipeline.checkpoints.durable:
        return _from_durable(pipeline, graph, plan, run_path, placement, spec_digest,
                             source_digest, roots)
    return None


def _from_durable(pipeline: Pipeline, graph: Graph, plan: list[SourceBatch], run_path: Path,
                  placement: sharding.Placement, spec_digest: str, source_digest: str,
                  roots: list[Path]) -> Restored:
    """Each group of this pod (its shards, the global part if it runs it) from its
    latest checkpoint on the durable tier, wherever it was made."""
    assert pipeline.checkpoints.durable is not None
    store = durable.checkpoints(pipeline.checkpoints.durable, pipeline.name, spec_digest)
    groups: list[int | None] = [s for s in placement.owned
                                if s in sharding.nonempty(len(plan), placement.shards)]
    if graph.has_global and placement.runs_global:
        groups.append(None)
    finished: dict[str, set[int]] = {}
    copies: list[Output] = []
    notes: list[str] = []
    made_by: dict[Key, str] = {}
    for group in groups:
        name = durable.group_name(group)
        found = durable.latest(store, name)
        if found is None:
            continue
        if (found.source_batches, found.shards) != (len(plan), placement.shards):
            notes.append(f"{name}: the durable checkpoint has {found.source_batches} source "
                         f"batches in {found.shards} shards, the source {len(plan)} in "
                         f"{placement.shards} now: not used")
            continue
        if found.manifest.source != source_digest:
            notes.append(f"{name}: the durable checkpoint was made from another source (its "
                         "files or their batches changed since): not used")
            continue
        fetched, more = durable.fetch(found, run_path)
        copies += fetched
        notes += more
        for node, keys in found.finished.items():
            finished.setdefault(node, set()).update(keys)
        made_by.update(found.made_by)
    return _restore(pipeline, graph, plan, finished, copies, notes, placement, roots, made_by,
                    staging=layout.read(run_path).staging)


def _restore(pipeline: Pipeline, graph: Graph, plan: list[SourceBatch],
             finished: dict[str, set[int]], copies: list[Output], notes: list[str],
             placement: sharding.Placement, roots: list[Path],
             made_by: dict[Key, str] | None = None, *, staging: str) -> Restored:
    """The engine of a resumed run: what each node had finished, and the copies of its
    outputs that check out, nearest tier first. A sink's batch counts as finished only
    if its file is there (staged under the run's `staging` token, in mode
    `overwrite`)."""
    from podpipe.runtime.data import sink
    from podpipe.runtime.conductor import Restored
    from podpipe.runtime.conductor.run import cpus, retries, workers

    for target in pipeline.sinks:
        if target.name in finished:
            finished[target.name] &= sink.written(target, staging)
    kept: dict[Key, Output] = {}
    for_reduce = set(graph.reduce_inputs())
    for copy in sorted(copies, key=lambda c: TIERS.index(c.tier)):
        key = (copy.node, copy.key)
        if copy.node not in for_reduce:
            continue  # a resume uses only what a reduce reads: check nothing else
        if key in kept or copy.key not in finished.get(copy.node, ()):
            continue
        if not Path(copy.path).exists():
            continue  # a RAM copy of a lost pod (or scratch), or one deleted once read
        if not any(_inside(copy.path, root) for root in roots):
            notes.append(f"{copy.node} batch {copy.key}: the journal names {copy.path}, "
                         "outside the run's tiers; not used")
            continue
        if not tiers.verified(copy.path, copy.checksum):
            notes.append(f"{copy.node} batch {copy.key}: the {copy.tier} copy is corrupt "
                         "(checksum); not used")
            continue
        kept[key] = copy
    engine = restored(graph, len(plan), pipeline.memory, retries=retries(pipeline, graph),
                      kept=kept, finished=finished, shards=placement.shards,
                      owned=placement.owned, global_here=placement.runs_global,
                      workers=workers(pipeline, graph), cpus=cpus(pipeline))
    counts: dict[str, dict[str, int]] = {}
    for output in engine.ledger.kept():  # the kept outputs it uses
        tally = counts.setdefault(output.node, {})
        tally[output.tier] = tally.get(output.tier, 0) + 1
    on_disk = [o for o in engine.ledger.kept() if o.tier != "ram"]
    return Restored(engine, counts, finished, notes, on_disk, made_by or {})


def _inside(path: str, root: Path) -> bool:
    """Is `path` inside `root`, links and `..` resolved?"""
    try:
        return Path(path).resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False
