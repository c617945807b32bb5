"""What a conductor runs (the spec, which an apply changes, and where), its timers, and
what the engine runs each node with (the restarts its processes may have, its
workers, the cores `workers: auto` may use)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from podpipe.engine.events import Dispatch
from podpipe.model.batch import SourceBatch
from podpipe.model.graph import Graph
from podpipe.model.pipeline import DEFAULT_RETRIES, SOURCE, Pipeline, Stage
from podpipe.model.shards import Placement
from podpipe.runtime.storage import answers
from podpipe.runtime.plumbing import cputime, protocol
from podpipe.runtime.data.scratch import Scratch

if TYPE_CHECKING:
    from podpipe.runtime.data.sink import Written


@dataclass(frozen=True)
class Timeout:
    """A timer: task number `task` of the agent `agent` (batch `batch`) is over its
    time."""

    agent: str
    batch: int
    task: int
    seconds: float
    run: str = ""  # whose (a line's jobs share its loop)


@dataclass
class Run:
    """What the conductor runs: the spec (an apply changes it) and where."""

    pipeline: Pipeline
    graph: Graph
    plan: list[SourceBatch]
    scratch: Scratch
    run_dir: Path
    run_id: str
    pod: str
    placement: Placement
    overrides: list[str]  # the pod's, passed to every process
    staging: str          # the run's token: its staging folder in a `mode: overwrite` sink
    memos: Path           # where call stages keep answers: the run directory, or a line's

    @property
    def shared_global(self) -> bool:
        """Do several replicas share a global reduce (what a swap or apply may not touch)?"""
        return self.graph.has_global and self.placement.replicas > 1

    def finish_sinks(self, keys: Callable[[str], frozenset[int]]) -> dict[str, Written]:
        """The run succeeded: each sink's output put in place (mode overwrite) and,
        when this pod runs every shard, its `_SUCCESS` written (RunError if not)."""
        from podpipe.runtime.data import sink  # pyarrow.parquet: not at the conductor's start

        return sink.finish(self.pipeline, self.graph, len(self.plan), keys, self.staging,
                           whole=self.placement.replicas == 1)

    def stage(self, node: str) -> Stage | None:
        """`node`'s definition if it is a stage (not the source, a table or a sink)."""
        return next((s for s in self.pipeline.stages if s.name == node), None)

    def task(self, action: Dispatch) -> protocol.Task:
        """The task the engine dispatched, as the run has it: its inputs, where its
        output goes, which rows a source batch is, where a call stage keeps its
        answers; the RAM granted with it, over a pooled file (`engine.grants`); whether
        its output is hashed (a copy of it is checked against that: one kept for a
        resume, one reused across runs; and a batch made again, `checks.determinism`);
        whether its agent keeps the inputs mapped (not those the node tier keeps too:
        deleted, not emptied, once read)."""
        node, batch, reuse = action.node, action.batch, action.reuse
        task = protocol.Task(batch=batch,
                             inputs=[[o.path for o in group] for group in action.inputs],
                             output=str(self.scratch.output_path(node, batch)),
                             granted=action.reserved, reuse=None if reuse is None
                             else str(self.scratch.pool_path(reuse)),
                             checksum=action.kept or self.pipeline.checkpoints.reuse
                             or self.pipeline.determinism != "off",
                             keep_mapped=not action.reads_kept)
        if node == SOURCE:
            task.source = self.plan[batch]
        elif node in self.graph.sinks:  # (a set the graph has: no scan a task)
            task.staging = self.staging
        stage = self.stage(node)
        if stage is not None and stage.call is not None and stage.call.memo:
            task.answers = str(answers.folder(self.memos, node))
        return task


def retries(pipeline: Pipeline, graph: Graph) -> dict[str, int]:
    """Restarts each node's process may have (the spec's, else the default)."""
    allowed = {node: DEFAULT_RETRIES for node in graph.order}
    allowed.update({stage.name: stage.policy.retries for stage in pipeline.stages})
    return allowed


def workers(pipeline: Pipeline, graph: Graph) -> dict[str, int | None]:
    """Each node's fixed number of processes; None: `workers: auto`."""
    return {node: pipeline.workers(node) for node in graph.order}


def gpu_caps(pipeline: Pipeline, containers: bool) -> dict[str, int]:
    """The most workers `auto` gives each stage that asks for GPUs: as many as have
    devices of their own (`Pipeline.gpu_slots`; one at least); in a node's own
    container, one (its container's devices are rendered for one worker)."""
    slots = {} if containers else pipeline.gpu_slots(cputime.gpus(pipeline.gpus))
    return {s.name: max(1, len(slots.get(s.name, []))) for s in pipeline.stages
            if s.resources.gpu and s.workers is None}


def cpus(pipeline: Pipeline) -> float:
    """The cores `workers: auto` may use: `spec.cpus`, else what this process may use
    (its CPU affinity, and its cgroup's CPU quota, as a Kubernetes pod has)."""
    if pipeline.cpus is not None:
        return pipeline.cpus
    return max(1.0, cputime.cores()[0])
