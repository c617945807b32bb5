"""What a run keeps beyond RAM: the journal, node-tier copies, durable checkpoints, imports.

The journal records every finished (node, key) with the version that made it, and
every copy; the node tier copies what the engine says to keep (`Keep`), off the
critical path; the durable tier takes major checkpoints of this pod's groups; and
the pod of a global reduce imports the other pods' shard outputs from their
complete checkpoints. The conductor's only writer of the journal is this object,
which commits at every status flush.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from podpipe.runtime.plumbing import logline, protocol
from podpipe.engine import events as ev
from podpipe.engine.ledger import Ledger
from podpipe.engine.state import RunState
from podpipe.errors import RunError
from podpipe.model.graph import SINGLE, Graph
from podpipe.model.output import Output
from podpipe.model.pipeline import SOURCE, Pipeline, Stage
from podpipe.model.shards import Placement
from podpipe.runtime.storage import durable as durables
from podpipe.runtime.storage import tiers
from podpipe.runtime.storage.durable import DurableTier
from podpipe.runtime.storage.journal import Journal
from podpipe.runtime.storage.tiers import NodeTier
from podpipe.runtime.data.scratch import discard

DURABLE_WAIT = 10.0     # at the end of a failed run, for its last checkpoint
HANDOVER_WAIT = 120.0   # at the end of a sharded run, for its shards' last checkpoints
IMPORT_SECONDS = 0.25   # how often a global reduce's pod looks for the others' shards


@dataclass
class Restored:
    """What a resumed run starts from: the engine, and what it found where."""

    engine: RunState
    counts: dict[str, dict[str, int]]   # node -> tier -> batches restored from it
    finished: dict[str, set[int]]       # node -> batches the journal had finished
    notes: list[str]                    # what was found wrong (corrupt copies)
    on_disk: list[Output]               # kept copies on the node tier, for checkpoints
    made_by: dict[ev.Key, str] = field(default_factory=dict)  # the versions that made them


class Verdicts:
    """What an output is judged by before it is accepted: its schema, fixed for the run
    by the stage's first output (`schema: fixed`, kept in the journal: a resume keeps
    it); and its bytes, when the same version made the batch before (a resume, a
    rework): other bytes flag the stage non-deterministic (`checks.determinism`)."""

    def __init__(self, journal: Journal, determinism: str, log: logline.Log,
                 made_by: dict[ev.Key, str] | None) -> None:
        """`made_by`: a resume's versions of what the journal recorded (its checksums
        are what those versions made)."""
        self.journal, self.determinism, self._log = journal, determinism, log
        self.schemas = journal.schemas()  # node -> (batch, its output's schema)
        versions = made_by or {}
        self._sums: dict[ev.Key, tuple[str, str]] = {  # (version, checksum) of each
            (o.node, o.key): (versions[(o.node, o.key)], o.checksum)
            for o in (journal.copies() if versions else [])
            if o.checksum and (o.node, o.key) in versions}
        self.nondeterministic: dict[str, set[int]] = {}  # node -> batches it differed on

    def schema_fixed(self, node: str, batch: int, schema: bytes) -> str | None:
        """An output of `node` with `schema`: the first fixes the node's schema for the
        run; why a later one does not do (another schema), or None."""
        fixed = self.schemas.get(node)
        if fixed is None:
            self.schemas[node] = (batch, schema)
            self.journal.fix_schema(node, batch, schema)
            return None
        if fixed[1] == schema:
            return None
        return (f"its output schema differs from batch {fixed[0]}'s, which fixed the "
                "stage's schema for the run (say 'schema: any' on the stage if that is "
                "intended)")

    def __call__(self, node: str, done: protocol.Done, version: str | None) -> str | None:
        """Why `done`'s output does not do, or None: its schema against the run's; for a
        batch `version` made before, its bytes against those — other bytes flag the
        stage (warn), or refuse the output (`checks.determinism: fail`)."""
        if done.schema is not None:
            wrong = self.schema_fixed(node, done.batch, done.schema)
            if wrong is not None:  # (two workers' first outputs: the run has one schema)
                return wrong
        output, before = done.output, self._sums.get((node, done.batch))
        if (self.determinism == "off" or output is None or not output.checksum
                or before is None or before[0] != version or before[1] == output.checksum):
            return None
        self.nondeterministic.setdefault(node, set()).add(done.batch)
        why = (f"batch {done.batch} made again by version {version} gave other bytes than "
               "before: the stage is not deterministic (a resume or a redone batch gives "
               "other output than a clean run would)")
        self._log(f"stage {node!r}: {why}", "warning")
        return f"{why} (checks.determinism: fail)" if self.determinism == "fail" else None

    def made(self, node: str, batch: int, version: str, output: Output | None) -> None:
        """An output accepted: its bytes are what `version` makes of the batch."""
        if output is not None and output.checksum:
            self._sums[(node, batch)] = (version, output.checksum)


class Checkpoints:
    def __init__(self, run_dir: Path, durable: DurableTier | None,
                 restored: Restored | None, log: logline.Log, pipeline: Pipeline) -> None:
        self.run_dir, self.durable, self._log = run_dir, durable, log
        self.required = pipeline.checkpoints.required  # its last checkpoint failed: fails
        self.journal = Journal(run_dir)
        self.node_tier = NodeTier(run_dir)
        self.on_disk: list[Output] = list(restored.on_disk) if restored else []
        self.restored = restored.counts if restored else {}
        self.notes = list(restored.notes) if restored else []
        # a resume: what was done before it (None: not a resume)
        self._previously = restored.finished if restored else None
        for note in self.notes:  # the details in the log; the terminal says a line
            log(f"restored: {note}", "warning")
        self.recomputed: dict[str, int] = {}
        self.copies = 0  # node-tier copies made and journaled by this conductor
        # the version of the stage that made each output (what a sink file records)
        self._made_by: dict[ev.Key, str] = dict(restored.made_by) if restored else {}
        self._looked = 0.0  # when the durable tier was last read for other shards
        self.verdicts = Verdicts(self.journal, pipeline.determinism, log,
                                 self._made_by if restored else None)

    @property
    def done_before(self) -> int | None:
        """A resume: the tasks done before it (None: not a resume)."""
        if self._previously is None:
            return None
        return sum(len(keys) for keys in self._previously.values())

    def made_by(self, node: str, key: int) -> str | None:
        """The version of `node` that made its output for `key`, if known."""
        return self._made_by.get((node, key))

    def record(self, node: str, batch: int, version: str, output: Output | None) -> None:
        """Journal what finished, by which version, and where its output is."""
        self.journal.finished(node, batch, version)
        self._made_by[(node, batch)] = version
        self.verdicts.made(node, batch, version, output)
        if self._previously is not None and batch in self._previously.get(node, ()):
            self.recomputed[node] = self.recomputed.get(node, 0) + 1
        if output is not None:
            self.journal.stored(output)

    def keep(self, output: Output) -> None:
        """Copy to the node tier (off the critical path); a spilled output is there."""
        if output.tier == "node":
            self.journal.stored(output)
            self.on_disk.append(output)
        else:
            self.node_tier.submit(output, str(tiers.path_for(self.run_dir, output.node,
                                                              output.key)))

    def forget(self, node: str, key: int) -> None:
        self.journal.forget(node, key)
        self.on_disk = [c for c in self.on_disk if (c.node, c.key) != (node, key)]
        self._made_by.pop((node, key), None)

    def fill(self, task: protocol.Task, pipeline: Pipeline, graph: Graph, engine: Ledger,
             node: str, stage: Stage | None, version: str | None,
             inputs: tuple[tuple[Output, ...], ...]) -> None:
        """What they add to a task of `node` before it goes: a sink's, the versions
        behind what it writes; a stage's, where its output is kept for reuse (`reuse:
        true`), and the schema its outputs must have (`schema: fixed`, once known)."""
        if node in graph.sinks:
            task.versions = self.versions_behind(graph, engine, node, task.batch)
        elif stage is not None and pipeline.checkpoints.reuse:
            task.memo = self.memo(pipeline, node, version, inputs)
        fixed = self.verdicts.schemas.get(node)
        if stage is not None and stage.policy.schema == "fixed" and fixed is not None:
            task.schema_batch, task.schema = fixed

    def judged(self, name: str, done: protocol.Done, event: ev.Event, version: str | None
               ) -> tuple[protocol.Done | protocol.Failed, ev.Event]:
        """A task done, as its output is judged (`Verdicts`): as it was, or failed
        (its output in RAM deleted)."""
        node, worker = protocol.split_name(name)
        wrong = self.verdicts(node, done, version)
        if wrong is None:
            return done, event
        if done.output is not None and done.output.tier == "ram":
            discard(done.output.path)
        return (protocol.Failed(batch=done.batch, message=wrong),
                ev.TaskFailed(node, done.batch, wrong, worker=worker))

    def memo(self, pipeline: Pipeline, node: str, version: str | None,
             inputs: tuple[tuple[Output, ...], ...]) -> str:
        """Where the output of `node`'s task is kept for reuse across runs: named by the
        stage, its version and the checksums of its inputs (what made it)."""
        made_by = [node, version or ""] + [o.checksum for group in inputs for o in group]
        key = hashlib.sha256("\0".join(made_by).encode()).hexdigest()[:32]
        url = (pipeline.checkpoints.durable or "").rstrip("/")
        return f"{url}/{pipeline.name}/memo/{node}/{key}.arrow"

    def versions_behind(self, graph: Graph, engine: Ledger, sink: str,
                        key: int) -> dict[str, list[str]]:
        """The versions of the stages that made what `sink` writes for `key` (walked up
        the graph once per sink task, from the version recorded per output)."""
        versions: dict[str, set[str]] = {}
        todo, seen = list(engine.input_keys(sink, key)), set()
        while todo:
            node, k = todo.pop()
            if (node, k) in seen:
                continue
            seen.add((node, k))
            if node != SOURCE and node not in graph.sinks and (node, k) in self._made_by:
                versions.setdefault(node, set()).add(self._made_by[(node, k)])
            todo.extend(engine.input_keys(node, k))
        return {stage: sorted(v) for stage, v in versions.items()}

    def flush(self, engine: Ledger, graph: Graph, placement: Placement,
              source_batches: int) -> list[ev.Imported]:
        """Journal the copies made since the last flush, take a major checkpoint when
        one is due; returns the other pods' shard outputs found for a global reduce."""
        for copy in self.node_tier.finished():
            self.journal.stored(copy)
            self.on_disk.append(copy)
            self.copies += 1
        self.journal.commit()
        if self.durable is None:
            return []
        if self.durable.due(len(self.on_disk)):
            self._checkpoint(engine, graph, placement)
        return self._imports(engine, graph, placement, source_batches)

    def _checkpoint(self, engine: Ledger, graph: Graph, placement: Placement) -> None:
        assert self.durable is not None
        groups = {durables.group_name(s): engine.complete(s)
                  for s in engine.shards_here()}
        if graph.has_global and placement.runs_global:
            groups[durables.group_name(None)] = engine.complete(None)
        self.durable.take(self.on_disk, engine.done_keys(), groups, self._made_by)

    def _imports(self, engine: Ledger, graph: Graph, placement: Placement,
                 source_batches: int) -> list[ev.Imported]:
        """A global reduce runs here: the other pods' shard outputs it reads, from
        their complete checkpoints on the durable tier."""
        waiting = engine.waiting_for()
        if not waiting or self.durable is None or \
                time.monotonic() - self._looked < IMPORT_SECONDS:
            return []
        self._looked = time.monotonic()
        needed = [n for n in graph.reduce_inputs() if graph.domain[n] == SINGLE]
        imported = []
        for shard in waiting:
            found = self.durable.latest(durables.group_name(shard))
            if found is None or not found.complete or found.shards != placement.shards \
                    or found.source_batches != source_batches:
                continue
            copies, notes = durables.fetch(found, self.run_dir, needed)
            self.notes.extend(notes)
            for key, version in found.made_by.items():
                self._made_by.setdefault(key, version)
            for copy in copies:
                self._log(f"shard {shard}: {copy.node} imported from the durable tier")
                imported.append(ev.Imported(copy.node, shard, copy.on("node", copy.path)))
        return imported

    def close(self, engine: Ledger, graph: Graph, placement: Placement,
              succeeded: bool) -> RunError | None:
        """Finish the copies handed over, and the last checkpoint: what a rescheduled
        pod would start from (a failed run), or what the other pods and a later
        rescaled run take over (a sharded run's finished shards). A pod whose shards
        a global reduce elsewhere reads must hand them over: the error if it could not."""
        # copies handed over are finished: a resume uses them (none resumes a run that
        # succeeded, unless its checkpoint is taken from them)
        self.node_tier.close(abandon=succeeded and self.durable is None)
        for copy in self.node_tier.finished():
            self.journal.stored(copy)
            self.on_disk.append(copy)
            self.copies += 1
        error = None
        if self.durable is not None:
            if not succeeded:
                self._checkpoint(engine, graph, placement)
                self.durable.close(wait=DURABLE_WAIT)
            elif placement.sharded:
                self._checkpoint(engine, graph, placement)
                handover = graph.has_global and not placement.runs_global
                if not self.durable.close(wait=HANDOVER_WAIT if handover else DURABLE_WAIT) \
                        and handover:
                    error = RunError(
                        f"pod {placement.ordinal}: its shards are done but could not be "
                        f"handed over to the pod of the global reduce through the durable "
                        f"tier {self.durable.url}: {self.durable.error or 'timed out'}; "
                        "resume the run")
            elif self.required:  # a run that ends without its checkpoint fails
                self._checkpoint(engine, graph, placement)
                if not self.durable.close(wait=DURABLE_WAIT):
                    error = RunError(f"the last checkpoint could not be written to "
                                     f"{self.durable.url}: "
                                     f"{self.durable.error or 'timed out'} "
                                     "(spec.checkpoints.required)")
            else:
                self.durable.close(wait=0)
        self.journal.close()
        return error
