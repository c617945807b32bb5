"""A standing line: `podpipe up`, jobs submitted one after another, `down`.

Real processes throughout: the line is the detached process `podpipe up` starts,
jobs come through its socket from `podpipe submit` processes, and every job's sink
is compared byte for byte with a `podpipe run` of the same spec.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli_env, make_numbers, podpipe, spec, wait_until, write_spec


def _spec(workdir: Path, double: str = "pystages:double") -> Path:
    make_numbers(workdir / "data")  # 2 files of 5,000 rows: 10 batches of 1,000
    return write_spec(workdir / "p.yaml", spec(
        [{"name": "check", "run": "pystages:fail_while_marked", "inputs": ["source"]},
         {"name": "double", "run": double, "inputs": ["check"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["double"]}],
        [{"name": "doubled", "input": "double", "uri": "out/doubled/"},
         {"name": "summed", "input": "total", "uri": "out/summed/"}]))


def _sinks(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("part-*.parquet"))}


def _to(name: str) -> list[str]:
    """A job's --set: its sinks under out/NAME/."""
    return ["--set", f"sinks.doubled.uri=out/{name}/doubled/",
            "--set", f"sinks.summed.uri=out/{name}/summed/"]


def _line(workdir: Path, name: str = "t") -> dict:
    """The line as `podpipe status LINE --json` shows it."""
    shown = podpipe("status", name, "--json", cwd=workdir)
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in \
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def line(tmp_path: Path):
    """A line `t` up in tmp_path over `_spec` (FAIL_MARKER: a file the test makes to
    fail batch 2's check); downed (if still up) and checked for leftovers after."""
    _spec(tmp_path)
    env = {"FAIL_MARKER": str(tmp_path / "fail")}
    done = podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path, **env)
    assert done.returncode == 0, done.stderr
    assert "line t is up" in done.stdout
    record = _line(tmp_path)
    pids = [record["pid"], *record["processes"].values()]
    yield tmp_path, env
    if _line(tmp_path)["state"] == "up":
        podpipe("down", "t", cwd=tmp_path)
    for pid in pids:  # nothing of the line's outlives it
        wait_until(lambda: not _alive(pid), f"process {pid} of the line to end", 15)


def test_jobs_on_a_warm_line_write_what_a_run_writes(line):
    workdir, env = line
    ref = podpipe("run", "p.yaml", "--quiet", *_to("ref"), cwd=workdir, **env)
    assert ref.returncode == 0, ref.stderr
    warm = _line(workdir)["processes"]
    assert set(warm) == {"source", "check", "double", "total", "doubled", "summed"}
    jobs = []
    for name in ("a", "b"):
        done = podpipe("submit", "t", *_to(name), "--wait", cwd=workdir, **env)
        assert done.returncode == 0, done.stderr
        jobs.append(done.stdout.split()[0])
        assert f"{jobs[-1]}: succeeded" in done.stdout
        assert _sinks(workdir / "out" / name) == _sinks(workdir / "out" / "ref")
    assert len(_sinks(workdir / "out" / "ref")) == 11  # 10 batches and the total
    record = _line(workdir)
    assert record["processes"] == warm  # the same processes took both jobs
    jobs_now = record["jobs"]
    assert (jobs_now["done"], jobs_now["failed"], jobs_now["running"]) == (2, 0, None)
    # each job is a run directory like a run's
    run_dir = workdir / ".podpipe" / "runs" / jobs[1]
    status = podpipe("status", str(run_dir), "--json", cwd=workdir)
    assert json.loads(status.stdout)["state"] == "succeeded"
    logs = podpipe("logs", str(run_dir), "double", cwd=workdir)
    assert "batch 9: done" in logs.stdout and jobs[0] not in logs.stdout
    assert podpipe("report", str(run_dir), cwd=workdir).returncode == 0
    assert podpipe("wait", "latest", cwd=workdir).returncode == 0
    shown = podpipe("status", "t", cwd=workdir)
    assert "2 succeeded, 0 failed" in shown.stdout, shown.stdout
    listed = podpipe("lines", cwd=workdir)
    assert "t " in listed.stdout and " up " in listed.stdout
    down = podpipe("down", "t", cwd=workdir)
    assert down.returncode == 0 and "line t is down" in down.stdout
    assert " down " in podpipe("lines", cwd=workdir).stdout


def test_a_failed_job_is_the_jobs_alone_and_resumes(line):
    workdir, env = line
    ref = podpipe("run", "p.yaml", "--quiet", *_to("ref"), cwd=workdir, **env)
    assert ref.returncode == 0, ref.stderr
    assert podpipe("submit", "t", *_to("one"), "--wait", cwd=workdir).returncode == 0
    (workdir / "fail").touch()
    failed = podpipe("submit", "t", *_to("two"), "--wait", cwd=workdir)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "stage 'check', batch 2: ValueError" in failed.stderr, failed.stderr
    job = failed.stdout.split()[0]
    (workdir / "fail").unlink()
    third = podpipe("submit", "t", *_to("three"), "--wait", cwd=workdir)
    assert third.returncode == 0, third.stderr
    assert _sinks(workdir / "out" / "three") == _sinks(workdir / "out" / "ref")
    unreadable = podpipe("submit", "t", *_to("four"), "--set", "source.uri=nothing/*.parquet",
                         "--wait", cwd=workdir)
    assert unreadable.returncode == 1 and "nothing/*.parquet" in unreadable.stderr
    lost = json.loads(podpipe("status", str(workdir / ".podpipe" / "runs" /
                                             unreadable.stdout.split()[0]), "--json",
                              cwd=workdir).stdout)
    assert lost["state"] == "failed" and "nothing/*.parquet" in lost["error"]
    record = _line(workdir)
    assert (record["jobs"]["done"], record["jobs"]["failed"]) == (2, 2)
    assert [j["state"] for j in record["jobs"]["recent"]] == ["succeeded", "failed",
                                                               "succeeded", "failed"]
    # the failed job: its status says so; a resume redoes only what is missing
    run_dir = workdir / ".podpipe" / "runs" / job
    status = json.loads(podpipe("status", str(run_dir), "--json", cwd=workdir).stdout)
    assert status["state"] == "failed" and "batch 2" in status["error"]
    resumed = podpipe("resume", str(run_dir), cwd=workdir)  # back on its line
    assert resumed.returncode == 0, resumed.stderr
    assert f"{job}: succeeded" in resumed.stdout
    assert _line(workdir)["jobs"]["recent"][-1] == {**_line(workdir)["jobs"]["recent"][-1],
                                                    "job": job, "state": "succeeded"}
    again = podpipe("resume", str(run_dir), cwd=workdir)
    assert again.returncode == 2 and "already succeeded" in again.stderr
    after = json.loads(podpipe("status", str(run_dir), "--json", cwd=workdir).stdout)
    assert after["resumed_done"] > 0, after  # what the failed job had finished stayed
    assert _sinks(workdir / "out" / "two") == _sinks(workdir / "out" / "ref")


def test_bad_submits_are_refused_and_down_says_what_it_dropped(tmp_path: Path):
    workdir = tmp_path
    _spec(workdir, double="pystages:double_gated")
    gate = workdir / "gate"
    up = podpipe("up", "p.yaml", "--name", "t", cwd=workdir,
                 FAIL_MARKER=str(workdir / "fail"), GATE=str(gate))
    assert up.returncode == 0, up.stderr
    pids = [_line(workdir)["pid"], *_line(workdir)["processes"].values()]
    runs = workdir / ".podpipe" / "runs"
    before = set(runs.iterdir()) if runs.exists() else set()
    changes_graph = podpipe("submit", "t", "--set", "stages.double.inputs=[source]",
                            cwd=workdir)
    assert changes_graph.returncode == 2
    assert "a job may set only its data" in changes_graph.stderr
    unknown = podpipe("submit", "t", "--set", "sinks.nope.uri=out/x/", cwd=workdir)
    assert unknown.returncode == 2 and "nope" in unknown.stderr
    assert (set(runs.iterdir()) if runs.exists() else set()) == before  # nothing queued
    assert _line(workdir)["jobs"]["queued"] == []
    # a job held by the gate, then one writing where it writes, then one queued
    first = podpipe("submit", "t", *_to("a"), cwd=workdir)
    assert first.returncode == 0
    wait_until(lambda: _line(workdir)["jobs"]["running"] is not None,
               "the first job to start")
    clash = podpipe("submit", "t", *_to("a"), cwd=workdir)
    assert clash.returncode == 2 and first.stdout.split()[0] in clash.stderr
    queued = podpipe("submit", "t", *_to("b"), "--job", "b-1", cwd=workdir)
    assert queued.returncode == 0 and "1 ahead" in queued.stdout
    assert queued.stdout.split()[0] == "b-1"
    again = podpipe("submit", "t", *_to("c"), "--job", "b-1", cwd=workdir)
    assert again.returncode == 2 and "a job id is used once" in again.stderr
    assert _line(workdir)["jobs"]["queued"] == ["b-1"]
    down = podpipe("down", "t", cwd=workdir)
    assert down.returncode == 0, down.stderr
    assert "1 queued job(s) did not run" in down.stdout, down.stdout
    refused = podpipe("submit", "t", *_to("c"), cwd=workdir)
    assert refused.returncode == 2 and "line t is down" in refused.stderr
    assert " down " in podpipe("lines", cwd=workdir).stdout
    for pid in pids:  # the held process was killed, not waited for
        wait_until(lambda: not _alive(pid), f"process {pid} of the line to end", 15)
    stopped = json.loads(podpipe("status", str(runs / first.stdout.split()[0]), "--json",
                                 cwd=workdir).stdout)
    assert stopped["state"] == "interrupted"


def test_two_lines_at_once(tmp_path: Path):
    _spec(tmp_path)
    env = {"FAIL_MARKER": str(tmp_path / "fail")}
    for name in ("one", "two"):
        done = podpipe("up", "p.yaml", "--name", name, cwd=tmp_path, **env)
        assert done.returncode == 0, done.stderr
    try:
        again = podpipe("up", "p.yaml", "--name", "one", cwd=tmp_path, **env)
        assert again.returncode == 2 and "is up already" in again.stderr
        submits = [subprocess.Popen([sys.executable, "-m", "podpipe", "submit", name,
                                     *_to(name), "--wait"], cwd=tmp_path, env=cli_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name in ("one", "two")]
        for submit in submits:
            out, err = submit.communicate(timeout=120)
            assert submit.returncode == 0, err
        assert _sinks(tmp_path / "out" / "one") == _sinks(tmp_path / "out" / "two")
        assert len(_sinks(tmp_path / "out" / "one")) == 11
    finally:
        for name in ("one", "two"):
            podpipe("down", name, cwd=tmp_path)
    assert all(_line(tmp_path, n)["state"] == "down" for n in ("one", "two"))


def _as_nobody(function) -> int:
    """Run `function` in a forked child as uid 65534 (nobody); its exit code: 0 if it
    returned True."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            code = 0 if function() else 3
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_another_user_can_neither_read_nor_steer_the_line(line):
    from podpipe.errors import UsageError
    from podpipe.runtime.plumbing import protocol
    from podpipe.runtime.runs import lines

    workdir, env = line
    home = str(workdir / ".podpipe" / "lines" / "t")
    record = _line(workdir)
    os.chmod(workdir, 0o755)  # they may reach the folder; the line in it is 0700

    def refused(request) -> bool:
        try:
            request()
        except UsageError:
            return True
        return False

    assert _as_nobody(lambda: refused(lambda: list(lines.submit(home, [])))) == 0
    assert _as_nobody(lambda: refused(lambda: lines.ask(home, protocol.DownRequest()))) == 0

    def socket_refused() -> bool:  # whatever they know of it, the socket is not theirs
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(record["socket"])
            except PermissionError:
                return True
        return False
    assert _as_nobody(socket_refused) == 0
    after = _line(workdir)
    assert after["state"] == "up"
    assert after["jobs"]["queued"] == [] and after["jobs"]["recent"] == []


def test_a_killed_line_comes_back_and_finishes_its_job(tmp_path: Path):
    """The line's process killed mid-job: its supervisor starts it again, the job
    goes on from what it kept and ends byte-identical to a clean run; the job queued
    behind it runs after it."""
    import signal

    workdir = tmp_path
    _spec(workdir, double="pystages:double_gated")
    gate = workdir / "gate"
    env = {"FAIL_MARKER": str(workdir / "fail"), "GATE": str(gate)}
    gate.touch()
    ref = podpipe("run", "p.yaml", "--quiet", *_to("ref"), cwd=workdir, **env)
    assert ref.returncode == 0, ref.stderr
    gate.unlink()
    assert podpipe("up", "p.yaml", "--name", "t", cwd=workdir, **env).returncode == 0
    try:
        job = podpipe("submit", "t", *_to("a"), cwd=workdir).stdout.split()[0]
        after = podpipe("submit", "t", *_to("b"), cwd=workdir).stdout.split()[0]
        run_dir = workdir / ".podpipe" / "runs" / job
        wait_until(lambda: (run_dir / "status.json").exists(), "the job to start")
        first = _line(workdir)
        os.kill(first["pid"], signal.SIGKILL)
        wait_until(lambda: _line(workdir)["pid"] != first["pid"]
                   and _line(workdir)["state"] == "up", "the line to come back")
        assert _line(workdir)["supervisor"] == first["supervisor"]
        gate.touch()
        for each, name in ((job, "a"), (after, "b")):
            done = podpipe("wait", str(workdir / ".podpipe" / "runs" / each), cwd=workdir)
            assert done.returncode == 0, done.stdout + done.stderr
            assert _sinks(workdir / "out" / name) == _sinks(workdir / "out" / "ref")
        assert podpipe("down", "t", cwd=workdir).returncode == 0
        assert not _alive(first["supervisor"])
    finally:
        gate.touch()
        if _line(workdir)["state"] == "up":
            podpipe("down", "t", cwd=workdir)


def test_a_swap_on_the_line_holds_for_every_later_job(tmp_path: Path):
    import pyarrow.parquet as pq

    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "tag", "run": "pystages:tag_v1", "inputs": ["source"]},
         {"name": "count", "run": "pystages:count_versions", "reduce": True,
          "inputs": ["tag"]}],
        [{"input": "count", "uri": "out/x/"}]))
    assert podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path).returncode == 0
    try:
        def job(name: str) -> tuple[dict, dict]:
            done = podpipe("submit", "t", "--set", f"sinks.0.uri=out/{name}/", "--wait",
                           cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            counts = pq.read_table(tmp_path / "out" / name).to_pydict()
            run_dir = tmp_path / ".podpipe" / "runs" / done.stdout.split()[0]
            status = json.loads(podpipe("status", str(run_dir), "--json", cwd=tmp_path).stdout)
            return counts, status["stages"]["tag"]
        first, before = job("one")
        assert first["version"] == ["v1"] and first["x_count"] == [10_000]
        swapped = podpipe("swap", "t", "tag", "--run", "pystages:tag_v2", cwd=tmp_path)
        assert swapped.returncode == 0, swapped.stderr
        assert "from the line's next job on" in swapped.stdout
        bad = podpipe("swap", "t", "nope", "--run", "pystages:tag_v2", cwd=tmp_path)
        assert bad.returncode == 2 and "no stage 'nope'" in bad.stderr
        for name in ("two", "three"):
            counts, after = job(name)
            assert counts["version"] == ["v2"] and counts["x_count"] == [10_000]
            assert after["version"] != before["version"]
    finally:
        podpipe("down", "t", cwd=tmp_path)


def test_a_jobs_environment_is_its_own(tmp_path: Path):
    """`stages.NAME.env` set by one job is not the next job's (the process is warm)."""
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/x/"}]))
    assert podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path).returncode == 0
    try:
        def job(name: str, *env: str) -> subprocess.CompletedProcess:
            return podpipe("submit", "t", "--set", f"sinks.0.uri=out/{name}/", *env,
                           "--wait", cwd=tmp_path)
        assert job("a", "--set", "stages.boom.env.BOOM_AT='-1'").returncode == 0
        plain = job("b")  # BOOM_AT unset again: the stage's default, 2500, fails batch 2
        assert plain.returncode == 1 and "stage 'boom', batch 2" in plain.stderr
        assert job("c", "--set", "stages.boom.env.BOOM_AT='-1'").returncode == 0
    finally:
        podpipe("down", "t", cwd=tmp_path)


def test_a_table_stays_in_ram_while_its_files_do_not_change(tmp_path: Path):
    """A job takes the table the job before loaded (its table process runs no task);
    a job after its files changed loads it again, and reads the new one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_numbers(tmp_path / "data")
    codes = tmp_path / "codes.parquet"
    pq.write_table(pa.table({"k": range(10), "label": [f"L{k}" for k in range(10)]}), codes)
    document = spec([{"name": "labelled", "run": "pystages:with_label",
                      "inputs": ["source", "codes"]}], [{"input": "labelled", "uri": "out/x/"}])
    document["spec"]["tables"] = [{"name": "codes", "uri": "codes.parquet"}]
    write_spec(tmp_path / "p.yaml", document)
    assert podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path).returncode == 0
    try:
        def job(name: str) -> tuple[list[str], dict, list[str]]:
            done = podpipe("submit", "t", "--set", f"sinks.0.uri=out/{name}/", "--wait",
                           cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            run_dir = tmp_path / ".podpipe" / "runs" / done.stdout.split()[0]
            status = json.loads(podpipe("status", str(run_dir), "--json", cwd=tmp_path).stdout)
            tasks = [json.loads(row)["node"] for row in
                     (run_dir / "tasks.jsonl").read_text().splitlines()]
            labels = pq.read_table(tmp_path / "out" / name).column("label").to_pylist()
            return labels, status["stages"]["codes"], tasks
        labels, first, tasks = job("a")
        assert labels[:3] == ["L0", "L1", "L2"] and "codes" in tasks  # loaded
        again, second, tasks = job("b")
        assert again == labels and "codes" not in tasks                # kept in RAM
        assert second["version"] == first["version"] and second["batches_done"] == 1
        pq.write_table(pa.table({"k": range(10), "label": [f"M{k}" for k in range(10)]}),
                       codes)
        os.utime(codes, (1, 1))  # (another size or time: the files' identity changed)
        changed, third, tasks = job("c")
        assert changed[:3] == ["M0", "M1", "M2"] and "codes" in tasks  # loaded anew
        assert third["version"] != first["version"]
        # what a person sees: the line, in a terminal 80 columns wide
        from test_loop import _in_tmux

        screen = _in_tmux(tmp_path, "podpipe status t; podpipe lines", rows=30)
        assert all(len(row) <= 80 for row in screen.splitlines()), screen
        assert "line t: up" in screen and f"codes ({third['version']})" in screen, screen
        assert "3 succeeded, 0 failed" in screen and "EXIT=0" in screen, screen
    finally:
        podpipe("down", "t", cwd=tmp_path)


def test_a_line_serves_its_metrics_for_its_life(line):
    """`up --metrics-port`: one endpoint from up to down, with the last job's series
    (labelled with its id) and the line's jobs by state."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    workdir, env = line
    podpipe("down", "t", cwd=workdir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    up = podpipe("up", "p.yaml", "--name", "t", "--metrics-port", str(port), cwd=workdir, **env)
    assert up.returncode == 0, up.stderr

    def scrape() -> dict[tuple, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                if family.name.startswith("podpipe_") for s in family.samples}
    before = scrape()
    assert before[("podpipe_line_jobs", (("line", "t"), ("state", "queued")))] == 0
    jobs = [podpipe("submit", "t", *_to(name), "--wait", cwd=workdir).stdout.split()[0]
            for name in ("a", "b")]
    after = scrape()
    assert after[("podpipe_line_jobs_ended_total", (("line", "t"),
                                                    ("state", "succeeded")))] == 2
    done = {dict(labels)["podpipe_job"]: value for (name, labels), value in after.items()
            if name == "podpipe_batches_done_total" and dict(labels)["node"] == "double"}
    assert done == {jobs[1]: 10}  # the last job's, by its id
    assert podpipe("down", "t", cwd=workdir).returncode == 0
    with pytest.raises(OSError):
        scrape()
