"""Kubernetes manifests for a pipeline: what `podpipe render` prints.

A pipeline becomes a ConfigMap (the spec, verbatim), a headless Service and a
StatefulSet whose every replica is one pod of the pod pipeline pattern:

- the conductor as a native sidecar (an init container with `restartPolicy:
  Always`) whose startup probe passes once its socket answers, so the agent
  containers start after it;
- one container per node (source, stages, sinks) running `podpipe agent --stage
  NAME`, the entry point the local launchers run; or, with layout `processes`, one
  container whose conductor starts every agent as a process;
- the RAM scratch as an `emptyDir` with `medium: Memory` and `sizeLimit` = the
  pipeline's budget, mounted at the scratch path and at `/dev/shm` everywhere;
  the node tier on a PersistentVolumeClaim per pod (or a hostPath); the pod index
  from the `apps.kubernetes.io/pod-index` label through the downward API;
- the data: every local path of the spec (source, tables, sinks, a `file://` durable
  tier) must resolve on a volume the pod mounts: `--data-claim CLAIM` (a
  PersistentVolumeClaim) or `--data-host-path DIR`, mounted at `/data`, the working
  directory then (relative paths resolve there; the user's code stays importable
  from the image's `/app`), read-write for the sinks' containers and the conductor,
  read-only for the others. Without one, a spec with local paths is refused: they
  would resolve on the image's read-only root.

The `openkruise` flavor renders an Advanced StatefulSet whose pods take image
changes in place (`InPlaceIfPossible`), so a stage can be swapped without losing
what is in RAM; `image_patch` is the JSON patch that does it. The `job` flavor
renders an Indexed Job instead, for a one-shot run that completes (`workloads`).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from typing import Any

import yaml

from podpipe import __version__
from podpipe.errors import UsageError
from podpipe.model import shards
from podpipe.model.graph import Graph
from podpipe.model.sizes import parse_size
from podpipe.model.spec import Pipeline, Resources
from podpipe.render import data, sizing as sizes, workloads
from podpipe.render.data import DATA, WORKDIR, Volumes
from podpipe.runtime.plumbing.protocol import CONTAINER_ENV, shadow_name

__all__ = ["Options", "Volumes", "dump", "image_patch", "render", "stage_patch",
           "submit_commands"]

FLAVORS = ("kubernetes", "openkruise", "job")
LAYOUTS = ("containers", "processes")

# Paths inside every container; the agents and the conductor get them as flags.
SPEC_DIR = "/etc/podpipe"
SPEC_FILE = f"{SPEC_DIR}/pipeline.yaml"
SCRATCH = "/podpipe/scratch"
SOCKET = f"{SCRATCH}/conductor.sock"
NODE_TIER = "/var/lib/podpipe"
RUN_DIR = f"{NODE_TIER}/runs/$(POD_NAME)"  # expanded by the kubelet from the env
CONDUCTOR = "podpipe-conductor"
UID = 10001



@dataclass(frozen=True)
class Options:
    """How to render; every field is a `podpipe render` flag."""

    flavor: str = "kubernetes"
    replicas: int = 1
    image: str = f"podpipe:{__version__}"     # for nodes whose stage names no `image:`
    layout: str = "containers"
    volumes: Volumes = Volumes()              # the node tier's and the data's
    secret: str | None = None                 # env from this Secret: store credentials
    namespace: str | None = None
    grace_seconds: int = 10                   # OpenKruise in-place update grace period
    overrides: tuple[str, ...] = ()           # `--set`, passed on to every process
    metrics_port: int | None = None           # the conductor serves Prometheus metrics
    pod_monitor: bool = False                 # and a PodMonitor tells Prometheus to scrape
    log_format: str | None = None             # every container's PODPIPE_LOG_FORMAT
    kube_version: str = "1.34"                # the cluster's: pod-level resources from 1.34
    standing: bool = False                    # each pod a standing line, taking jobs

    def check(self) -> None:
        if self.flavor not in FLAVORS:
            raise UsageError(f"--flavor {self.flavor!r}: expected one of {', '.join(FLAVORS)}")
        if self.layout not in LAYOUTS:
            raise UsageError(f"--layout {self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.replicas < 1:
            raise UsageError(f"--replicas {self.replicas}: expected at least 1")
        self.volumes.check()
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise UsageError(f"--metrics-port {self.metrics_port}: expected a port, 1 to 65535")
        if not re.fullmatch(r"1\.\d{1,2}", self.kube_version) or \
                int(self.kube_version[2:]) < 25:
            raise UsageError(f"--kube-version {self.kube_version!r}: expected 1.25 or later, "
                             "as MAJOR.MINOR")
        if self.pod_monitor and self.metrics_port is None:
            raise UsageError("--pod-monitor: the pods serve no metrics to scrape; add "
                             "--metrics-port PORT")
        if self.standing and self.flavor == "job":
            raise UsageError("--standing --flavor job: a Job runs the spec once; a "
                             "standing line stands in a StatefulSet (the default flavor)")


def render(pipeline: Pipeline, spec_text: str, options: Options) -> list[dict[str, Any]]:
    """The manifests, in apply order: ConfigMap, Service, StatefulSet — or ConfigMap,
    Job (`--flavor job`) — and a PodMonitor, the Prometheus Operator's, with
    `pod_monitor`."""
    options.check()
    data.check(pipeline, options.volumes, options.replicas)
    name = pipeline.name
    labels = {"app.kubernetes.io/name": "podpipe", "app.kubernetes.io/instance": name}
    meta = {"name": name, **({"namespace": options.namespace} if options.namespace else {}),
            "labels": {**labels, "app.kubernetes.io/version": __version__}}
    config = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {**meta, "name": f"{name}-spec"},
              "data": {"pipeline.yaml": spec_text}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"clusterIP": "None", "selector": labels, "publishNotReadyAddresses": True}}
    spec_digest = hashlib.sha256(spec_text.encode()).hexdigest()[:16]
    pod, sizing = _pod_spec(pipeline, options)
    template = {"metadata": {"labels": labels,
                             "annotations": {"podpipe.dev/spec-sha256": spec_digest,
                                             "kubectl.kubernetes.io/default-container":
                                                 CONDUCTOR if options.layout == "containers"
                                                 else "pod"}},
                "spec": pod}
    template["metadata"]["annotations"]["podpipe.dev/sizing"] = sizing
    if options.flavor == "job":
        objects = [config, workloads.job(meta, template, options.replicas)]
    else:
        objects = [config, service, workloads.statefulset(
            meta, labels, template, options.replicas, options.volumes,
            kruise=options.flavor == "openkruise", grace_seconds=options.grace_seconds)]
    if not options.pod_monitor:
        return objects
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
               "spec": {"selector": {"matchLabels": labels},
                        "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics",
                                                 "interval": "15s"}]}}
    return [*objects, monitor]


class _Dumper(yaml.SafeDumper):  # type: ignore[misc]  # (PyYAML has no type hints)
    """Plain YAML as people write it: no anchors, multi-line strings as blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def dump(manifests: list[dict[str, Any]]) -> str:
    text: str = yaml.dump_all(manifests, Dumper=_Dumper, sort_keys=False, width=100)
    return text


def image_patch(manifests: list[dict[str, Any]], stage: str, image: str) -> list[dict[str, Any]]:
    """A JSON patch (RFC 6902) of the StatefulSet that gives `stage` a new image.

    It tests the container's name before replacing, so it cannot land on the wrong
    container if the StatefulSet was rendered differently.
    """
    workload = next(m for m in manifests if m["kind"] in ("StatefulSet", "Job"))
    if workload["kind"] == "Job":
        raise UsageError("--patch: a Job's pod template cannot change; swap the stage in "
                         "the running run, or render the Job again")
    pod = workload["spec"]["template"]["spec"]
    return _patch([c["name"] for c in pod["containers"]], stage, image)


def shadow_patch(manifests: list[dict[str, Any]], stage: str, image: str) -> dict[str, Any]:
    """The patch of a running pod's `ephemeralcontainers` that adds a candidate of
    `stage` (`podpipe shadow`; kubectl patch pod POD --subresource ephemeralcontainers):
    the stage's container as rendered — its mounts, the memory volume among them, its
    env — with the image `image`, serving the candidate (`STAGE@shadow`) once, without
    what an ephemeral container may not have (resources, ports, probes)."""
    workload = next(m for m in manifests if m["kind"] in ("StatefulSet", "Job"))
    containers = workload["spec"]["template"]["spec"]["containers"]
    _patch([c["name"] for c in containers], stage, image)  # (the stage has a container)
    container = copy.deepcopy(next(c for c in containers if c["name"] == stage))
    for field in ("resources", "ports", "startupProbe", "livenessProbe", "readinessProbe",
                  "lifecycle", "restartPolicy"):
        container.pop(field, None)
    args = [a for a in container["args"] if a not in ("--hold", "--restart")]
    if "--workers" in args:  # one process: the candidate is one more worker of its own
        del args[args.index("--workers"):args.index("--workers") + 2]
    args[args.index("--stage") + 1] = shadow_name(stage)
    container.update(name=f"{stage[:56]}-shadow", image=image, args=args)
    return {"spec": {"ephemeralContainers": [container]}}


def stage_patch(pipeline: Pipeline, stage: str, image: str) -> list[dict[str, Any]]:
    """`image_patch` of the pipeline's StatefulSet as `render` makes it (a container
    per node, in graph order), without rendering it (`swap --k8s`)."""
    return _patch(list(Graph.of(pipeline).order), stage, image)


def submit_commands(line: str, replicas: int, job: str, overrides: list[str], *,
                    namespace: str | None = None, wait: bool = False) -> list[list[str]]:
    """The commands that put the job `job` on every pod of a line rendered with
    `--standing` as `line` (the pipeline's name: its StatefulSet's and each pod's
    line's): `podpipe submit` inside each pod, through `kubectl exec` (the line's
    socket stays in the pod). Each pod runs the shards it owns."""
    if replicas < 1:
        raise UsageError(f"--replicas {replicas}: expected at least 1")
    flags = [arg for item in overrides for arg in ("--set", item)]
    where = ["-n", namespace] if namespace else []
    return [["kubectl", "exec", *where, f"{line}-{i}", "--", "podpipe", "submit", line,
             "--job", job, *flags, *(["--wait"] if wait else [])] for i in range(replicas)]


def _patch(names: list[str], stage: str, image: str) -> list[dict[str, Any]]:
    if stage not in names:
        if len(names) == 1:
            raise UsageError(f"stage {stage!r} has no container of its own in the "
                             "'processes' layout; swap the pod's image instead")
        raise UsageError(f"no stage {stage!r}; the pod's containers are {', '.join(names)}")
    path = f"/spec/template/spec/containers/{names.index(stage)}"
    return [{"op": "test", "path": f"{path}/name", "value": stage},
            {"op": "replace", "path": f"{path}/image", "value": image}]


# -- the pod ----------------------------------------------------------------------


def _metrics_port(container: dict[str, Any], options: Options) -> None:
    if options.metrics_port is not None:
        container["ports"] = [{"name": "metrics", "containerPort": options.metrics_port,
                               "protocol": "TCP"}]


def _pod_spec(pipeline: Pipeline, options: Options) -> tuple[dict[str, Any], str]:
    """The pod, and how its memory was sized (in words, for an annotation)."""
    nodes = Graph.of(pipeline).order
    if CONDUCTOR in nodes:
        raise UsageError(f"a stage named {CONDUCTOR!r} would clash with the conductor's "
                         "container; rename it")
    flags = [arg for item in options.overrides for arg in ("--set", item)]
    node_tier = pipeline.checkpoints.node
    if not node_tier.startswith("/"):  # (relative: on the read-only root)
        # a line's jobs and its home are each pod's own (pods may share a host path)
        node_tier = f"{NODE_TIER}/$(POD_NAME)" if options.standing else NODE_TIER
        flags += ["--set", f"checkpoints.node={node_tier}"]
    shards.check_handover(pipeline, options.replicas)
    flavor = workloads.Flavor(options.flavor)
    conductor_args = ["--spec", SPEC_FILE, "--scratch", SCRATCH,
                      *(["--standing"] if options.standing else ["--run-dir", RUN_DIR]),
                      "--layout", options.layout, "--replicas", str(options.replicas),
                      *flavor.conductor_flags(options.layout), *flags]
    if options.metrics_port is not None:
        conductor_args += ["--metrics-port", f"0.0.0.0:{options.metrics_port}"]
    budget = pipeline.memory
    if options.layout == "processes":
        total = [sizes.of_node(pipeline, node) for node in nodes]
        # The conductor starts each node's workers in this one container: a node with
        # `workers: N` asks for N times its CPU (`auto` asks for one's; it grows into
        # what the container has).
        cpu = sum(sizes.millicores(r.cpu or sizes.DEFAULT_CPU) * (pipeline.workers(node) or 1)
                  for node, r in zip(nodes, total))
        memory = sum(r.memory or sizes.DEFAULT_MEMORY for r in total) + sizes.CONDUCTOR_MEMORY
        init: list[dict[str, Any]] = []
        containers = [_container("pod", options.image, ["podpipe", "conductor"],
                                 conductor_args, Resources(f"{cpu}m", memory), budget, options,
                                 writes_data=True)]
        # one container: the scratch it writes is in its request too (counted once)
        containers[0]["resources"]["requests"]["memory"] = sizes.mebibytes(memory + budget)
        _gpus(containers[0], sum(_gpus_of(pipeline, node) for node in nodes))
        pod_resources = None
        sizing = (f"one container: requests {sizes.mebibytes(memory)} (the processes' "
                  f"needs, the conductor's {sizes.mebibytes(sizes.CONDUCTOR_MEMORY)} in) + "
                  f"the RAM scratch {sizes.mebibytes(budget)}; its limit the same")
        _metrics_port(containers[0], options)
    else:
        sidecar = _container(CONDUCTOR, options.image, ["podpipe", "conductor"],
                             conductor_args, Resources("50m", sizes.CONDUCTOR_MEMORY), 0, options,
                             writes_data=True)  # (a sink's commit, its manifest)
        sidecar["restartPolicy"] = "Always"  # a native sidecar: up before, down after
        _metrics_port(sidecar, options)
        sidecar["startupProbe"] = {"exec": {"command": ["podpipe", "probe", SOCKET]},
                                   "periodSeconds": 1, "timeoutSeconds": 3,
                                   "failureThreshold": 300}
        # a conductor that stops answering is restarted (it resumes from the pod's RAM)
        sidecar["livenessProbe"] = {"exec": {"command": ["podpipe", "probe", SOCKET]},
                                    "periodSeconds": 10, "timeoutSeconds": 5,
                                    "failureThreshold": 3}
        init = [sidecar]
        # A node with `workers: N` runs its N processes in its container, and asks for
        # N times its CPU; `auto` starts one there and grows within its CPU limit.
        containers = [
            _container(node, _image(pipeline, node, options), ["podpipe", "agent"],
                       ["--stage", node, "--spec", SPEC_FILE, "--socket", SOCKET,
                        "--wait", "60", *flavor.agent_flags(), *_workers_flag(pipeline, node),
                        *flags],
                       sizes.per_container(pipeline, node), budget, options,
                       writes_data=node in {s.name for s in pipeline.sinks})
            for node in nodes]
        for node, container in zip(nodes, containers):  # started once its agent is up
            container["startupProbe"] = {
                "exec": {"command": ["podpipe", "probe", SOCKET, "--agent", container["name"]]},
                "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 300}
            if pipeline.workers(node) is None:  # auto: what its workers may grow to
                container["resources"]["limits"]["cpu"] = f"{pipeline.container_cpus:g}"
            container["env"].append({"name": CONTAINER_ENV, "value": "1"})
            _gpus(container, _gpus_of(pipeline, node))
        sizing, pod_resources = sizes.size(init + containers, budget, options.kube_version)
        if any(pipeline.workers(node) is None for node in nodes):
            sizing += (f"; a workers: auto node's container starts one worker and may grow "
                       f"to {pipeline.container_cpus:g} cores (its CPU limit: spec.cpus, "
                       "else 2)")
    if options.standing:  # `kubectl exec POD -- podpipe submit LINE` finds its line
        conductor = init[0] if init else containers[0]
        conductor["env"].append({"name": "PODPIPE_LINES", "value": f"{node_tier}/lines"})
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID,
                            "fsGroup": UID, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if init:
        pod["initContainers"] = init
    pod["containers"] = containers
    if pod_resources is not None:
        pod["resources"] = pod_resources
    pod["volumes"] = _volumes(pipeline, options)
    return pod, sizing


def _gpus_of(pipeline: Pipeline, node: str) -> int:
    """The GPUs a node's container asks for: `resources.gpu` for each of its workers
    (`auto`: one worker's — it grows no further than its devices)."""
    gpu = next((s.resources.gpu for s in pipeline.stages if s.name == node), None)
    return (gpu or 0) * (pipeline.workers(node) or 1)


def _gpus(container: dict[str, Any], count: int) -> None:
    """An NVIDIA device plugin's devices, as a limit (an extended resource's request
    is its limit)."""
    if count:
        container["resources"]["limits"]["nvidia.com/gpu"] = str(count)


def _container(name: str, image: str, command: list[str], args: list[str],
               resources: Resources, scratch_bytes: int, options: Options, *,
               writes_data: bool = False) -> dict[str, Any]:
    """A container; its memory limit covers its own need plus the scratch it may write
    (pages of a memory-backed volume are charged to the writer's cgroup). With a data
    volume it works there (`writes_data`: read-write)."""
    memory = resources.memory or sizes.DEFAULT_MEMORY
    container: dict[str, Any] = {
        "name": name, "image": image, "imagePullPolicy": "IfNotPresent",
        "command": command, "args": args, "workingDir": WORKDIR,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "POD_INDEX", "valueFrom": {"fieldRef": {
                "fieldPath": workloads.Flavor(options.flavor).pod_index}}},
            {"name": "HOME", "value": "/tmp"},  # the root filesystem is read-only
        ],
        "resources": {"requests": {"cpu": resources.cpu or sizes.DEFAULT_CPU,
                                   "memory": sizes.mebibytes(memory)},
                      "limits": {"memory": sizes.mebibytes(memory + scratch_bytes)}},
        "volumeMounts": [
            {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "scratch", "mountPath": "/dev/shm"},
            {"name": "node", "mountPath": NODE_TIER},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
        "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                            "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if options.volumes.data:
        container["workingDir"] = DATA
        container["env"].append({"name": "PYTHONPATH", "value": WORKDIR})  # the user's code
        container["volumeMounts"].append({"name": "data", "mountPath": DATA,
                                          "readOnly": not writes_data})
    if options.log_format:
        container["env"].append({"name": "PODPIPE_LOG_FORMAT", "value": options.log_format})
    if options.secret:
        container["envFrom"] = [{"secretRef": {"name": options.secret}}]
    return container


def _volumes(pipeline: Pipeline, options: Options) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "spec", "configMap": {"name": f"{pipeline.name}-spec"}},
        {"name": "scratch", "emptyDir": {"medium": "Memory",
                                         "sizeLimit": sizes.mebibytes(pipeline.memory)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    where = options.volumes
    if where.host_path is not None:
        volumes.append({"name": "node", "hostPath": {"path": where.host_path,
                                                     "type": "DirectoryOrCreate"}})
    elif options.flavor == "job":  # (a StatefulSet claims it per pod by a template)
        volumes.append({"name": "node", "ephemeral": {"volumeClaimTemplate": {
            "spec": workloads.node_claim(where)}}})
    if where.data_claim is not None:
        volumes.append({"name": "data",
                        "persistentVolumeClaim": {"claimName": where.data_claim}})
    elif where.data_host_path is not None:
        volumes.append({"name": "data", "hostPath": {"path": where.data_host_path,
                                                     "type": "Directory"}})
    return volumes


def _image(pipeline: Pipeline, node: str, options: Options) -> str:
    stage = next((s for s in pipeline.stages if s.name == node), None)
    return stage.image if stage is not None and stage.image else options.image


def _workers_flag(pipeline: Pipeline, node: str) -> list[str]:
    count = pipeline.workers(node)
    if count is None:
        return ["--workers", "auto"]
    return ["--workers", str(count)] if count > 1 else []


