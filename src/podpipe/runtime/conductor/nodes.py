"""What the engine runs each node with, from the spec and the machine: the restarts
its processes may have, its workers, and the cores `workers: auto` may use."""

from __future__ import annotations

import os

from podpipe.model.graph import Graph
from podpipe.model.pipeline import DEFAULT_RETRIES, Pipeline


def retries(pipeline: Pipeline, graph: Graph) -> dict[str, int]:
    """Restarts each node's process may have (the spec's, else the default)."""
    allowed = {node: DEFAULT_RETRIES for node in graph.order}
    allowed.update({stage.name: stage.retries for stage in pipeline.stages})
    return allowed


def workers(pipeline: Pipeline, graph: Graph) -> dict[str, int | None]:
    """Each node's fixed number of processes; None: `workers: auto`."""
    return {node: pipeline.workers(node) for node in graph.order}


def cpus(pipeline: Pipeline) -> float:
    """The cores `workers: auto` may use: `spec.cpus`, else what this process may use
    (its CPU affinity, and its cgroup's CPU quota, as a Kubernetes pod has)."""
    if pipeline.cpus is not None:
        return pipeline.cpus
    count = float(len(os.sched_getaffinity(0)))
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            count = min(count, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return max(1.0, count)
