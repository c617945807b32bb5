"""How much a rendered pod asks for: each container's need (`resources` in the spec,
times a node's fixed workers) and the RAM scratch, counted once (`size`)."""

from __future__ import annotations

import math
from typing import Any

from podpipe.model.spec import Pipeline, Resources

# What a container asks for when its stage does not say (`resources:` in the spec).
DEFAULT_CPU = "250m"
DEFAULT_MEMORY = 256 << 20
CONDUCTOR_MEMORY = 128 << 20


def size(containers: list[dict[str, Any]], budget: int,
         kube_version: str) -> tuple[str, dict[str, Any] | None]:
    """The RAM scratch counted once in what the scheduler reserves. From 1.34, pod-level
    `resources`: requests the containers' needs plus the scratch, a memory limit the
    same (the pod's cgroup covers its memory-backed volume), and no container memory
    limit; before, the scratch in the conductor's request, and each data container's
    limit its need plus the scratch (pages are charged to the container that writes
    them). Returns how the numbers were made, in words, and the pod's resources."""
    needs = [bytes_of(c["resources"]["requests"]["memory"]) for c in containers]
    cpu = sum(millicores(c["resources"]["requests"]["cpu"]) for c in containers)
    total = sum(needs)
    if int(kube_version.partition(".")[2]) >= 34:
        for c in containers:  # (a CPU limit stays: what an auto container grows to)
            limits = c["resources"].get("limits", {})
            limits.pop("memory", None)
            if not limits:
                c["resources"].pop("limits", None)
        pod = {"requests": {"cpu": f"{cpu}m", "memory": mebibytes(total + budget)},
               "limits": {"memory": mebibytes(total + budget)}}
        return (f"pod-level resources (Kubernetes >= 1.34): requests {mebibytes(total)} "
                f"(the containers' needs, {len(containers)} of them) + the RAM scratch "
                f"{mebibytes(budget)} (once) = {mebibytes(total + budget)}, cpu {cpu}m; "
                "memory limit the same, no container's own"), pod
    conductor = containers[0]
    conductor["resources"]["requests"]["memory"] = mebibytes(needs[0] + budget)
    return (f"Kubernetes {kube_version} has no pod-level resources: the RAM scratch "
            f"{mebibytes(budget)} is in the conductor's request (once: requests "
            f"{mebibytes(total)} + {mebibytes(budget)} = {mebibytes(total + budget)}); "
            "each data container's limit is its need plus the scratch, since the pages it "
            "writes are charged to it"), None


def bytes_of(quantity: str) -> int:
    return int(quantity.removesuffix("Mi")) << 20


def of_node(pipeline: Pipeline, node: str) -> Resources:
    stage = next((s for s in pipeline.stages if s.name == node), None)
    return stage.resources if stage is not None else Resources()


def per_container(pipeline: Pipeline, node: str) -> Resources:
    """A node's container's resources: a process's (`resources`) times its workers."""
    own = of_node(pipeline, node)
    count = pipeline.workers(node) or 1
    if count == 1:
        return own
    return Resources(f"{millicores(own.cpu or DEFAULT_CPU) * count}m",
                     (own.memory or DEFAULT_MEMORY) * count)


def mebibytes(nbytes: int) -> str:
    return f"{math.ceil(nbytes / (1 << 20))}Mi"


def millicores(cpu: str) -> int:
    return int(cpu[:-1]) if cpu.endswith("m") else math.ceil(float(cpu) * 1000)
