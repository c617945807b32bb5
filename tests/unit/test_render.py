"""`podpipe render`: manifests that validate against real schemas, and match the golden files.

Native kinds are validated with kubernetes-validate in strict mode (an unknown field
is an error) for the oldest and newest Kubernetes versions we claim; the OpenKruise
StatefulSet against the CRD's own schema in ../shared/schemas/openkruise, closed so
that unknown fields fail too, and its pod template as a core PodTemplate.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, podpipe, spec, write_spec

GOLDEN = ROOT / "tests" / "golden"
# OpenKruise's CRD, copied from ../shared/schemas/openkruise so that CI has it.
KRUISE_CRD = ROOT / "tests" / "schemas" / "openkruise" / "apps.kruise.io_statefulsets.yaml"
SHARED_CRD = ROOT.parent / "shared" / "schemas" / "openkruise" / KRUISE_CRD.name
VERSIONS = ("1.33.0", "1.34.0", kubernetes_validate.latest_version())
EXAMPLE = ROOT / "examples" / "tpch" / "q1.yaml"


def render(*args: str, cwd: Path = ROOT) -> list[dict]:
    """The manifests of `podpipe render ARGS` (with a data volume for the example's
    relative paths unless ARGS name one)."""
    data = [] if any(a.startswith("--data-") for a in args) else ["--data-claim", "lake"]
    done = podpipe("render", *args, *data, cwd=cwd)
    assert done.returncode == 0, done.stderr
    return list(yaml.safe_load_all(done.stdout))


def _closed(schema: dict) -> dict:
    """The CRD schema with every object that lists its properties closed to others,
    as the API server's pruning would silently drop them."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def kruise_schema() -> dict:
    crd = yaml.safe_load(KRUISE_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")
    return _closed(version["schema"]["openAPIV3Schema"])


def validate(manifest: dict) -> None:
    """Raises if `manifest` is not a valid object."""
    if manifest["apiVersion"] == "apps.kruise.io/v1beta1":
        jsonschema.validate(manifest, kruise_schema())
        template = {"apiVersion": "v1", "kind": "PodTemplate",
                    "metadata": {"name": manifest["metadata"]["name"]},
                    "template": manifest["spec"]["template"]}
        for version in VERSIONS:
            kubernetes_validate.validate(template, version, strict=True)
        return
    for version in VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.skipif(not SHARED_CRD.exists(), reason="no ../shared checkout here")
def test_the_copied_openkruise_schema_is_the_shared_one():
    assert KRUISE_CRD.read_bytes() == SHARED_CRD.read_bytes()


FLAVORS = {
    "kubernetes": (),
    "openkruise": ("--flavor", "openkruise"),
    "processes": ("--layout", "processes"),
    "hostpath-secret": ("--host-path", "/mnt/podpipe", "--secret", "s3-credentials",
                        "--replicas", "3", "--storage-class", "local-path"),
    "openkruise-processes": ("--flavor", "openkruise", "--layout", "processes"),
    "metrics": ("--metrics-port", "9400"),
    "openkruise-processes-metrics": ("--flavor", "openkruise", "--layout", "processes",
                                     "--metrics-port", "9400"),
    "containers-workers": ("--flavor", "openkruise", "--set", "stages.prices.workers=3"),
    "standing": ("--standing", "--host-path", "/srv/podpipe"),
    "standing-processes": ("--standing", "--layout", "processes"),
    "job": ("--flavor", "job", "--replicas", "2", "--storage-class", "local-path"),
    "job-processes-1.33": ("--flavor", "job", "--layout", "processes", "--kube-version",
                           "1.33", "--host-path", "/srv/podpipe"),
}


@pytest.mark.parametrize("flags", FLAVORS.values(), ids=FLAVORS.keys())
def test_every_rendered_object_validates_against_the_real_schemas(flags):
    manifests = render(str(EXAMPLE), *flags)
    assert [m["kind"] for m in manifests] == (["ConfigMap", "Job"] if "job" in flags else
                                              ["ConfigMap", "Service", "StatefulSet"])
    for manifest in manifests:
        validate(manifest)


def test_the_validation_catches_what_it_should():
    """The checks above can fail: an unknown field, a wrong type, a missing field."""
    manifests = render(str(EXAMPLE), "--flavor", "openkruise")
    kruise = manifests[2]
    broken = copy.deepcopy(kruise)
    broken["spec"]["updateStrategy"]["rollingUpdate"]["podUpdatePolicy2"] = "x"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)
    broken = copy.deepcopy(kruise)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = {"a": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    native = render(str(EXAMPLE))[2]
    del native["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(native)


@pytest.mark.parametrize("name,flags", [
    ("tpch-q1-kubernetes", ()),
    ("tpch-q1-openkruise", ("--flavor", "openkruise")),
    ("tpch-q1-processes", ("--layout", "processes")),
])
def test_the_example_renders_as_its_golden_file(name, flags):
    """The golden files were read by hand once; a change to them is a change to review.
    PODPIPE_UPDATE_GOLDEN=1 rewrites them."""
    done = podpipe("render", str(EXAMPLE.relative_to(ROOT)), *flags, "--data-claim", "lake",
                   cwd=ROOT)
    assert done.returncode == 0, done.stderr
    golden = GOLDEN / f"{name}.yaml"
    if os.environ.get("PODPIPE_UPDATE_GOLDEN"):
        golden.write_text(done.stdout)
    assert done.stdout == golden.read_text()


def pod_spec(manifests: list[dict]) -> dict:
    return manifests[2]["spec"]["template"]["spec"]


def test_the_pod_has_a_sidecar_conductor_and_a_container_per_stage():
    manifests = render(str(EXAMPLE), "--flavor", "openkruise", "--image", "reg/podpipe:1")
    statefulset = manifests[2]
    pod = pod_spec(manifests)
    assert [c["name"] for c in pod["containers"]] == [
        "source", "filter", "prices", "partial", "total", "sink-0"]
    assert all(c["command"] == ["podpipe", "agent"] and c["image"] == "reg/podpipe:1"
               for c in pod["containers"])
    (sidecar,) = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["exec"]["command"][:2] == ["podpipe", "probe"]
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    rolling = statefulset["spec"]["updateStrategy"]["rollingUpdate"]
    assert rolling["podUpdatePolicy"] == "InPlaceIfPossible"
    assert pod["readinessGates"] == [{"conditionType": "InPlaceUpdateReady"}]
    scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
    assert scratch["emptyDir"] == {"medium": "Memory", "sizeLimit": "1024Mi"}
    for container in [sidecar, *pod["containers"]]:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts["/dev/shm"] == "scratch" and "scratch" in mounts.values()
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert not security["allowPrivilegeEscalation"]
        index = next(e for e in container["env"] if e["name"] == "POD_INDEX")
        assert index["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['apps.kubernetes.io/pod-index']"


def test_a_stage_image_and_resources_come_from_the_spec(tmp_path):
    stages = [{"name": "double", "run": "pystages:double", "inputs": ["source"],
               "image": "reg/double:2", "resources": {"cpu": 2, "memory": "1GiB"}}]
    path = write_spec(tmp_path / "p.yaml", spec(stages, [{"input": "double", "uri": "out/"}],
                                                memory="512MiB"))
    containers = {c["name"]: c for c in pod_spec(render(str(path), cwd=tmp_path))["containers"]}
    double = containers["double"]
    assert double["image"] == "reg/double:2"
    assert double["resources"] == {"requests": {"cpu": "2", "memory": "1024Mi"},  # the pod
                                   "limits": {"cpu": "2"}}  # has the memory limit; auto's
    old = pod_spec(render(str(path), "--kube-version", "1.33", cwd=tmp_path))
    double = next(c for c in old["containers"] if c["name"] == "double")
    assert double["resources"] == {"requests": {"cpu": "2", "memory": "1024Mi"},
                                   "limits": {"memory": "1536Mi", "cpu": "2"}}  # + the scratch
    assert containers["source"]["image"].startswith("podpipe:")


def test_the_patch_swaps_one_stage_image_and_checks_the_container_first():
    manifests = render(str(EXAMPLE), "--flavor", "openkruise")
    done = podpipe("render", str(EXAMPLE), "--flavor", "openkruise", "--data-claim", "lake",
                   "--patch", "prices=reg/prices:v2", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    patch = json.loads(done.stdout)
    names = [c["name"] for c in pod_spec(manifests)["containers"]]
    index = names.index("prices")
    assert patch == [
        {"op": "test", "path": f"/spec/template/spec/containers/{index}/name", "value": "prices"},
        {"op": "replace", "path": f"/spec/template/spec/containers/{index}/image",
         "value": "reg/prices:v2"}]
    # Applied to the StatefulSet, it changes that image and nothing else.
    patched = copy.deepcopy(manifests[2])
    patched["spec"]["template"]["spec"]["containers"][index]["image"] = "reg/prices:v2"
    assert _apply(manifests[2], patch) == patched


def _apply(document: dict, patch: list[dict]) -> dict:
    document = copy.deepcopy(document)
    for op in patch:
        *parents, last = op["path"].strip("/").split("/")
        node = document
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if op["op"] == "test":
            assert node[key] == op["value"]
        else:
            node[key] = op["value"]
    return document


@pytest.mark.parametrize("flags,message", [
    (("--patch", "nope=img:1"), "no stage 'nope'"),
    (("--patch", "prices"), "expected STAGE=IMAGE"),
    (("--layout", "processes", "--patch", "prices=img:1"), "no container of its own"),
    (("--replicas", "0"), "--replicas 0: expected at least 1"),
    (("--node-size", "big"), "--node-size"),
    (("--host-path", "relative/dir"), "expected an absolute path"),
    (("--flavor", "nomad"), "invalid choice: 'nomad'"),
    (("--set", "stages.prices.run=nocolon"), "spec.stages[1].run"),
])
def test_bad_render_flags_exit_2_naming_the_flag(flags, message):
    done = podpipe("render", str(EXAMPLE), *flags, "--data-claim", "lake", cwd=ROOT)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_render_writes_the_output_file_whole(tmp_path):
    out = tmp_path / "pod.yaml"
    done = podpipe("render", str(EXAMPLE), "--data-claim", "lake", "-o", str(out), cwd=ROOT)
    assert done.returncode == 0 and done.stdout == ""
    assert [m["kind"] for m in yaml.safe_load_all(out.read_text())] == \
        ["ConfigMap", "Service", "StatefulSet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pod.yaml"]


@pytest.mark.parametrize("flags,where", [((), "initContainers"),
                                         (("--layout", "processes"), "containers")],
                         ids=["containers", "processes"])
def test_metrics_port_goes_to_the_conductor(flags, where):
    conductor = pod_spec(render(str(EXAMPLE), *flags, "--metrics-port", "9400"))[where][0]
    assert conductor["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert conductor["args"][-2:] == ["--metrics-port", "0.0.0.0:9400"]
    bad = podpipe("render", str(EXAMPLE.relative_to(ROOT)), "--metrics-port", "70000", cwd=ROOT)
    assert bad.returncode == 2 and "expected a port" in bad.stderr


def test_in_one_container_a_nodes_fixed_workers_multiply_its_cpu_request():
    plain = pod_spec(render(str(EXAMPLE), "--layout", "processes"))["containers"][0]
    sized = podpipe("render", str(EXAMPLE.relative_to(ROOT)), "--layout", "processes",
                    "--data-claim", "lake", "--set", "stages.prices.workers=3", cwd=ROOT)
    assert sized.returncode == 0, sized.stderr
    pod = list(yaml.safe_load_all(sized.stdout))[2]["spec"]["template"]["spec"]
    before = int(plain["resources"]["requests"]["cpu"].rstrip("m"))
    after = int(pod["containers"][0]["resources"]["requests"]["cpu"].rstrip("m"))
    assert after - before == 2 * 250  # prices: two more workers of the default 250m


def test_a_container_runs_its_nodes_fixed_workers_and_asks_for_their_cpu_and_memory():
    plain = {c["name"]: c for c in pod_spec(render(str(EXAMPLE)))["containers"]}
    sized = {c["name"]: c for c in pod_spec(render(
        str(EXAMPLE), "--set", "stages.prices.workers=3"))["containers"]}
    assert sized["prices"]["args"][sized["prices"]["args"].index("--workers") + 1] == "3"
    auto = sized["filter"]  # auto: one process, more as the conductor asks, within its limit
    assert auto["args"][auto["args"].index("--workers") + 1] == "auto"
    assert auto["resources"]["limits"] == {"cpu": "2"}
    assert auto["resources"]["requests"]["cpu"] == "250m"  # one worker's
    assert "limits" not in sized["prices"]["resources"]  # fixed: its requests
    grown = pod_spec(render(str(EXAMPLE), "--set", "cpus=3.5"))["containers"]
    assert next(c for c in grown if c["name"] == "filter")["resources"]["limits"] == \
        {"cpu": "3.5"}
    assert sized["prices"]["resources"]["requests"]["cpu"] == "750m"  # 3 x 250m
    one, three = (int(c["prices"]["resources"]["requests"]["memory"].rstrip("Mi"))
                  for c in (plain, sized))
    assert three == 3 * one


def test_a_table_is_a_container_of_its_own_and_counts_in_the_memory_volume():
    manifests = render(str(EXAMPLE.parent / "q12.yaml"))
    for manifest in manifests:
        validate(manifest)
    pod = manifests[2]["spec"]["template"]["spec"]
    table = next(c for c in pod["containers"] if c["name"] == "orders")
    assert table["args"][table["args"].index("--stage") + 1] == "orders"
    scratch = next(v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory")
    assert scratch["emptyDir"]["sizeLimit"] == "1024Mi"  # spec.memory: the tables are inside


PROMETHEUS = Path(__file__).resolve().parent.parent / "schemas" / "prometheus"


def _validate_pod_monitor(manifest: dict) -> subprocess.CompletedProcess:
    """The Prometheus Operator's CRD schema, as @kubernetes-models generates it."""
    return subprocess.run(["node", str(PROMETHEUS / "validate.mjs")], input=json.dumps(manifest),
                          capture_output=True, text=True, timeout=60)


def test_a_pod_monitor_scrapes_the_conductors_port_and_validates_against_its_crd():
    manifests = render(str(EXAMPLE), "--metrics-port", "9400", "--pod-monitor")
    assert [m["kind"] for m in manifests] == ["ConfigMap", "Service", "StatefulSet",
                                             "PodMonitor"]
    monitor, statefulset = manifests[3], manifests[2]
    checked = _validate_pod_monitor(monitor)
    assert checked.returncode == 0, checked.stderr
    template = statefulset["spec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        template["metadata"]["labels"].items()  # it selects the pipeline's pods
    ports = [p for c in template["spec"]["initContainers"] + template["spec"]["containers"]
             for p in c.get("ports", [])]
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in ports
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    broken = copy.deepcopy(monitor)  # the check can fail
    broken["spec"]["podMetricsEndpoints"][0]["port"] = 9400
    assert _validate_pod_monitor(broken).returncode == 1


def test_a_pod_monitor_without_metrics_is_refused():
    done = subprocess.run([sys.executable, "-m", "podpipe", "render", str(EXAMPLE),
                           "--pod-monitor"], capture_output=True, text=True)
    assert done.returncode == 2 and "--pod-monitor" in done.stderr and "--metrics-port" in \
        done.stderr


def test_a_spec_with_local_paths_needs_a_data_volume_and_gets_one_at_its_working_dir(tmp_path):
    """The README's first pipeline resolved `data/…` and `out/…` under /app, on the
    image's read-only root, with no volume there: render said nothing."""
    spec = ROOT / "examples" / "tpch" / "q1.yaml"
    refused = podpipe("render", str(spec), cwd=ROOT)
    assert refused.returncode == 2, refused.stdout
    assert "spec.source.uri 'data/tpch-sf0.1/lineitem/*.parquet'" in refused.stderr
    assert "spec.sinks[0].uri" in refused.stderr and "--data-claim" in refused.stderr
    assert "--data-host-path" in refused.stderr and "Traceback" not in refused.stderr
    outside = podpipe("render", str(spec), "--data-claim", "lake", "--set",
                      "sinks.0.uri=/mnt/out/", cwd=ROOT)
    assert outside.returncode == 2 and "'/mnt/out/': not on the data volume" in outside.stderr
    on_s3 = podpipe("render", str(spec), "--set", "source.uri=s3://lake/lineitem/",
                    "--set", "sinks.0.uri=s3://lake/q1/", cwd=ROOT)  # nothing local: none
    assert on_s3.returncode == 0, on_s3.stderr
    spread = podpipe("render", str(spec), "--data-host-path", "/srv/lake", "--replicas", "2",
                     cwd=ROOT)
    assert spread.returncode == 2 and "on its own node's disk" in spread.stderr
    shared = podpipe("render", str(spec), "--data-claim", "lake", "--replicas", "2", cwd=ROOT)
    assert shared.returncode == 0 and "must be ReadWriteMany" in shared.stderr

    pod = pod_spec(render(str(spec), "--data-host-path", "/srv/lake"))
    assert {"name": "data", "hostPath": {"path": "/srv/lake", "type": "Directory"}} in \
        pod["volumes"]
    mounts = {c["name"]: next(m for m in c["volumeMounts"] if m["name"] == "data")
              for c in pod["containers"] + pod["initContainers"]}
    assert {name for name, m in mounts.items() if not m["readOnly"]} == \
        {"sink-0", "podpipe-conductor"}  # the sink and the conductor (its commit) write
    assert all(m["mountPath"] == "/data" for m in mounts.values())
    for container in pod["containers"] + pod["initContainers"]:
        assert container["workingDir"] == "/data"
        assert {"name": "PYTHONPATH", "value": "/app"} in container["env"]  # the user's code
        assert "checkpoints.node=/var/lib/podpipe" in container["args"]  # not the image's


def _memory(quantity: str) -> int:
    assert quantity.endswith("Mi"), quantity
    return int(quantity[:-2])


def test_the_ram_scratch_is_counted_once_in_what_the_scheduler_reserves():
    """Requests added up to 2,688Mi and limits to 23,168Mi: each data container's limit
    was its need plus the whole budget, and the budget was in no request."""
    pod = pod_spec(render(str(EXAMPLE)))
    containers = pod["initContainers"] + pod["containers"]
    needs = sum(_memory(c["resources"]["requests"]["memory"]) for c in containers)
    budget = 1024  # the example's memory: 1GiB
    assert pod["resources"]["requests"]["memory"] == f"{needs + budget}Mi"
    assert pod["resources"]["limits"]["memory"] == f"{needs + budget}Mi"
    # the pod's limit covers the memory; an auto container's CPU limit is what it may
    # grow to (spec.cpus, else 2)
    assert all(c["resources"].get("limits", {}) in ({}, {"cpu": "2"}) for c in containers)
    assert "may grow to 2 cores" in render(str(EXAMPLE))[2]["spec"]["template"]["metadata"][
        "annotations"]["podpipe.dev/sizing"]
    cpu = sum(int(c["resources"]["requests"]["cpu"].rstrip("m")) for c in containers)
    assert pod["resources"]["requests"]["cpu"] == f"{cpu}m"
    annotations = render(str(EXAMPLE))[2]["spec"]["template"]["metadata"]["annotations"]
    assert f"= {needs + budget}Mi" in annotations["podpipe.dev/sizing"]

    old = pod_spec(render(str(EXAMPLE), "--kube-version", "1.33"))
    assert "resources" not in old  # no pod-level resources before 1.34
    conductor, *data = old["initContainers"] + old["containers"]
    assert _memory(conductor["resources"]["requests"]["memory"]) == 128 + budget  # once
    for c in data:  # the pages a container writes are charged to it
        assert _memory(c["resources"]["limits"]["memory"]) == \
            _memory(c["resources"]["requests"]["memory"]) + budget
    bad = podpipe("render", str(EXAMPLE), "--data-claim", "lake", "--kube-version", "2.0",
                  cwd=ROOT)
    assert bad.returncode == 2 and "--kube-version '2.0'" in bad.stderr


def test_every_stage_container_has_a_startup_probe_on_its_agent_and_the_conductor_a_liveness_one():
    pod = pod_spec(render(str(EXAMPLE)))
    for container in pod["containers"]:
        command = container["startupProbe"]["exec"]["command"]
        assert command == ["podpipe", "probe", "/podpipe/scratch/conductor.sock", "--agent",
                           container["name"]]
    conductor = pod["initContainers"][0]
    assert conductor["livenessProbe"]["exec"]["command"][:2] == ["podpipe", "probe"]
    assert "--agent" not in conductor["livenessProbe"]["exec"]["command"]


def test_a_standing_pod_runs_its_conductor_as_a_line_in_a_node_tier_of_its_own():
    """`--standing`: no run directory; the conductor serves a line; the node tier is
    each pod's own folder (pods may share a host path) and `PODPIPE_LINES` tells
    `podpipe submit` inside the pod where its line is."""
    pod = render(str(EXAMPLE), "--standing", "--host-path", "/srv/podpipe")[-1][
        "spec"]["template"]["spec"]
    conductor = pod["initContainers"][0]
    assert "--standing" in conductor["args"] and "--run-dir" not in conductor["args"]
    every = [conductor, *pod["containers"]]
    assert all("checkpoints.node=/var/lib/podpipe/$(POD_NAME)" in c["args"] for c in every)
    env = [e["name"] for e in conductor["env"]]
    assert env.index("POD_NAME") < env.index("PODPIPE_LINES")  # (expanded from it)
    assert {"name": "PODPIPE_LINES", "value": "/var/lib/podpipe/$(POD_NAME)/lines"} in \
        conductor["env"]
    one_shot = render(str(EXAMPLE))[-1]["spec"]["template"]["spec"]["initContainers"][0]
    assert "--standing" not in one_shot["args"] and "--run-dir" in one_shot["args"]


def test_submit_k8s_prints_one_command_per_pod_with_one_job_id():
    done = podpipe("submit", "tpch-q1", "--k8s", "--replicas", "3", "--namespace", "etl",
                   "--set", "source.uri=s3://lake/2026-12-07/*.parquet", "--wait", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines()]
    assert [c[:5] for c in commands] == [["kubectl", "exec", "-n", "etl", f"tpch-q1-{i}"]
                                         for i in range(3)]
    jobs = {c[c.index("--job") + 1] for c in commands}
    assert len(jobs) == 1 and jobs.pop().startswith("tpch-q1-")
    assert all(c[c.index("--") + 1:c.index("--") + 4] == ["podpipe", "submit", "tpch-q1"]
               and "source.uri=s3://lake/2026-12-07/*.parquet" in c and c[-1] == "--wait"
               for c in commands)


@pytest.mark.parametrize("flags,message", [
    (("--k8s", "--set", "stages.prices.run=x:y"), "a job may set only its data"),
    (("--k8s", "--job", "../etc"), "--job '../etc': expected letters"),
    (("--k8s", "--replicas", "0"), "--replicas 0"),
])
def test_bad_submit_k8s_flags_exit_2(flags, message):
    done = podpipe("submit", "tpch-q1", *flags, cwd=ROOT)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_job_runs_each_index_once_and_fails_at_once_on_a_stage_failure():
    """`--flavor job`: an Indexed Job over the same pod template; the pod index from
    the completion index; containers the kubelet does not restart, so the agents
    restart their own workers and end with the run; a stage's failure (exit 1) or bad
    input (2) fails the Job, a disruption is run again without counting."""
    config, job = render(str(EXAMPLE), "--flavor", "job", "--replicas", "3")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == \
        ("Indexed", 3, 3)
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob",
                        "onExitCodes": {"operator": "In", "values": [1, 2]}}
    assert rules[1]["action"] == "Ignore" and \
        rules[1]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    conductor = pod["initContainers"][0]
    assert "--once" in conductor["args"] and "--run-dir" in conductor["args"]
    for container in pod["containers"]:
        assert "--restart" in container["args"] and "--hold" not in container["args"]
    for container in [conductor, *pod["containers"]]:
        index = next(e for e in container["env"] if e["name"] == "POD_INDEX")
        assert index["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    node = next(v for v in pod["volumes"] if v["name"] == "node")
    assert node["ephemeral"]["volumeClaimTemplate"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    refused = podpipe("render", str(EXAMPLE), "--flavor", "job", "--standing",
                      "--data-claim", "lake", cwd=ROOT)
    assert refused.returncode == 2 and "a Job runs the spec once" in refused.stderr
    patch = podpipe("render", str(EXAMPLE), "--flavor", "job", "--patch", "prices=img:2",
                    "--data-claim", "lake", cwd=ROOT)
    assert patch.returncode == 2 and "cannot change" in patch.stderr


def test_a_gpu_stage_asks_for_its_workers_devices_and_validates(tmp_path):
    stages = [{"name": "score", "run": "pystages:double", "inputs": ["source"],
               "resources": {"gpu": 2}, "workers": 3},
              {"name": "grow", "run": "pystages:double", "inputs": ["score"],
               "resources": {"gpu": 1}}]
    path = write_spec(tmp_path / "p.yaml", spec(stages, [{"input": "grow", "uri": "out/"}]))
    for layout in ("containers", "processes"):
        manifests = render(str(path), "--layout", layout, "--data-claim", "lake",
                           cwd=tmp_path)
        for manifest in manifests:
            validate(manifest)
        containers = {c["name"]: c for c in pod_spec(manifests)["containers"]}
        if layout == "containers":
            assert containers["score"]["resources"]["limits"]["nvidia.com/gpu"] == "6"
            assert containers["grow"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
            assert "nvidia.com/gpu" not in containers["source"]["resources"].get("limits", {})
            assert {"name": "PODPIPE_CONTAINER", "value": "1"} in containers["score"]["env"]
        else:  # one container: every worker's devices
            assert containers["pod"]["resources"]["limits"]["nvidia.com/gpu"] == "7"


@pytest.mark.parametrize("flags", [(), ("--set", "stages.prices.workers=3", "--flavor",
                                        "openkruise")], ids=["one", "workers"])
def test_a_candidates_container_validates_and_mounts_what_its_stage_does(flags):
    """`render --shadow STAGE=IMAGE`: the ephemeral container a running pod takes (a
    Pod with it validates), the stage's mounts and env, the candidate's agent."""
    [patch] = render(str(EXAMPLE), *flags, "--shadow", "prices=registry/tpch:2")
    [candidate] = patch["spec"]["ephemeralContainers"]
    workload = render(str(EXAMPLE), *flags)[2]
    pod_spec = workload["spec"]["template"]["spec"]
    stage = next(c for c in pod_spec["containers"] if c["name"] == "prices")
    assert (candidate["name"], candidate["image"]) == ("prices-shadow", "registry/tpch:2")
    assert candidate["volumeMounts"] == stage["volumeMounts"]  # the memory volume: RAM
    assert candidate["env"] == stage["env"] and candidate["command"] == stage["command"]
    args = candidate["args"]
    assert args[args.index("--stage") + 1] == "prices@shadow"
    assert "--workers" not in args and "--hold" not in args and "--restart" not in args
    assert not {"resources", "startupProbe", "ports"} & set(candidate)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tpch-q1-0"},
           "spec": {**pod_spec, "ephemeralContainers": [candidate]}}
    for version in VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    broken = copy.deepcopy(pod)
    broken["spec"]["ephemeralContainers"][0]["volumeMounts"][0]["mountPath"] = 7
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


def test_a_candidates_container_is_refused_for_a_stage_without_one():
    done = podpipe("render", str(EXAMPLE), "--data-claim", "lake", "--shadow", "nope=x:1",
                   cwd=ROOT)
    assert done.returncode == 2 and "no stage 'nope'" in done.stderr
    done = podpipe("render", str(EXAMPLE), "--data-claim", "lake", "--shadow", "prices",
                   cwd=ROOT)
    assert done.returncode == 2 and "--shadow 'prices': expected STAGE=IMAGE" in done.stderr
