"""The rendered pod works: its containers' commands, env and mounts agree with the runtime.

No cluster here, so this does what the kubelet would do for one replica of the
rendered StatefulSet, with processes: every volume becomes a directory (the
ConfigMap's files written into one), each container runs in a mount namespace of
its own whose root filesystem is read-only, with those directories mounted where
the manifest mounts them and nowhere else (`contain.py`), in its working
directory; its env is filled in (the downward API's pod name and pod index
included) and `$(VAR)` references expanded; the native sidecar starts first and
the others only once its startup probe passes, run inside the container as a
kubelet's exec probe is (`kubectl exec` the same way).
Then the pipeline must finish with the right answer and every container must stop
cleanly on SIGTERM, as on pod deletion.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT, SF, podpipe

EXAMPLE = ROOT / "examples" / "tpch" / "q1.yaml"
CONTAIN = Path(__file__).with_name("contain.py")
WORKDIR = "/app"  # the image's


class LocalPod:
    """Replica `ordinal` of a rendered StatefulSet (or index `ordinal` of a rendered
    Job), run as local processes."""

    def __init__(self, manifests: list[dict], root: Path, image_root: Path, ordinal: int = 0,
                 data: Path | None = None):
        config = manifests[0]
        workload = next(m for m in manifests if m["kind"] in ("StatefulSet", "Job"))
        self.default_container = workload["spec"]["template"]["metadata"]["annotations"][
            "kubectl.kubernetes.io/default-container"]
        self.name = f"{workload['metadata']['name']}-{ordinal}" + \
            ("-x7k2p" if workload["kind"] == "Job" else "")  # (a Job's pods: a random tail)
        self.ordinal, self.root, self.image_root = ordinal, root, image_root
        self.pod = workload["spec"]["template"]["spec"]
        self.volumes = {v["name"]: self._volume(v, config) for v in self.pod["volumes"]}
        for claim in workload["spec"].get("volumeClaimTemplates", []):
            self.volumes[claim["metadata"]["name"]] = self._dir(f"pvc/{claim['metadata']['name']}")
        if data is not None and "data" in self.volumes:  # the data volume: a folder here
            self.volumes["data"] = data
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}  # by container: how often it was started

    def _dir(self, relative: str) -> Path:
        path = self.root / relative
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _volume(self, volume: dict, config: dict) -> Path:
        if "configMap" in volume:
            assert volume["configMap"]["name"] == config["metadata"]["name"]
            path = self._dir(f"configmap/{volume['name']}")
            for key, text in config["data"].items():
                (path / key).write_text(text)
            return path
        if "hostPath" in volume:
            return self._dir("host" + volume["hostPath"]["path"])
        if "persistentVolumeClaim" in volume:
            return self._dir(f"pvc/{volume['persistentVolumeClaim']['claimName']}")
        if "ephemeral" in volume:  # a claim made for the pod, gone with it
            return self._dir(f"ephemeral/{volume['name']}")
        assert "emptyDir" in volume, volume
        return self._dir(f"emptydir/{volume['name']}")

    def host_path(self, container: dict, path: str) -> str:
        """Where a path the container sees lives on this machine (its mounts, else the
        image's /app): for the test to read what the container wrote."""
        mounts = {m["mountPath"]: self.volumes[m["name"]] for m in container["volumeMounts"]}
        mounts.setdefault(WORKDIR, self.image_root)
        for mount in sorted(mounts, key=len, reverse=True):
            if path == mount or path.startswith(mount.rstrip("/") + "/"):
                return str(mounts[mount]) + path[len(mount):]
        return path

    def env(self, container: dict) -> dict[str, str]:
        """The container's env as the kubelet fills it in, and a PATH on which
        `podpipe` is the one installed here (the image's)."""
        fields = {"metadata.name": self.name,
                  "metadata.labels['apps.kubernetes.io/pod-index']": str(self.ordinal),
                  "metadata.annotations['batch.kubernetes.io/job-completion-index']":
                      str(self.ordinal)}
        env: dict[str, str] = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = self._expand(item["value"], env)
            else:
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        return env

    @staticmethod
    def _expand(text: str, env: dict[str, str]) -> str:
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: env.get(m.group(1), m.group(0)), text)

    def argv(self, container: dict, command: list[str]) -> list[str]:
        """The command, `$(VAR)`s expanded from the container's env (as the kubelet does)."""
        env = self.env(container)
        return [self._expand(arg, env) for arg in command]

    def start(self, container: dict) -> subprocess.Popen:
        """Start the container: its command in a mount namespace of its own whose root
        is read-only, with the pod's volumes where it mounts them (`contain.py`)."""
        name = container["name"]
        self.starts[name] = self.starts.get(name, 0) + 1
        mounts = [[m["mountPath"], str(self.volumes[m["name"]]), m.get("readOnly", False)]
                  for m in container["volumeMounts"]]
        config = {"root": str(self.root / "containers" / f"{name}-{self.starts[name]}"),
                  "mounts": [[WORKDIR, str(self.image_root), True], *mounts],
                  "workdir": container["workingDir"], "env": self.env(container),
                  "argv": self.argv(container, container["command"] + container.get("args", []))}
        with open(self.root / f"{name}.log", "ab") as log:
            process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                 str(CONTAIN), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def exec(self, container: str, argv: list[str], timeout: float = 120
             ) -> subprocess.CompletedProcess:
        """`kubectl exec POD -c CONTAINER -- ARGV`: a command in the running container
        (its mounts, root and working directory), with its env."""
        spec = next(c for c in self.pod["containers"] + self.pod.get("initContainers", [])
                    if c["name"] == container)
        process = self.processes[container]
        assert process.poll() is None, f"{container} is not running"
        return subprocess.run(["nsenter", "--target", str(process.pid), "--mount", "--root",
                               "--wd", "--", *argv], env=self.env(spec),
                              capture_output=True, text=True, timeout=timeout)

    def probe(self, container: dict, timeout: float = 60) -> None:
        """Run the startup probe the way the kubelet does until it passes."""
        probe = container["startupProbe"]
        argv = self.argv(container, probe["exec"]["command"])
        deadline = time.monotonic() + timeout
        while self.exec(container["name"], argv, probe["timeoutSeconds"] * 10).returncode != 0:
            assert self.processes[container["name"]].poll() is None, self.log(container["name"])
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(probe["periodSeconds"])

    def run(self) -> None:
        for container in self.pod.get("initContainers", []):
            assert container.get("restartPolicy") == "Always"  # only native sidecars here
            self.start(container)
            if "startupProbe" in container:
                self.probe(container)
        for container in self.pod["containers"]:
            self.start(container)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def terminate(self, timeout: float = 15) -> dict[str, int | None]:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in self.processes.items():
            try:
                codes[name] = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = None
        return codes


def _children(pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and \
                    int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_for(run_dir: Path, pod: LocalPod, timeout: float = 120,
             restart: bool = False) -> dict:
    """The run's final status; with `restart`, containers that exit are started again
    (restartPolicy Always), else one that fails fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads((run_dir / "status.json").read_text())
        except (OSError, ValueError):
            status = {"state": "starting"}
        if status["state"] not in ("starting", "running"):
            return status
        for name, process in list(pod.processes.items()):
            if restart and process.poll() is not None:
                pod.start(next(c for c in pod.pod["containers"] + pod.pod["initContainers"]
                               if c["name"] == name))
                continue
            assert process.poll() is None or process.returncode == 0, \
                f"container {name} exited {process.returncode}:\n{pod.log(name)}"
        time.sleep(0.2)
    raise AssertionError(f"the pod did not finish in {timeout} s; its conductor's log:\n"
                         + pod.log("podpipe-conductor")[-3000:])


def rendered_pod(tmp_path: Path, image_root: Path, *flags: str, ordinal: int = 0,
                 example: Path = EXAMPLE) -> tuple[LocalPod, Path]:
    """Replica `ordinal` of the example rendered with `flags` (its source: the image's
    data), and the run directory it will have on the node tier."""
    done = podpipe("render", str(example), "--set", "source.uri=data/*.parquet",
                   "--data-claim", "lake", *flags, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    pod = LocalPod(list(yaml.safe_load_all(done.stdout)), tmp_path / f"pod{ordinal}",
                   image_root, ordinal, data=image_root)
    return pod, pod.volumes["node"] / "runs" / pod.name


@pytest.fixture
def image_root(tmp_path: Path, lineitem: Path) -> Path:
    """The image's WORKDIR: the user's code (the example); here also the data volume
    (`--data-claim`), which the source reads and the sink writes."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "examples").symlink_to(ROOT / "examples")  # (the machine's root: in the image)
    shutil.copytree(lineitem, app / "data")  # (a link to /tmp would not be in the pod)
    return app


@pytest.mark.parametrize("flags", [("--flavor", "openkruise"), ("--layout", "processes")],
                         ids=["containers", "processes"])
def test_the_rendered_pod_runs_the_example_to_the_right_answer(tmp_path, image_root, flags):
    from examples.tpch import data

    pod, run_dir = rendered_pod(tmp_path, image_root, *flags,
                                "--set", "source.batchRows=15000")
    try:
        pod.run()
        status = wait_for(run_dir, pod)
        assert status["state"] == "succeeded", status.get("error")
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
        # (the run directory as the pod sees it: on the node tier's volume)
        assert status["pipeline"] == "tpch-q1" and \
            status["run_dir"] == "/var/lib/podpipe/runs/tpch-q1-0"
        assert all(s["batches_done"] == s["batches_total"] for s in status["stages"].values())
        # A finished pod stays up: every container holds, none exits (and restarts).
        deadline = time.monotonic() + 60
        while not all("holding until SIGTERM" in pod.log(c["name"])
                      for c in pod.pod["containers"] + pod.pod.get("initContainers", [])):
            assert time.monotonic() < deadline, "the containers never held"
            time.sleep(0.05)
        assert {n: p.poll() for n, p in pod.processes.items()} == \
            {n: None for n in pod.processes}
    finally:
        codes = pod.terminate()
    assert codes == {name: 0 for name in codes}, codes
    assert [p.name for p in pod.volumes["scratch"].iterdir()] == []  # nothing left in RAM


def test_the_readmes_first_pipeline_as_written_runs_from_a_host_path(tmp_path, lineitem):
    """examples/tpch/q1.yaml unchanged (relative paths: `data/…` in, `out/…` out),
    rendered with `--data-host-path`: its paths resolve on the node's folder, where the
    data is and the answer lands; nothing else in the pod is writable by a stage."""
    from examples.tpch import data

    done = podpipe("render", str(EXAMPLE), "--data-host-path", "/srv/lake", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    app = tmp_path / "app"
    app.mkdir()
    (app / "examples").symlink_to(ROOT / "examples")
    pod = LocalPod(list(yaml.safe_load_all(done.stdout)), tmp_path / "pod0", app)
    lake = pod.volumes["data"]
    assert lake == tmp_path / "pod0" / "host" / "srv" / "lake"
    shutil.copytree(lineitem, lake / "data" / "tpch-sf0.1" / "lineitem")
    try:
        pod.run()
        status = wait_for(pod.volumes["node"] / "runs" / pod.name, pod)
        assert status["state"] == "succeeded", status.get("error")
        assert data.compare(pq.read_table(lake / "out" / "tpch-q1"), SF) == []
        for where in ("/app/x", "/data/x", "/etc/x"):  # the image, and a volume read-only
            touched = pod.exec("prices", ["touch", where])
            assert touched.returncode != 0 and "Read-only file system" in touched.stderr
        assert pod.exec("sink-0", ["touch", "/data/x"]).returncode == 0  # the sink writes
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes


def test_a_restarted_conductor_of_a_finished_pod_holds_instead_of_rerunning(tmp_path,
                                                                             image_root):
    pod, run_dir = rendered_pod(tmp_path, image_root)
    try:
        pod.run()
        assert wait_for(run_dir, pod)["state"] == "succeeded"
        sidecar = pod.pod["initContainers"][0]
        old = pod.processes.pop(sidecar["name"])
        old.send_signal(signal.SIGTERM)
        assert old.wait(10) == 0
        finished = (run_dir / "status.json").stat().st_mtime_ns
        pod.start(sidecar)  # the kubelet restarts it
        pod.probe(sidecar)
        assert (run_dir / "status.json").stat().st_mtime_ns == finished
        assert "holds a" not in pod.log(sidecar["name"])
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes


def _prices_dying_once(tmp_path: Path, image_root: Path, *flags: str) -> tuple[LocalPod, Path]:
    """The example rendered with `flags`, its `prices` process dying once on its third
    batch (`pystages._die_once`)."""
    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    return rendered_pod(tmp_path, image_root, "--set", "source.batchRows=5000",
                        "--set", 'stages.prices.env.DIE_ON_CALL="3"',
                        # (on the node tier: the data volume is read-only to a stage)
                        "--set", "stages.prices.env.DIE_MARKER=/var/lib/podpipe/died-once",
                        "--set", "stages.prices.run=pystages:q1_prices_dying_once", *flags)


def test_a_stage_container_that_dies_is_restarted_and_the_run_still_gets_it_right(tmp_path,
                                                                                 image_root):
    """The kubelet restarts a container that dies; the conductor notices the closed
    connection, requeues the batch it had in flight, and takes the new one's hello."""
    from examples.tpch import data

    pod, run_dir = _prices_dying_once(tmp_path, image_root)
    try:
        pod.run()
        status = wait_for(run_dir, pod, restart=True)
        assert status["state"] == "succeeded", status.get("error")
        assert (pod.volumes["node"] / "died-once").exists()
        assert status["stages"]["prices"]["restarts"] == 1
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
    finally:
        pod.terminate()


def test_a_container_runs_its_stages_workers_and_restarts_one_that_dies(tmp_path, image_root):
    """`workers: 2` in a container: two agent processes in it, each its own worker to
    the conductor; the one that dies is started again by the container's process
    (not the kubelet) and only its batch is done again."""
    from examples.tpch import data

    pod, run_dir = _prices_dying_once(tmp_path, image_root, "--set", "stages.prices.workers=2")
    try:
        pod.run()
        status = wait_for(run_dir, pod)  # no container exits: nothing for a kubelet to do
        assert status["state"] == "succeeded", status.get("error")
        assert (pod.volumes["node"] / "died-once").exists()
        prices = status["stages"]["prices"]
        assert prices["workers"] == 2 and prices["restarts"] == 1
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
        container = pod.processes["prices"].pid  # its two workers, the restarted one too
        deadline = time.monotonic() + 30         # (started again after its backoff)
        while len(_children(container)) != 2:
            assert time.monotonic() < deadline, _children(container)
            time.sleep(0.05)
    finally:
        codes = pod.terminate()
    assert codes["prices"] == 0, pod.log("prices")


def test_a_conductor_container_killed_mid_run_resumes_from_the_pods_memory(tmp_path,
                                                                          image_root):
    from examples.tpch import data

    # the reduce waits for the gate (on the data volume, which the pod sees as /data):
    # the run cannot end before the kill
    gate = image_root / "gate"
    pod, run_dir = rendered_pod(tmp_path, image_root, "--set", "source.batchRows=500",
                                "--set", "stages.total.run=pystages:q1_total_gated",
                                "--set", "stages.total.env.GATE=/data/gate")  # 120 batches
    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    try:
        pod.run()
        deadline = time.monotonic() + 60
        while True:
            try:
                progress = json.loads((run_dir / "status.json").read_text())
            except (OSError, ValueError):
                progress = {}
            if progress.get("stages", {}).get("partial", {}).get("batches_done", 0) >= 5:
                break
            assert time.monotonic() < deadline, "five batches never got through partial"
            time.sleep(0.02)
        pod.processes["podpipe-conductor"].kill()  # the kubelet will restart it
        pod.processes["podpipe-conductor"].wait()
        assert json.loads((run_dir / "status.json").read_text())["state"] == "running"
        gate.touch()
        status = wait_for(run_dir, pod, restart=True)
        assert status["state"] == "succeeded", status.get("error")
        restored = status["stages"]["partial"]["restored"]
        assert restored["ram"] + restored["node"] >= 5, (status, pod.log("podpipe-conductor"))
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
    finally:
        pod.terminate()


def test_a_second_replica_owns_no_shard_of_a_one_shard_pipeline_and_idles(tmp_path,
                                                                         image_root):
    pod, _ = rendered_pod(tmp_path, image_root, "--replicas", "2", ordinal=1)
    try:
        pod.run()  # the startup probe passes: the pod is up
        deadline = time.monotonic() + 60
        while not all("holding until SIGTERM" in pod.log(c["name"])
                      for c in pod.pod["containers"]):
            assert time.monotonic() < deadline, "the agents were never told to stop"
            time.sleep(0.2)
        assert {n: p.poll() for n, p in pod.processes.items()} == \
            {n: None for n in pod.processes}
        assert "pod index 1 owns no shard" in pod.log("podpipe-conductor")
        assert not list(image_root.glob("out/**/*.parquet"))
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes


def test_two_rendered_replicas_share_the_shards_and_pod_0_combines_them(tmp_path, image_root):
    """Both replicas of the sharded example, each as the kubelet would run it: each
    takes its ordinal from POD_INDEX, runs its shards, and pod 0's global reduce
    reads pod 1's shards from the durable tier."""
    from examples.tpch import data

    flags = ("--replicas", "2", "--layout", "processes", "--set", "source.batchRows=5000",
             "--set", "checkpoints.durable=store")  # on the data volume, both pods'
    pods = [rendered_pod(tmp_path, image_root, *flags, ordinal=i,
                         example=ROOT / "examples" / "tpch" / "q1-sharded.yaml")
            for i in (0, 1)]
    try:
        for pod, _ in pods:
            pod.run()
        statuses = [wait_for(run_dir, pod) for pod, run_dir in pods]
        assert [s["state"] for s in statuses] == ["succeeded", "succeeded"], \
            [s.get("error") for s in statuses]
        assert [s["pod"]["shards"] for s in statuses] == [[0, 2, 4, 6], [1, 3, 5, 7]]
        assert [s["stages"]["total"]["batches_done"] for s in statuses] == [1, 0]
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1-sharded"), SF) == []
    finally:
        codes = [pod.terminate() for pod, _ in pods]
    assert all(set(c.values()) == {0} for c in codes), codes


def test_a_stage_containers_startup_probe_passes_once_its_agent_is_the_conductors(
        tmp_path, image_root):
    """Only the conductor had a probe: a stage container counted as started before its
    agent had reached the conductor."""
    pod, _ = rendered_pod(tmp_path, image_root, "--set", "source.batchRows=15000")
    sidecar = pod.pod["initContainers"][0]
    source = next(c for c in pod.pod["containers"] if c["name"] == "source")
    assert sidecar["livenessProbe"]["exec"]["command"] == sidecar["startupProbe"]["exec"][
        "command"]
    probe = source["startupProbe"]["exec"]["command"]
    assert probe[-2:] == ["--agent", "source"]
    argv = pod.argv(source, probe)
    try:
        pod.start(sidecar)
        pod.probe(sidecar)
        waiting = pod.exec(sidecar["name"], argv)  # (the source's is not up: it sees
        #                                               the same socket, a volume of both)
        assert waiting.returncode == 1  # the conductor is up, the source's agent is not
        pod.start(source)
        pod.probe(source)  # passes once it has connected
    finally:
        pod.terminate()


def kubectl(pods: dict[str, LocalPod], command: str) -> subprocess.CompletedProcess:
    """Run one `kubectl exec POD [-c C] -- ARGV` line as printed by podpipe, on the
    emulated pod it names (its default container unless -c)."""
    argv = shlex.split(command)
    assert argv[:2] == ["kubectl", "exec"], argv
    split = argv.index("--")
    flags, target = argv[2:split], argv[split + 1:]
    container = flags[flags.index("-c") + 1] if "-c" in flags else None
    pod = pods[next(f for f in flags if not f.startswith("-") and f != container)]
    return pod.exec(container or pod.default_container, target)


def _line_up(pod: LocalPod, line: str, timeout: float = 120) -> Path:
    """The pod's line folder once its line says it is up (its processes warm)."""
    home = pod.volumes["node"] / pod.name / "lines" / line
    deadline = time.monotonic() + timeout
    while True:
        try:
            if json.loads((home / "line.json").read_text())["state"] == "up":
                return home
        except (OSError, ValueError):
            pass
        for name, process in pod.processes.items():
            assert process.poll() is None, f"{name} exited:\n{pod.log(name)}"
        assert time.monotonic() < deadline, pod.log("podpipe-conductor")[-3000:]
        time.sleep(0.1)


def test_a_standing_rendered_pod_takes_two_jobs_and_a_swap_between_them(tmp_path,
                                                                         image_root):
    """`render --standing`: the pod runs nothing until jobs come, through the commands
    `submit --k8s` prints (kubectl exec into the pod), each job a run directory on the
    pod's node tier with the right answer; a swap between them holds for the second;
    the stage containers stay up, warm, across both."""
    from examples.tpch import data

    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    pod, _ = rendered_pod(tmp_path, image_root, "--standing", "--set", "source.batchRows=15000")
    assert "--standing" in pod.pod["initContainers"][0]["args"]
    pods = {pod.name: pod}
    try:
        pod.run()
        home = _line_up(pod, "tpch-q1")
        warm = {name: p.pid for name, p in pod.processes.items()}
        answers = []
        for n in (1, 2):
            printed = podpipe("submit", "tpch-q1", "--k8s", "--wait",
                              "--set", f"sinks.0.uri=out/job{n}/", cwd=ROOT)
            assert printed.returncode == 0, printed.stderr
            commands = printed.stdout.splitlines()
            assert len(commands) == 1 and commands[0].startswith("kubectl exec tpch-q1-0 ")
            done = kubectl(pods, commands[0])
            assert done.returncode == 0, (done.stdout, done.stderr,
                                          pod.log("podpipe-conductor")[-3000:])
            run_dir = Path(pod.host_path(pod.pod["initContainers"][0], re.search(
                r"run directory: (\S+)", done.stdout).group(1)))
            answers.append(json.loads((run_dir / "status.json").read_text()))
            if n == 1:
                swapped = kubectl(pods, f"kubectl exec {pod.name} -- podpipe swap tpch-q1 "
                                        "prices --run pystages:q1_prices_v2")
                assert swapped.returncode == 0, swapped.stderr
                assert "from the line's next job on" in " ".join(swapped.stdout.split())
        for n, status in zip((1, 2), answers):
            assert status["state"] == "succeeded", status.get("error")
            assert data.compare(pq.read_table(image_root / "out" / f"job{n}"), SF) == []
        assert answers[0]["stages"]["prices"]["version"] != \
            answers[1]["stages"]["prices"]["version"]
        assert {name: p.pid for name, p in pod.processes.items()} == warm  # none restarted
        assert all(p.poll() is None for p in pod.processes.values())
        record = json.loads((home / "line.json").read_text())
        assert record["jobs"]["done"] == 2 and record["state"] == "up"
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes
    assert [p.name for p in pod.volumes["scratch"].iterdir()] == []  # nothing left in RAM


def test_a_standing_rendered_pod_with_jobs_2_starts_the_next_job_on_the_stations_it_passed(
        tmp_path, image_root):
    """`jobs: 2` in a pod of containers: the first job held at its reduce (a gate on
    the pod's node tier), the second job's per-batch stations — the same containers,
    told of it — take every batch meanwhile; both answers right, no container
    restarted."""
    from examples.tpch import data

    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    pod, _ = rendered_pod(tmp_path, image_root, "--standing", "--set", "jobs=2", "--set",
                          "source.batchRows=15000", "--set",
                          "stages.total.run=pystages:q1_total_gated")
    pods = {pod.name: pod}
    (pod.volumes["node"] / "open").touch()
    try:
        pod.run()
        _line_up(pod, "tpch-q1")
        warm = {name: p.pid for name, p in pod.processes.items()}
        run_dirs = []
        for n, gate in ((1, "gate-1"), (2, "open")):
            printed = podpipe("submit", "tpch-q1", "--k8s", "--set", f"sinks.0.uri=out/job{n}/",
                              "--set", f"stages.total.env.GATE=/var/lib/podpipe/{gate}",
                              cwd=ROOT)
            assert printed.returncode == 0, printed.stderr
            done = kubectl(pods, printed.stdout.splitlines()[0])
            assert done.returncode == 0, (done.stdout, done.stderr)
            run_dirs.append(Path(pod.host_path(pod.pod["initContainers"][0], re.search(
                r"run directory: (\S+)", done.stdout).group(1))))

        def status(n: int) -> dict:
            try:
                return json.loads((run_dirs[n] / "status.json").read_text())
            except (OSError, ValueError):
                return {}
        def partial_done() -> bool:
            partial = status(1).get("stages", {}).get("partial", {})
            return partial.get("batches_done", 0) == partial.get("batches_total", -1)
        deadline = time.monotonic() + 120
        while not partial_done():
            assert time.monotonic() < deadline, pod.log("podpipe-conductor")[-3000:]
            time.sleep(0.1)
        assert status(0)["state"] == "running"  # (held at its reduce)
        (pod.volumes["node"] / "gate-1").touch()
        while {status(0).get("state"), status(1).get("state")} != {"succeeded"}:
            assert time.monotonic() < deadline, (status(0).get("error"), status(1).get("error"))
            time.sleep(0.1)
        for n in (1, 2):
            assert data.compare(pq.read_table(image_root / "out" / f"job{n}"), SF) == []
        assert {name: p.pid for name, p in pod.processes.items()} == warm  # none restarted
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes
    assert [p.name for p in pod.volumes["scratch"].iterdir()] == []  # nothing left in RAM


def test_one_job_submitted_to_every_pod_of_a_standing_line_runs_each_pods_shards(
        tmp_path, image_root):
    """Two standing replicas of the sharded example: `submit --k8s --replicas 2` prints
    one command per pod with one job id; each pod's job runs its shards, and pod 0's
    global reduce reads pod 1's from the durable tier."""
    from examples.tpch import data

    flags = ("--standing", "--replicas", "2", "--layout", "processes",
             "--set", "source.batchRows=5000", "--set", "checkpoints.durable=store")
    pods = {}
    for i in (0, 1):
        pod, _ = rendered_pod(tmp_path, image_root, *flags, ordinal=i,
                              example=ROOT / "examples" / "tpch" / "q1-sharded.yaml")
        pods[pod.name] = pod
    try:
        for pod in pods.values():
            pod.run()
        for pod in pods.values():
            _line_up(pod, "tpch-q1-sharded")
        printed = podpipe("submit", "tpch-q1-sharded", "--k8s", "--replicas", "2", "--wait",
                          "--job", "hourly-0001", cwd=ROOT)
        assert printed.returncode == 0, printed.stderr
        commands = printed.stdout.splitlines()
        assert [c.split()[2] for c in commands] == ["tpch-q1-sharded-0", "tpch-q1-sharded-1"]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(2) as pool:  # (pod 0's reduce waits for pod 1's shards)
            done = list(pool.map(lambda c: kubectl(pods, c), commands))
        assert [d.returncode for d in done] == [0, 0], [d.stderr for d in done]
        statuses = [json.loads((pod.volumes["node"] / pod.name / "runs" / "hourly-0001" /
                                "status.json").read_text()) for pod in pods.values()]
        assert [s["pod"]["shards"] for s in statuses] == [[0, 2, 4, 6], [1, 3, 5, 7]]
        assert [s["stages"]["total"]["batches_done"] for s in statuses] == [1, 0]
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1-sharded"), SF) == []
    finally:
        codes = [pod.terminate() for pod in pods.values()]
    assert all(set(c.values()) == {0} for c in codes), codes


def _job_pod(tmp_path: Path, image_root: Path, *flags: str) -> dict[str, int | None]:
    """Run index 0 of the example rendered as a Job, as the kubelet would a pod whose
    restartPolicy is Never: wait for every main container to exit, then end the
    sidecar (SIGTERM); every container's exit code."""
    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    pod, _ = rendered_pod(tmp_path, image_root, "--flavor", "job",
                          "--set", "source.batchRows=15000", *flags)
    assert pod.pod["restartPolicy"] == "Never"
    try:
        pod.run()
        deadline = time.monotonic() + 120
        while any(pod.processes[c["name"]].poll() is None for c in pod.pod["containers"]):
            assert time.monotonic() < deadline, {n: p.poll() for n, p in pod.processes.items()}
            time.sleep(0.1)
    finally:
        codes = pod.terminate()  # (the sidecar: the kubelet ends it once the others are)
    return codes


def _pod_failure(manifests_flags: tuple[str, ...], codes: dict[str, int | None]) -> str:
    """What the Job's podFailurePolicy does with a failed pod that exited with `codes`:
    the first rule whose exit codes one container's code is in, else Count."""
    done = podpipe("render", str(EXAMPLE), "--flavor", "job", "--data-claim", "lake",
                   *manifests_flags, cwd=ROOT)
    job = list(yaml.safe_load_all(done.stdout))[-1]
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        exits = rule.get("onExitCodes")
        if exits and any(code in exits["values"] for code in codes.values()):
            return rule["action"]
    return "Count"


LAYOUTS = pytest.mark.parametrize("layout", ["containers", "processes"])


@LAYOUTS
def test_a_job_flavour_pod_completes_when_its_run_succeeds(tmp_path, image_root, layout):
    from examples.tpch import data

    codes = _job_pod(tmp_path, image_root, "--layout", layout)
    assert set(codes.values()) == {0}, codes  # every container: the pod Succeeded
    assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []


@LAYOUTS
def test_a_job_flavour_pod_fails_with_its_run_and_the_job_is_not_retried(tmp_path,
                                                                         image_root, layout):
    flags = ("--set", "stages.prices.run=pystages:q1_prices_broken", "--layout", layout)
    codes = _job_pod(tmp_path, image_root, *flags)
    assert set(codes.values()) == {1}, codes  # every container ends with the run
    assert _pod_failure(flags, codes) == "FailJob"
    assert not (image_root / "out" / "tpch-q1").exists()


def _gated_pod(tmp_path: Path, image_root: Path) -> tuple[LocalPod, Path]:
    """The example in 123 batches, its prices stage waiting in its fifth batch for the
    gate /data/gate (the test opens it as image_root / "gate"): the run cannot end
    before the test says, and prices has batches left when its image is updated."""
    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    return rendered_pod(tmp_path, image_root, "--set", "source.batchRows=500",
                        "--set", "stages.prices.run=pystages:q1_prices_held_at_five",
                        "--set", "stages.prices.env.PRICES_GATE=/data/gate")


def _status_until(run_dir: Path, pod: LocalPod, what: str, test) -> dict:
    deadline = time.monotonic() + 90
    while True:
        try:
            current = json.loads((run_dir / "status.json").read_text())
            if test(current):
                return current
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"never: {what}\n" + \
            pod.log("podpipe-conductor")[-3000:]
        time.sleep(0.05)


def _update_in_place(pod: LocalPod, name: str, run: str) -> None:
    """What an in-place image update does to one container (OpenKruise): the
    container ends (SIGTERM) and starts again, in the same pod, with the new image —
    here, its code: the stage's `run` in the new image's spec."""
    spec = next(c for c in pod.pod["containers"] if c["name"] == name)
    args = list(spec["args"])
    at = args.index(next(a for a in args if a.startswith(f"stages.{name}.run=")))
    args[at] = f"stages.{name}.run={run}"
    spec["args"] = args
    process = pod.processes[name]
    process.send_signal(signal.SIGTERM)
    process.wait(15)
    pod.start(spec)


def test_a_broken_image_updated_in_place_is_held_and_swapped_back(tmp_path, image_root):
    """In a pod of containers a swap is an image updated in place: the conductor sees
    the container come back with another version. One that fails holds the stage
    (the run waits, it does not fail) until the image is put back, then the run goes
    on to the right answer."""
    from examples.tpch import data

    pod, run_dir = _gated_pod(tmp_path, image_root)
    try:
        pod.run()
        _status_until(run_dir, pod, "four batches through prices",
                      lambda s: s["stages"]["prices"]["batches_done"] >= 4)
        _update_in_place(pod, "prices", "pystages:q1_prices_broken")
        held = _status_until(run_dir, pod, "prices held", lambda s: s["stages"]["prices"]["held"])
        assert "a bug in prices" in held["stages"]["prices"]["held"]
        assert held["state"] == "running"
        (image_root / "gate").touch()
        _update_in_place(pod, "prices", "pystages:q1_prices_held_at_five")  # swapped back
        status = wait_for(run_dir, pod, restart=True)
        assert status["state"] == "succeeded", status.get("error")
        assert status["stages"]["prices"]["held"] is None
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
    finally:
        pod.terminate()


def test_a_swap_with_recompute_through_the_pod_redoes_the_old_versions_batches(
        tmp_path, image_root):
    """`podpipe swap RUN STAGE --image IMG --recompute` inside the pod: the conductor
    awaits the new image; when the container comes back with it, what the old
    version made is done again, so every batch's output is the new version's."""
    from examples.tpch import data

    pod, run_dir = _gated_pod(tmp_path, image_root)
    try:
        pod.run()
        before = _status_until(run_dir, pod, "four batches through prices",
                               lambda s: s["stages"]["prices"]["batches_done"] >= 4)
        old = before["stages"]["prices"]["version"]
        swapped = kubectl({pod.name: pod}, f"kubectl exec {pod.name} -- podpipe swap "
                                           "/var/lib/podpipe/runs/tpch-q1-0 prices "
                                           "--image registry/tpch:2 --recompute")
        assert swapped.returncode == 0, swapped.stderr
        said = " ".join(swapped.stdout.split())
        assert "takes its new version when its container comes back" in said
        assert "what the old version made is done again" in said
        _update_in_place(pod, "prices", "pystages:q1_prices_v2")  # (no gate: it goes on)
        status = wait_for(run_dir, pod, restart=True)
        assert status["state"] == "succeeded", status.get("error")
        prices = status["stages"]["prices"]
        # (versions: the batches each version made) the new one made every batch again
        assert prices["version"] != old and set(prices["versions"]) == {old, prices["version"]}
        assert prices["versions"][prices["version"]] == prices["batches_total"]
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
    finally:
        pod.terminate()


def test_a_workers_auto_container_grows_its_workers_as_the_conductor_asks(tmp_path,
                                                                          image_root):
    """`workers: auto` in a container: it starts one worker; the conductor, judging the
    node by what its tasks say they wanted of a core (it cannot see the container's
    processes), asks the container for more, which forks them inside it (up to its
    CPU limit's worth); the run's answer is right and every worker was the node's."""
    from examples.tpch import data

    (image_root / "pystages.py").symlink_to(ROOT / "tests" / "stages" / "pystages.py")
    pod, run_dir = rendered_pod(tmp_path, image_root, "--set", "source.batchRows=1000",
                                "--set", "cpus=2",
                                "--set", "stages.prices.run=pystages:q1_prices_spinning",
                                "--set", 'stages.prices.env.SLOW_SECONDS="0.05"')
    prices = next(c for c in pod.pod["containers"] if c["name"] == "prices")
    assert prices["args"][prices["args"].index("--workers") + 1] == "auto"
    assert prices["resources"]["limits"] == {"cpu": "2"}
    try:
        pod.run()
        grown = _status_until(run_dir, pod, "prices to have a second worker",
                              lambda s: s["stages"]["prices"]["workers"] >= 2)
        assert grown["state"] == "running"
        assert len(_children(pod.processes["prices"].pid)) >= 2  # inside its container
        status = wait_for(run_dir, pod)
        assert status["state"] == "succeeded", status.get("error")
        assert status["stages"]["prices"]["restarts"] == 0
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
    finally:
        codes = pod.terminate()
    assert set(codes.values()) == {0}, codes


def test_a_candidate_added_to_the_running_pod_as_a_container_compares_batches(
        tmp_path, image_root):
    """`podpipe shadow RUN STAGE --image IMG` inside the pod: the conductor awaits the
    candidate; the container `render --shadow` prints (an ephemeral container of the
    stage's mounts), started as the kubelet would, connects over the pod's memory
    volume and compares the stage's batches; the run's answer is the live version's."""
    from examples.tpch import data

    for module in ("pystages.py", "candidates.py"):
        (image_root / module).symlink_to(ROOT / "tests" / "stages" / module)
    flags = ("--set", "source.batchRows=500",
             "--set", "stages.prices.run=candidates:q1_prices_held_twice",
             "--set", "stages.prices.env.PRICES_GATE=/data/gate",
             "--set", "stages.prices.env.PRICES_GATE2=/data/gate2")
    pod, run_dir = rendered_pod(tmp_path, image_root, *flags)
    done = podpipe("render", str(EXAMPLE), "--set", "source.uri=data/*.parquet",
                   "--data-claim", "lake", *flags, "--shadow", "prices=registry/tpch:2",
                   cwd=ROOT)
    assert done.returncode == 0, done.stderr
    [candidate] = json.loads(done.stdout)["spec"]["ephemeralContainers"]
    # the new image's code, here: its args name the candidate's `run`
    candidate["args"] = [f"stages.prices.run=pystages:q1_prices_v2"
                         if a.startswith("stages.prices.run=") else a
                         for a in candidate["args"]]
    try:
        pod.run()
        _status_until(run_dir, pod, "four batches through prices",
                      lambda s: s["stages"]["prices"]["batches_done"] >= 4)
        asked = kubectl({pod.name: pod}, f"kubectl exec {pod.name} -- podpipe shadow "
                                         "/var/lib/podpipe/runs/tpch-q1-0 prices "
                                         "--image registry/tpch:2")
        assert asked.returncode == 0, asked.stderr
        assert "awaits the candidate's container" in " ".join(asked.stdout.split())
        pod.start(candidate)  # kubectl patch pod … --subresource ephemeralcontainers
        _status_until(run_dir, pod, "the candidate up", lambda s: (
            s["stages"]["prices"].get("shadow") or {}).get("state") == "running")
        # batch 5 ends, batch 6 (handed out once the candidate was up) is made and
        # offered to it, batch 7 waits: the candidate has the cores
        (image_root / "gate").touch()
        shadow = _status_until(run_dir, pod, "a batch compared", lambda s: (
            s["stages"]["prices"]["shadow"]["compared"] >= 1))["stages"]["prices"]["shadow"]
        assert shadow["equal"] == shadow["compared"] and shadow["version"].startswith("src-")
        (image_root / "gate2").touch()
        status = wait_for(run_dir, pod)
        assert status["state"] == "succeeded", status.get("error")
        final = status["stages"]["prices"]["shadow"]
        assert final["state"] == "stopped" and final["differing"] == final["failed"] == 0
        assert data.compare(pq.read_table(image_root / "out" / "tpch-q1"), SF) == []
        pod.processes[candidate["name"]].wait(30)  # it ends with the run
    finally:
        pod.terminate()
