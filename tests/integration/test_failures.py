"""Failures end cleanly: exit codes, messages naming stage and batch, no processes or
scratch left behind, nothing hangs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import cli_env, make_numbers, podpipe, read_sink, spec, write_spec
from podpipe.runtime.data import scratch


def _pids(run_dir: Path) -> list[int]:
    status = json.loads((run_dir / "status.json").read_text())
    return [p["pid"] for p in status["processes"]]


def _gone(pid: int) -> bool:
    return scratch.process_start(pid) is None or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _started_in(folder: Path) -> list[int]:
    """Processes working in `folder` (what a CLI run there started, and is left)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and not _zombie(int(proc.name)) and \
                    Path(os.readlink(proc / "cwd")) == folder.resolve():
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def test_a_raising_stage_fails_the_run_naming_stage_batch_and_exception(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir)
    assert done.returncode == 1
    assert "stage 'boom', batch 2: ValueError: boom on purpose" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Traceback" in (workdir / "run/logs/boom.log").read_text()
    assert all(_gone(pid) for pid in _pids(workdir / "run"))
    status = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert status["state"] == "failed" and "boom on purpose" in status["error"]


def test_a_stage_process_that_dies_every_time_fails_the_run_after_its_retries(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "die", "command": ["sh", "-c", "kill -9 $PPID; sleep 5"],
          "inputs": ["source"], "retries": 2}],
        [{"input": "die", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir, timeout=60)
    assert done.returncode == 1
    assert ("stage 'die', batch 0: its process exited (code -9) before finishing the batch, "
            "after 2 restarts") in done.stderr
    status = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert status["stages"]["die"]["restarts"] == 2
    assert (workdir / "run/logs/conductor.log").read_text().count("restarting stage 'die'") == 2


def test_a_stage_process_killed_from_outside_is_restarted_and_the_output_is_unchanged(workdir):
    clean = podpipe("run", "p.yaml", "--quiet", "--run-dir", "clean", cwd=_write_slow(workdir),
                    SLOW_SECONDS="0")
    assert clean.returncode == 0, clean.stderr
    expected = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    shutil.rmtree(workdir / "out")
    run = _start(workdir, SLOW_SECONDS="0.3")
    status = _running_status(workdir)
    _wait_for(lambda: json.loads((workdir / "run/status.json").read_text())["stages"]["slow"][
        "batches_done"] > 0)
    victim = next(p["pid"] for p in status["processes"] if p["stage"] == "slow")
    os.kill(victim, signal.SIGKILL)  # as the OOM killer would, mid-batch
    _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    assert {p.name: p.read_bytes() for p in (workdir / "out").iterdir()} == expected
    final = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert final["stages"]["slow"]["restarts"] == 1
    assert final["stages"]["slow"]["batches_done"] == final["source_batches"]
    assert victim not in {p["pid"] for p in final["processes"]}
    assert all(_gone(p["pid"]) for p in final["processes"])


def test_with_no_retries_a_killed_stage_fails_the_run_cleanly(workdir):
    run = _start(workdir, SLOW_SECONDS="1", retries="0")
    status = _running_status(workdir)
    _wait_for(lambda: json.loads((workdir / "run/status.json").read_text())["stages"]["source"][
        "batches_done"] > 0)
    victim = next(p["pid"] for p in status["processes"] if p["stage"] == "slow")
    os.kill(victim, signal.SIGKILL)
    _, err = run.communicate(timeout=30)
    assert run.returncode == 1
    assert "stage 'slow', batch 0: its process exited (code -9)" in err
    assert all(_gone(p["pid"]) for p in status["processes"])
    assert not Path(status["scratch"]).exists()


def _write_slow(workdir: Path, retries: int | None = None) -> Path:
    stage = {"name": "slow", "run": "pystages:slow", "inputs": ["source"]}
    if retries is not None:
        stage["retries"] = retries
    write_spec(workdir / "p.yaml", spec([stage], [{"input": "slow", "uri": "out/"}]))
    return workdir


def _start(workdir: Path, retries: str | None = None, **env: str) -> subprocess.Popen:
    if not (workdir / "p.yaml").exists() or retries is not None:
        _write_slow(workdir, int(retries) if retries is not None else None)
    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run"], cwd=workdir, env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _running_status(workdir: Path) -> dict:
    path = workdir / "run" / "status.json"
    _wait_for(lambda: path.exists() and json.loads(path.read_text())["stages"]["slow"][
        "version"] is not None)
    return json.loads(path.read_text())


def test_status_reports_the_live_run_then_its_end(workdir):
    run = _start(workdir, SLOW_SECONDS="0.2")
    try:
        _running_status(workdir)
        live = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
        assert live["state"] == "running"
        assert Path(live["scratch"]).is_dir()
        roles = {(p["role"], p["stage"]) for p in live["processes"]}
        assert roles == {("conductor", None), ("stage", "source"), ("stage", "slow"),
                         ("stage", "sink-0")}
        assert all(not _gone(p["pid"]) for p in live["processes"])
        assert all(p["pod"] == "t-0" for p in live["processes"])
        assert live["stages"]["slow"]["batches_total"] == 10
        table = podpipe("status", "run", cwd=workdir, COLUMNS="160")
        assert table.returncode == 0 and "conductor" in table.stdout
    finally:
        _, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    final = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert final["state"] == "succeeded"
    assert final["stages"]["slow"]["batches_done"] == 10
    assert not Path(final["scratch"]).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_stops_every_process_and_removes_scratch(workdir, sig):
    run = _start(workdir, SLOW_SECONDS="5")
    status = _running_status(workdir)
    run.send_signal(sig)
    run.communicate(timeout=30)
    assert run.returncode == 130
    assert all(_gone(p["pid"]) for p in status["processes"])
    assert not Path(status["scratch"]).exists()
    final = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert final["state"] == "interrupted"


def test_a_killed_conductor_takes_its_stages_along_and_its_scratch_is_swept(workdir):
    run = _start(workdir, SLOW_SECONDS="5")
    status = _running_status(workdir)
    run.kill()
    run.communicate(timeout=30)
    _wait_for(lambda: all(_gone(p["pid"]) for p in status["processes"]), timeout=15)
    assert json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)[
        "state"] == "interrupted"
    assert Path(status["scratch"]).exists()  # a crash leaves it; the next run sweeps it
    make_numbers(workdir / "small", files=1, rows=10)
    write_spec(workdir / "q.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out2/"}],
                                        uri="small/*.parquet"))
    assert podpipe("run", "q.yaml", "--quiet", cwd=workdir).returncode == 0
    assert not Path(status["scratch"]).exists()


def test_scratch_of_a_live_run_is_never_swept(tmp_path):
    mine = scratch.Scratch.create("sweep-test-live", tmp_path)
    dead = tmp_path / "podpipe-sweep-test-dead"
    dead.mkdir(mode=0o700)
    (dead / "owner.json").write_text(json.dumps({"pid": 2**22 + 7, "start": "1"}))
    assert scratch.sweep(tmp_path) == [dead]
    assert mine.path.exists() and not dead.exists()


def test_a_run_whose_data_is_many_times_the_budget_completes_within_it(tmp_path):
    make_numbers(tmp_path / "data", files=4, rows=20_000, row_group=2000)
    budget = 3 * 2**20
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "wide", "run": "pystages:widen", "inputs": ["source"]},
         {"name": "again", "run": "pystages:double", "inputs": ["wide"]}],
        [{"input": "again", "uri": "out/"}], batch_rows=2000, memory=str(budget)))
    peak, stop = [0], threading.Event()

    def sample() -> None:  # watch the real tmpfs, not the conductor's bookkeeping
        while not stop.is_set():
            for path in Path("/dev/shm").glob("podpipe-*"):
                peak[0] = max(peak[0], scratch.Scratch(path).usage())
            time.sleep(0.002)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert done.returncode == 0, done.stderr
    status = json.loads((tmp_path / "run/status.json").read_text())
    written = sum(s["bytes_written"] for s in status["stages"].values())
    assert written > 5 * budget, "the test must push several budgets' worth through scratch"
    assert 0 < status["peak_scratch_bytes"] <= budget
    assert 0 < peak[0] <= budget + 4 * 4096  # + the owner file (the socket takes none)
    out = read_sink(tmp_path / "out")
    assert out["x"].to_pylist() == [2 * x for x in range(80_000)]


def test_batches_that_grow_midway_still_complete_within_the_budget(tmp_path):
    make_numbers(tmp_path / "data", files=4, rows=10_000, row_group=2000)
    budget = 2 * 2**20  # one large batch on the line fits, two do not
    write_spec(tmp_path / "p.yaml", spec(  # a slow stage after a growing one
        [{"name": "wide", "run": "pystages:widen_later", "inputs": ["source"]},
         {"name": "slow", "run": "pystages:slow", "inputs": ["wide"]}],
        [{"input": "slow", "uri": "out/"}], batch_rows=2000, memory=str(budget)))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   SLOW_SECONDS="0.05")
    assert done.returncode == 0, done.stderr
    status = json.loads((tmp_path / "run/status.json").read_text())
    assert 0 < status["peak_scratch_bytes"] <= budget
    out = read_sink(tmp_path / "out")
    assert out["x"].to_pylist() == list(range(40_000))
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 20


def test_a_batch_larger_than_the_budget_is_a_clear_error(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "wide", "run": "pystages:widen", "inputs": ["source"]}],
        [{"input": "wide", "uri": "out/"}], memory="64KiB"))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir, timeout=60)
    assert done.returncode == 1
    assert "stage 'wide', batch 0: its output needs" in done.stderr
    assert "more than the whole RAM budget of 64.0 KiB" in done.stderr


@pytest.mark.parametrize("args,message", [
    (["run", "missing.yaml"], "missing.yaml: no such file"),
    (["run", "p.yaml", "--memory", "lots"], "--memory: expected a size"),
    (["run", "p.yaml", "--replicas", "2", "--pod-index", "5"], "pod index 5 is not below"),
    (["run", "p.yaml", "--memory", "900TiB"], "is more than the"),
    (["run", "p.yaml", "--set", "source.uri=nowhere/*.parquet"], "matches no files"),
    (["run", "p.yaml", "--set", "stages.s.run=no_such_module:f"],
     "p.yaml: spec.stages[0].run: cannot import 'no_such_module:f'"),
    (["run", "p.yaml", "--set", "stages.s.inptus=[source]"], "unknown field 'inptus'"),
    (["run", "p.yaml", "--set", "source.columns=[nope]"], "names ['nope'], which the file"),
    (["validate", "bad.yaml"], "bad.yaml:3: invalid YAML"),
    (["status", "nowhere"], "not a podpipe run directory"),
    (["resume", "nowhere"], "nowhere: not a podpipe run directory (no such directory)"),
    (["run"], "the following arguments are required: SPEC"),
], ids=["no-spec-file", "bad-memory", "replicas", "budget-over-tmpfs", "no-source-files",
        "unimportable-stage", "typo-field", "missing-column", "yaml-syntax", "status-no-run", "resume",
        "missing-argument"])
def test_bad_input_exits_2_with_a_message_and_no_traceback(workdir, args, message):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    (workdir / "bad.yaml").write_text("spec:\n  a: 1\n\tb: 2\n")
    done = podpipe(*args, cwd=workdir, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    runs = workdir / ".podpipe" / "runs"
    left = [p for p in runs.glob("*") if not (p / "status.json").exists()] if runs.exists() else []
    assert left == [], "a run directory without a status was left behind"
    _wait_for(lambda: not _started_in(workdir), timeout=10)  # its fork server too


@pytest.mark.parametrize("threads", [1, 2])
def test_an_early_fork_server_is_forked_only_from_one_thread_and_ends_when_unused(threads):
    """`launcher.warm` forks the CLI's process only while it is one thread (forking a
    threaded process can copy a lock another thread holds); either way a server no
    run took is gone once closed."""
    script = (
        "import threading, json, sys\n"
        "from podpipe.runtime.runs.launcher import warm\n"
        "stop = threading.Event()\n"
        f"if {threads} == 2: threading.Thread(target=stop.wait).start()\n"
        "server = warm()\n"
        "server.close()\n"
        "stop.set()\n"
        "print(json.dumps([server.forked, server.pid]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=cli_env())
    assert done.returncode == 0, done.stderr
    forked, pid = json.loads(done.stdout)
    assert forked == (threads == 1)
    assert _gone(pid)


def test_validate_accepts_a_good_spec(workdir):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    done = podpipe("validate", "p.yaml", cwd=workdir)
    assert done.returncode == 0
    assert "valid pipeline 't'" in done.stdout


COPY_INPUT = ("import os, pyarrow as pa, pyarrow.ipc as ipc; "
              "t = ipc.open_file(os.environ['PODPIPE_INPUT']).read_all(); "
              "w = ipc.new_file(os.environ['PODPIPE_OUTPUT'], t.schema); "
              "w.write_table(t); w.close()")


@pytest.mark.parametrize("kind", ["function", "command"])
def test_reduce_inputs_beyond_the_budget_spill_to_the_node_tier(workdir, kind):
    """Ten batches' outputs must all stay until the reduce reads them, and only about
    three fit in the budget: the rest are written to the node tier and read from there."""
    make_numbers(workdir / "data", files=2, rows=10_000, row_group=2000)
    producer = ({"run": "pystages:double"} if kind == "function"
                else {"command": [sys.executable, "-c", COPY_INPUT]})
    write_spec(workdir / "p.yaml", spec(
        [{"name": "keep", **producer, "inputs": ["source"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["keep"]}],
        [{"input": "total", "uri": "out/"}], batch_rows=2000, memory=str(100 * 1024)))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir, timeout=120)
    assert done.returncode == 0, done.stderr
    factor = 2 if kind == "function" else 1
    assert read_sink(workdir / "out").to_pylist() == [
        {"rows": 20_000, "sum": factor * sum(range(20_000))}]
    status = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert status["spilled_outputs"] >= 5
    assert status["peak_scratch_bytes"] <= 100 * 1024
    assert "spills to the node tier" in (workdir / "run/logs/conductor.log").read_text()


def test_a_fifo_as_the_spec_is_refused_at_once_not_waited_on(workdir):
    """A FIFO nobody writes to hung `validate` and `run` in the open."""
    os.mkfifo(workdir / "p.yaml")
    for command in (["validate", "p.yaml"], ["run", "p.yaml", "--quiet"]):
        done = podpipe(*command, cwd=workdir, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "p.yaml" in done.stderr and "not a regular file" in done.stderr
        assert "Traceback" not in done.stderr


def test_swap_and_apply_take_latest_as_every_other_command_does(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", cwd=workdir).returncode == 0
    for command in (["swap", "latest", "a", "--run", "pystages:plus_one"],
                    ["apply", "latest", "p.yaml"]):
        done = podpipe(*command, cwd=workdir)
        assert done.returncode == 2, done.stderr
        assert "the run is succeeded, not running" in done.stderr, done.stderr


@pytest.mark.parametrize("root", ["/etc/passwd", "relative/dir", ""])
def test_a_scratch_root_that_is_no_directory_is_bad_input(workdir, root):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir, PODPIPE_SCRATCH_ROOT=root)
    assert done.returncode == 2, done.stderr
    assert "PODPIPE_SCRATCH_ROOT" in done.stderr and "Traceback" not in done.stderr


def test_a_sink_inside_the_source_through_a_link_is_refused(workdir):
    """`link/out/` with `link -> data`: the spec's check compares the paths as
    written; the run's check follows the links, and refuses before writing."""
    (workdir / "link").symlink_to(workdir / "data")
    write_spec(workdir / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "link/out/"}], uri="data/"))
    assert podpipe("validate", "p.yaml", cwd=workdir).returncode == 0
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 2, done.stderr
    assert "inside the source" in done.stderr and "once links are followed" in done.stderr
    assert not (workdir / "data" / "out").exists()


def test_a_fixed_schema_holds_for_the_run_across_a_restart(workdir):
    """A stage's process restarted after batch 4 returned float64 where the run's
    output was int64: the restarted process's first output fixed its own schema, and
    the sink mixed both (exit 0). The schema is the run's: the batch fails the run."""
    write_spec(workdir / "p.yaml", spec(
        [{"name": "a", "run": "pystages:floats_after_dying", "inputs": ["source"],
          "workers": 1}],
        [{"input": "a", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir,
                   DIE_AT="5000", DIE_MARKER=str(workdir / "died"))
    assert (workdir / "died").exists()  # it did die, and was restarted
    assert done.returncode == 1, done.stderr
    assert "stage 'a', batch 5: its output schema differs from batch 0's, which fixed " \
           "the stage's schema for the run" in done.stderr, done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_node_tier_disk_is_reported_and_the_run_goes_on(tmp_path):
    """The node tier (the run directory) on a disk that fills up: the copies fail and
    are reported, the journal is set aside, and the run finishes with the right
    output (the conductor crashed on SQLite's "database or disk is full")."""
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(tiny)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        make_numbers(tmp_path / "data", files=2, rows=50_000, row_group=10_000)
        write_spec(tmp_path / "p.yaml", spec(
            [{"name": "a", "run": "pystages:double", "inputs": ["source"]},
             {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["a"]}],
            [{"input": "total", "uri": "out/"}], batch_rows=10_000))
        done = podpipe("run", "p.yaml", "--quiet", "--run-dir", str(tiny / "run"),
                       cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        total = read_sink(tmp_path / "out")
        assert total["sum"].to_pylist() == [2 * sum(range(100_000))]
        # the disk did fill: the node tier holds fewer than the 10 copies it was asked
        # for (what it could not copy was reported in the status, as far as the
        # status itself could still be written)
        assert len(list((tiny / "run" / "node").rglob("*.arrow"))) < 10
    finally:
        subprocess.run(["umount", "-l", str(tiny)], check=False)


def test_csv_files_whose_columns_read_as_different_types_are_refused_at_planning(tmp_path):
    """`x` reads as int64 in one file and double in the other: refused before the
    run starts (exit 2 naming both files and the column), as Parquet files of
    different schemas are; timing decided between a mixed sink and an exit 1."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("x,y\n1,a\n2,b\n")
    (tmp_path / "data" / "b.csv").write_text("x,y\n1.5,c\n2.5,d\n")
    document = spec([{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
                    [{"input": "a", "uri": "out/"}], uri="data/*.csv")
    document["spec"]["source"]["format"] = "csv"
    write_spec(tmp_path / "p.yaml", document)
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "a.csv" in done.stderr and "b.csv" in done.stderr and "different schemas" in \
        done.stderr and "x" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
