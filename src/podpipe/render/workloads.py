"""What runs the rendered pods: a StatefulSet (the default, and a standing line's
home), OpenKruise's Advanced StatefulSet (in-place image updates), or an Indexed Job
(`--flavor job`: a one-shot run that completes, or fails, as Jobs do).

Each takes the same pod template; a flavor changes only how the pods are run and
what they are told (`Flavor`: the pod's index, the conductor's and the agents'
flags, the node tier's volume).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from podpipe.render.data import Volumes

POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
JOB_INDEX = "batch.kubernetes.io/job-completion-index"
BACKOFF_LIMIT = 3  # a Job's pods lost to a node or a kill: tried again this often


@dataclass(frozen=True)
class Flavor:
    """How a flavor's pods differ: where the pod index comes from, what the conductor
    and the agents are told, whether the node tier is a claim per pod."""

    name: str

    @property
    def one_shot(self) -> bool:
        return self.name == "job"

    @property
    def pod_index(self) -> str:
        """The downward API's field of the pod's ordinal."""
        return (f"metadata.annotations['{JOB_INDEX}']" if self.one_shot
                else f"metadata.labels['{POD_INDEX_LABEL}']")

    def conductor_flags(self, layout: str) -> list[str]:
        """A Job's conductor does not resume a failed run; in one container it exits
        with the run, else it tells the agents how the run ended."""
        if not self.one_shot:
            return []
        return ["--once", "--no-hold"] if layout == "processes" else ["--once"]

    def agent_flags(self) -> list[str]:
        """A StatefulSet's agents hold once the run is over (what exits is restarted);
        a Job's exit with the run and restart their own workers (the kubelet does not)."""
        return ["--restart"] if self.one_shot else ["--hold"]


def statefulset(meta: dict[str, Any], labels: dict[str, str], template: dict[str, Any],
                replicas: int, volumes: Volumes, *, kruise: bool = False,
                grace_seconds: int = 10) -> dict[str, Any]:
    workload: dict[str, Any] = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta,
        "spec": {"serviceName": meta["name"], "replicas": replicas,
                 "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": labels},
                 "updateStrategy": {"type": "RollingUpdate"},
                 "template": template},
    }
    if volumes.host_path is None:
        workload["spec"]["volumeClaimTemplates"] = [{"metadata": {"name": "node"},
                                                     "spec": node_claim(volumes)}]
    if kruise:
        workload["apiVersion"] = "apps.kruise.io/v1beta1"
        workload["spec"]["updateStrategy"] = {
            "type": "RollingUpdate",
            "rollingUpdate": {"podUpdatePolicy": "InPlaceIfPossible",
                              "inPlaceUpdateStrategy": {"gracePeriodSeconds": grace_seconds}}}
        template["spec"]["readinessGates"] = [{"conditionType": "InPlaceUpdateReady"}]
    return workload


def job(meta: dict[str, Any], template: dict[str, Any], replicas: int) -> dict[str, Any]:
    """An Indexed Job: one pod per replica, each its completion index's shards; it
    completes when every pod's run succeeded. A pod whose run failed (a container
    exits 1, a stage's failure, or 2, bad input) fails the Job at once; one disrupted
    (evicted, preempted, its node drained) is run again without counting; one lost
    otherwise (its node gone, killed) again up to BACKOFF_LIMIT times — the new pod
    starts from the durable tier's checkpoints."""
    template["spec"]["restartPolicy"] = "Never"  # (what podFailurePolicy needs)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"completionMode": "Indexed", "completions": replicas,
                     "parallelism": replicas, "backoffLimit": BACKOFF_LIMIT,
                     "podFailurePolicy": {"rules": [
                         {"action": "FailJob",
                          "onExitCodes": {"operator": "In", "values": [1, 2]}},
                         {"action": "Ignore",
                          "onPodConditions": [{"type": "DisruptionTarget",
                                              "status": "True"}]}]},
                     "template": template}}


def node_claim(volumes: Volumes) -> dict[str, Any]:
    """The node tier's claim: one per pod (a StatefulSet's claim template, a Job's
    ephemeral volume)."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": volumes.node_size}}}
    if volumes.storage_class:
        spec["storageClassName"] = volumes.storage_class
    return spec
