"""What a conductor runs (the spec, which an apply changes, and where), and its timers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from podpipe.model.batch import SourceBatch
from podpipe.model.graph import Graph
from podpipe.model.pipeline import Pipeline
from podpipe.model.shards import Placement
from podpipe.runtime.scratch import Scratch


@dataclass(frozen=True)
class Timeout:
    """A timer: task number `task` of the agent `agent` (batch `batch`) is over its
    time."""

    agent: str
    batch: int
    task: int
    seconds: float


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
