"""Only the run's owner can touch a run, and bad input is a clear refusal.

The second user is simulated with `os.setuid` in a forked child (uid 65534,
nobody), which needs root; where the tests do not run as root those cases are
skipped, saying why.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_numbers, podpipe, read_sink, run_status, spec, wait_until, write_spec

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="simulating a second user needs root")


def _as_nobody_here(function) -> int:
    """In a forked child: become uid 65534, run `function`; the exit code to leave
    with (0: it returned True). Never returns into the test runner."""
    import warnings

    code = 1
    try:
        warnings.simplefilter("ignore")  # the test runner's objects, copied by fork
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        code = 0 if function() else 3
    except BaseException:
        code = 4
    finally:
        os._exit(code)


def _as_nobody(function) -> int:
    """Run `function` in a forked child as uid 65534; its exit code (0: it returned
    True)."""
    pid = os.fork()
    if pid == 0:
        _as_nobody_here(function)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _slow_spec(workdir: Path, **extra) -> None:
    make_numbers(workdir / "data", files=4, rows=1000, row_group=1000)
    write_spec(workdir / "p.yaml", spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["slow"]}],
        [{"input": "total", "uri": "out/"}], **extra))


def _start(workdir: Path, *args: str, **env: str) -> subprocess.Popen:
    from conftest import cli_env

    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run", *args], cwd=workdir,
                            env=cli_env(SLOW_SECONDS="0.3", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _running(workdir: Path) -> dict:
    wait_until(lambda: run_status(workdir / "run").get("stages", {}).get("slow", {})
               .get("batches_done", 0) >= 1, "a batch through the slow stage")
    return run_status(workdir / "run")


def test_a_runs_scratch_run_directory_and_data_are_readable_by_its_user_only(tmp_path):
    _slow_spec(tmp_path)
    run = _start(tmp_path)
    try:
        status = _running(tmp_path)
        scratch = Path(status["scratch"])
        modes = {}
        for p in [scratch, *scratch.rglob("*"), tmp_path / "run",
                  *(tmp_path / "run").rglob("*")]:
            try:
                modes[p] = stat.S_IMODE(os.lstat(p).st_mode)
            except FileNotFoundError:
                continue  # the run is live: a file may go between listing and looking
        assert modes[scratch] == 0o700 and modes[tmp_path / "run"] == 0o700
        opened = {p: m for p, m in modes.items() if m & 0o077}
        assert opened == {}, opened
        data = [p for p in scratch.rglob("*.arrow")] + list((tmp_path / "run").rglob("*.arrow"))
        assert data, "no batch file to look at"
        assert stat.S_IMODE(os.lstat(scratch / "conductor.sock").st_mode) == 0o600
    finally:
        run.kill()
        run.communicate()
        _sweep_now(tmp_path)  # the killed run's scratch


def _sweep_now(workdir: Path) -> None:
    """Sweep the scratch of runs the test killed (as the next run would)."""
    from podpipe.runtime.data import scratch

    scratch.sweep()


def test_the_scratch_name_is_random_and_fixed_length_so_a_long_pipeline_name_runs(tmp_path):
    name = "a" * 63  # a DNS label at its longest
    make_numbers(tmp_path / "data", files=1, rows=100)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}], name=name))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scratch = Path(run_status(tmp_path / "run")["scratch"])
    assert name not in scratch.name and len(scratch.name) == len("podpipe-") + 8


@as_root
def test_another_user_cannot_reach_the_conductor(tmp_path):
    _slow_spec(tmp_path)
    run = _start(tmp_path)
    try:
        sock = str(Path(_running(tmp_path)["scratch"]) / "conductor.sock")

        def connect() -> bool:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(sock)
                except PermissionError:
                    return True  # refused: the directory is 0700
                return False
        assert _as_nobody(connect) == 0
        done = podpipe("swap", "run", "slow", "--run", "pystages:double", cwd=tmp_path)
        assert done.returncode == 0, done.stderr  # the owner still can
    finally:
        run.kill()
        run.communicate()
        _sweep_now(tmp_path)


@as_root
def test_a_peer_of_another_uid_is_refused_before_anything_it_says_is_read(tmp_path):
    """Even where the socket is reachable (modes changed by hand), the conductor checks
    the peer's uid (SO_PEERCRED) and refuses another user's connection."""
    from podpipe.runtime.plumbing import protocol, sockets
    from podpipe.runtime.conductor.agents import Agents
    from podpipe.runtime.plumbing.loop import EventLoop, Ready

    import shutil
    import tempfile
    import time

    logged: list[str] = []
    shared = Path(tempfile.mkdtemp(prefix="podpipe-test-"))  # reachable by nobody too
    shared.chmod(0o777)
    path = shared / "c.sock"
    try:
        with EventLoop(signals=()) as loop:
            agents = Agents(loop, sockets.listen(path),
                            lambda message, level="info": logged.append(message))
            agents.listen()
            os.chmod(path, 0o666)

            def swap() -> bool:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(path))
                    s.settimeout(10)
                    try:
                        protocol.send(s, protocol.SwapRequest(stage="a", overrides=["x=1"]))
                        return s.recv(1) == b""  # closed without an answer
                    except (BrokenPipeError, ConnectionResetError):
                        return True  # closed already
            pid = os.fork()
            if pid == 0:
                _as_nobody_here(swap)
            said = []
            deadline = time.monotonic() + 30
            while not logged and time.monotonic() < deadline:
                for happening in loop.wait(1):
                    if isinstance(happening, Ready):
                        said += agents.read(happening.tag)
            agents.close()
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
            assert said == [] and logged and f"uid {NOBODY}" in logged[0]
    finally:
        shutil.rmtree(shared)


@as_root
def test_resume_does_not_take_over_a_scratch_someone_else_planted(tmp_path):
    _slow_spec(tmp_path, memory="256MiB")
    run = _start(tmp_path)
    status = _running(tmp_path)
    run.kill()
    run.communicate()
    scratch = Path(status["scratch"])
    wait_until(lambda: all(not Path(f"/proc/{p['pid']}").exists()
                           for p in status["processes"]), "the stage processes gone")
    import shutil
    shutil.rmtree(scratch)
    target = tmp_path / "victim"
    target.mkdir()
    (target / "precious.txt").write_text("mine")
    scratch.mkdir(mode=0o777)  # planted by another user, predictable or not
    os.chown(scratch, NOBODY, NOBODY)
    os.symlink(target / "precious.txt", scratch / "owner.json")
    done = podpipe("resume", "run", cwd=tmp_path, SLOW_SECONDS="0.01")
    try:
        assert done.returncode == 0, done.stderr
        assert (target / "precious.txt").read_text() == "mine"
        assert sorted(p.name for p in scratch.iterdir()) == ["owner.json"]
        after = run_status(tmp_path / "run")
        assert Path(after["scratch"]) != scratch
        assert any("not taken over" in n for n in after["restore_notes"]), after
        assert read_sink(tmp_path / "out").num_rows == 1
    finally:
        shutil.rmtree(scratch)


def test_the_sweep_leaves_what_it_cannot_prove_is_its_own(tmp_path):
    from podpipe.runtime.data import scratch

    root = tmp_path / "shm"
    root.mkdir()
    project = root / "podpipe-myproject"  # a user's own directory, not a scratch
    project.mkdir()
    (project / "notes.txt").write_text("keep me")
    os.utime(project, (0, 0))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "podpipe-link").symlink_to(elsewhere)
    assert scratch.sweep(root) == []
    assert (project / "notes.txt").exists() and elsewhere.exists()


@pytest.mark.parametrize("value", ["", "relative/dir"], ids=["empty", "relative"])
def test_a_scratch_root_that_is_not_an_absolute_path_is_refused(tmp_path, value):
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    (tmp_path / "podpipe-keep").mkdir()
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path, PODPIPE_SCRATCH_ROOT=value)
    assert done.returncode == 2, done.stderr
    assert "PODPIPE_SCRATCH_ROOT" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "podpipe-keep").exists()


def test_a_second_resume_of_the_same_run_refuses_at_once_naming_the_holder(tmp_path):
    _slow_spec(tmp_path)
    run = _start(tmp_path)
    _running(tmp_path)
    run.kill()
    run.communicate()
    first = subprocess.Popen([sys.executable, "-m", "podpipe", "resume", "run", "--quiet"],
                             cwd=tmp_path, env=__import__("conftest").cli_env(SLOW_SECONDS="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: run_status(tmp_path / "run").get("state") == "running" and
                   run_status(tmp_path / "run")["processes"][0]["pid"] == first.pid,
                   "the first resume to run")
        second = podpipe("resume", "run", cwd=tmp_path)
        assert second.returncode == 2, second.stderr
        assert f"in use by process {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.kill()
        first.communicate()
        _sweep_now(tmp_path)


@pytest.mark.parametrize("sinks, uri, message", [
    ([{"input": "s", "uri": "out/"}, {"name": "again", "input": "s", "uri": "./out"}],
     "data/*.parquet", "overlaps sink 'sink-0'"),
    ([{"input": "s", "uri": "out/"}, {"name": "inner", "input": "s", "uri": "out/inner"}],
     "data/*.parquet", "overlaps sink 'sink-0'"),
    ([{"input": "s", "uri": "data/out/"}], "data", "inside the source"),
    ([{"input": "s", "uri": "data/"}], "data/*.parquet", "inside the source"),
], ids=["same-uri", "nested", "inside-a-folder-source", "matched-by-the-source-glob"])
def test_sinks_that_would_lose_or_read_back_data_are_refused(tmp_path, sinks, uri, message):
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}], sinks, uri=uri))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "spec.sinks[" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, message", [
    ("shards=1000000000000", "spec.shards: expected at most 100,000"),
    ("source.batchRows=99999999999", "spec.source.batchRows: expected at most"),
], ids=["shards", "batch-rows"])
def test_sizes_beyond_sane_limits_are_refused_with_the_limit(tmp_path, setting, message):
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    done = podpipe("validate", "p.yaml", "--set", setting, cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_a_spec_that_never_ends_is_refused_and_a_huge_one_after_a_mebibyte(tmp_path):
    done = podpipe("validate", "/dev/zero", cwd=tmp_path, timeout=30)
    assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
    (tmp_path / "huge.yaml").write_text("# " + "x" * (2 << 20) + "\n")
    done = podpipe("validate", "huge.yaml", cwd=tmp_path, timeout=30)
    assert done.returncode == 2 and "larger than 1 MiB" in done.stderr, done.stderr


def test_more_local_replicas_than_the_machine_can_hold_are_refused(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--replicas", str(4 * os.cpu_count() + 1), cwd=tmp_path)
    assert done.returncode == 2 and "pods on this machine" in done.stderr, done.stderr


@pytest.mark.parametrize("durable, cause", [
    ("bogus://x", "bogus"),
    ("file:///proc/podpipe-cannot-write-here", "/proc"),
    ("file://{tmp}/a-file", "a-file"),
], ids=["unknown-scheme", "not-writable", "file-shaped"])
def test_a_durable_tier_that_cannot_be_written_is_refused_before_anything_runs(
        tmp_path, durable, cause):
    (tmp_path / "a-file").write_text("not a directory")
    durable = durable.format(tmp=tmp_path)
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}],
                                         checkpoints={"durable": durable}))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "spec.checkpoints.durable" in done.stderr and cause in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# A command stage that leaves a process behind: one in its own process group (as a
# careless script's `setsid`), and one in the stage's; then passes its input on.
LEAVER = """
import os, shutil, subprocess, sys
pids = os.environ["PIDS"]
a = subprocess.Popen(["sleep", "300"], start_new_session=True)
b = subprocess.Popen(["sleep", "300"])
with open(pids, "a") as f:
    f.write(f"{a.pid} {b.pid}\\n")
shutil.copy(os.environ["PODPIPE_INPUT"], os.environ["PODPIPE_OUTPUT"])
"""


def test_what_a_stage_starts_ends_with_the_run(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=100)
    pids = tmp_path / "pids"
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "leave", "command": [sys.executable, "-c", LEAVER], "inputs": ["source"],
          "env": {"PIDS": str(pids)}}],
        [{"input": "leave", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    left = [int(p) for p in pids.read_text().split()]
    assert len(left) == 2
    wait_until(lambda: not any(_alive(p) for p in left), "the stage's children to end",
               timeout=10)


def test_interrupting_a_run_ends_a_command_stage_in_the_middle_of_a_batch(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=100)
    pids = tmp_path / "pids"
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "sleepy", "command": ["sh", "-c", f"echo $$ >> {pids}; exec sleep 300"],
          "inputs": ["source"]}], [{"input": "sleepy", "uri": "out/"}]))
    from conftest import cli_env

    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet"],
                           cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    wait_until(lambda: pids.exists() and pids.read_text().strip(), "the command to start")
    run.send_signal(2)  # Ctrl-C
    run.communicate(timeout=60)
    assert run.returncode == 130
    (pid,) = [int(p) for p in pids.read_text().split()]
    wait_until(lambda: not _alive(pid), "the command to end", timeout=10)


def test_a_stage_over_its_timeout_is_restarted_and_the_batch_done_again(tmp_path):
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=1000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "once", "run": "pystages:hang_once", "inputs": ["source"], "timeout": 1,
          "env": {"HANG_MARKER": str(tmp_path / "hung")}}],
        [{"input": "once", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert run_status(tmp_path / "run")["stages"]["once"]["restarts"] == 1
    assert read_sink(tmp_path / "out").num_rows == 2000


def test_a_stage_that_always_times_out_fails_the_run_naming_stage_and_batch(tmp_path):
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=1000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "stuck", "run": "pystages:hang_on_batch_one", "inputs": ["source"],
          "timeout": 0.5, "retries": 1}], [{"input": "stuck", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "stage 'stuck', batch 1: the batch took longer than its timeout of 0.5 s" \
        in done.stderr and "after 1 restarts" in done.stderr


def test_source_files_of_different_schemas_are_refused_naming_both(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"x": pa.array([1, 2], pa.int64())}), tmp_path / "data" / "a.parquet")
    pq.write_table(pa.table({"x": pa.array(["1"], pa.string())}), tmp_path / "data" / "b.parquet")
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "b.parquet and" in done.stderr and "a.parquet have different schemas" in done.stderr
    assert "column 'x' is int64 in one and string in the other" in done.stderr


@pytest.mark.parametrize("schema", [None, "any"])
def test_a_stage_whose_output_schema_drifts_fails_unless_it_says_any(tmp_path, schema):
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=1000)
    stage = {"name": "drift", "run": "pystages:drift", "inputs": ["source"]}
    if schema:
        stage["schema"] = schema
    write_spec(tmp_path / "p.yaml", spec([stage], [{"input": "drift", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    if schema == "any":
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 1, done.stderr
    assert "stage 'drift', batch 1: its output schema differs from batch 0's" in done.stderr
    assert "column 'extra' is in one only" in done.stderr


def test_a_tampered_manifest_cannot_write_outside_the_run(tmp_path):
    import msgspec

    from podpipe.runtime.storage import durable
    from podpipe.runtime.storage.store import MemoryStore

    store = MemoryStore()
    evil = durable.Manifest(1, 1, 1, True, {"a": [0]}, [durable.Stored(
        durable.Output("../../../escape", 0, "/x", 1, 1, "00"), "outputs/a/000000-00.arrow"),
        durable.Stored(durable.Output("a", 0, "/x", 1, 1, "00"), "../../secret")])
    store.write("shard-00000/manifest-000001.json", msgspec.json.encode(evil))
    found = durable.latest(store, "shard-00000")
    copies, notes = durable.fetch(found, tmp_path / "run")
    assert copies == [] and len(notes) == 2 and all("not used" in n for n in notes)
    assert not (tmp_path / "escape").exists() and not list(tmp_path.rglob("*.arrow"))


def test_a_corrupt_journal_is_said_and_the_run_resumes_from_the_other_tiers(tmp_path):
    _slow_spec(tmp_path)
    run = _start(tmp_path)
    _running(tmp_path)
    run.kill()
    run.communicate()
    (tmp_path / "run" / "journal.sqlite").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "run" / f"journal.sqlite{suffix}").unlink(missing_ok=True)
    done = podpipe("resume", "run", cwd=tmp_path, SLOW_SECONDS="0.01")
    _sweep_now(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    notes = run_status(tmp_path / "run")["restore_notes"]
    assert any("journal is corrupt" in n for n in notes), notes
    assert (tmp_path / "run" / "journal.sqlite.corrupt").exists()
    assert read_sink(tmp_path / "out")["rows"].to_pylist() == [4000]


@pytest.mark.parametrize("required", [False, True])
def test_a_run_whose_checkpoints_stopped_working_says_so_and_fails_if_they_are_required(
        tmp_path, required):
    store = tmp_path / "store"
    _slow_spec(tmp_path, checkpoints={"durable": f"file://{store}", "everyBatches": 1,
                                      "required": required})
    from conftest import cli_env

    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml",
                            "--run-dir", "run"], cwd=tmp_path,
                           env={**cli_env(SLOW_SECONDS="0.3"), "COLUMNS": "200"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _running(tmp_path)
    import itertools
    for attempt in itertools.count():  # (the run may be writing a checkpoint into it:
        if store.exists():              # moved aside whole, at once, not emptied under it)
            store.rename(tmp_path / f"store-gone-{attempt}")
        try:
            fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue  # (the run made it again meanwhile)
        with os.fdopen(fd, "w") as file:
            file.write("the store's directory is now a file: every write fails")
        break
    out, err = run.communicate(timeout=120)
    final = run_status(tmp_path / "run")
    assert final["durable"]["error"], final["durable"]
    if required:
        assert run.returncode == 1, err
        assert "the last checkpoint could not be written" in err
        assert final["state"] == "failed"
    else:
        assert run.returncode == 0, err
        assert "the last checkpoint to" in out and "was not written" in out


def test_a_stages_message_reaches_the_terminal_as_text_and_the_log_keeps_its_bytes(tmp_path):
    """Markup in an error (`[/x]` once crashed the printer and lost the error; a
    `[link=...]` became a link) and escape sequences (colours, OSC 8 links) are shown
    as text; the stage's log keeps what it wrote."""
    import pty

    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_with_markup", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "MarkupError" not in done.stderr
    assert "bad [/x] [link=http://evil.example]here[/link]" in done.stderr
    assert "\x1b" not in done.stderr and "\\x1b[31mred\\x1b[0m" in done.stderr
    assert "\x1b[31mred" in (tmp_path / "run/logs/boom.log").read_text()  # the raw bytes
    ours, theirs = pty.openpty()  # `podpipe logs` in a terminal
    from conftest import cli_env

    logs = subprocess.run([sys.executable, "-m", "podpipe", "logs", "run", "boom"],
                          cwd=tmp_path, env=cli_env(), stdout=theirs, stderr=subprocess.PIPE,
                          timeout=60)
    os.close(theirs)
    shown = b""
    while True:
        try:
            chunk = os.read(ours, 1 << 16)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    os.close(ours)
    assert logs.returncode == 0, logs.stderr
    assert b"\\x1b[31mred" in shown and b"\x1b[31mred" not in shown


def _give_to_nobody(path: Path) -> None:
    """Make `path` and everything under it another user's (as if they had made it)."""
    for p in [path, *path.rglob("*")]:
        os.chown(p, NOBODY, NOBODY, follow_symlinks=False)


@as_root
def test_another_users_runs_folder_and_latest_do_not_steer_a_resume(tmp_path):
    """Their `.podpipe/runs`, `latest` pointing at their failed run: root's `resume
    latest` (or of the directory itself) ran the code their run names, as root."""
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/"}]))
    make_numbers(tmp_path / "data")
    assert podpipe("run", "p.yaml", "--quiet", cwd=tmp_path).returncode == 1
    theirs = (tmp_path / ".podpipe" / "runs" / "latest").resolve()
    _give_to_nobody(tmp_path / ".podpipe")
    before = sorted(p.name for p in (tmp_path / "out").glob("*"))
    for target in ("latest", str(theirs)):
        done = podpipe("resume", target, "--quiet", cwd=tmp_path, BOOM_AT="-1")
        assert done.returncode == 2, done.stderr
        assert "owned by nobody (uid 65534), not by you" in done.stderr, done.stderr
    assert json.loads((theirs / "status.json").read_text())["state"] == "failed"  # untouched
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == before  # nothing written


@as_root
def test_a_planted_status_does_not_make_stop_signal_the_process_it_names(tmp_path):
    """`stop DIR` on another user's run directory signalled whatever pid its status
    named: here, a process of root's."""
    from podpipe.runtime.data.scratch import process_start

    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "planted",
                   cwd=tmp_path).returncode == 0
    victim = subprocess.Popen(["sleep", "60"])
    try:
        status = json.loads((tmp_path / "planted" / "status.json").read_text())
        status["state"] = "running"
        conductor = next(p for p in status["processes"] if p["role"] == "conductor")
        conductor.update(pid=victim.pid, start=process_start(victim.pid))
        (tmp_path / "planted" / "status.json").write_text(json.dumps(status))
        _give_to_nobody(tmp_path / "planted")
        done = podpipe("stop", "planted", cwd=tmp_path, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "not by you" in done.stderr
        assert victim.poll() is None  # not signalled
    finally:
        victim.kill()
        victim.wait()


@as_root
def test_a_status_writable_by_others_is_not_trusted(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=10)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path).returncode == 0
    assert podpipe("status", "run", cwd=tmp_path).returncode == 0
    os.chmod(tmp_path / "run" / "status.json", 0o666)
    done = podpipe("status", "run", cwd=tmp_path)
    assert done.returncode == 2 and "writable by others" in done.stderr, done.stderr


def _shared_folder() -> Path:
    """A folder every user may write to, as /tmp is (nobody cannot reach pytest's
    tmp_path, root's 0700)."""
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="podpipe-shared-"))
    shared.chmod(0o755)
    (shared / "out").mkdir()
    (shared / "out").chmod(0o1777)
    return shared


@as_root
def test_links_planted_under_a_sinks_temporary_names_are_not_written_through(tmp_path):
    """Another user who may write in the sink's folder plants links under the names
    the run writes, its processes' pids being in `ps`: the part files' and
    `_SUCCESS`'s temporary names. Nothing of root's is overwritten, the output is
    whole."""
    import shutil

    from conftest import start_run

    victim = tmp_path / "victim"
    victim.write_bytes(b"root's own")
    victim.chmod(0o600)
    shared = _shared_folder()
    out = shared / "out"
    make_numbers(tmp_path / "data", files=2, rows=100, row_group=100)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double_gated", "inputs": ["source"]}],
        [{"input": "a", "uri": f"{out}/"}]))
    run = start_run(tmp_path, GATE=str(tmp_path / "gate"))
    try:
        wait_until(lambda: {"conductor", "sink-0"} <= {
            p["stage"] or p["role"] for p in run_status(tmp_path / "run").get("processes", [])},
            "the run's processes")
        pids = {p["stage"] or p["role"]: p["pid"]
                for p in run_status(tmp_path / "run")["processes"]}
        plants = [out / f".part-{b:06d}.parquet.{pids['sink-0']}.tmp" for b in range(2)]
        plants.append(out / f"._SUCCESS.parquet.{pids['conductor']}.tmp")

        def plant() -> bool:
            for link in plants:
                os.symlink(victim, link)
            return True
        assert _as_nobody(plant) == 0
        (tmp_path / "gate").touch()
        _, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    try:
        assert victim.read_bytes() == b"root's own"
        assert run.returncode == 0, err
        assert read_sink(out)["x"].to_pylist() == [2 * x for x in range(200)]
    finally:
        shutil.rmtree(shared)


@as_root
def test_a_staging_link_planted_in_a_sink_is_refused_before_anything_is_written(tmp_path):
    """A planted `_staging` link made a `mode: overwrite` run write into, and delete
    part files from, the folder it points to. Each run now stages in a folder of its
    own: the old name is left alone, and a failed run's staging folder swapped for a
    link (the sink folder writable by all, not sticky) makes its resume refuse."""
    import shutil

    theirs = tmp_path / "roots-output"
    theirs.mkdir()
    (theirs / "part-000005.parquet").write_bytes(b"root's own")
    shared = _shared_folder()
    out = shared / "out"
    out.chmod(0o777)
    make_numbers(tmp_path / "data", files=2, rows=100, row_group=100)
    write_spec(tmp_path / "p.yaml", spec(  # batch 15 fails once a part is staged
        [{"name": "a", "run": "pystages:fail_once_written", "inputs": ["source"]}],
        [{"input": "a", "uri": f"{out}/", "mode": "overwrite"}], batch_rows=10))
    assert _as_nobody(lambda: os.symlink(theirs, out / "_staging") is None) == 0
    try:
        done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                       BOOM_AT="150", WRITTEN=f"{out}/_staging-*/part-*.parquet")
        assert done.returncode == 1, done.stderr
        staging, = out.glob("_staging-*")
        assert list(staging.glob("part-*.parquet"))
        moved = out / "moved"

        def swap() -> bool:
            os.rename(staging, moved)
            os.symlink(theirs, staging)
            return True
        assert _as_nobody(swap) == 0
        done = podpipe("resume", "run", cwd=tmp_path, BOOM_AT="-1")
        assert done.returncode == 2, done.stderr
        assert staging.name in done.stderr and "not written through" in done.stderr
        assert sorted(p.name for p in theirs.iterdir()) == ["part-000005.parquet"]
        assert (theirs / "part-000005.parquet").read_bytes() == b"root's own"
        staging.unlink()  # the owner puts it back: the resume finishes the run
        os.rename(moved, staging)
        done = podpipe("resume", "run", cwd=tmp_path, BOOM_AT="-1")
        assert done.returncode == 0, done.stderr
        assert sorted(read_sink(out)["x"].to_pylist()) == list(range(200))
        assert not list(out.glob("_staging-*"))  # (their `_staging` link left alone)
    finally:
        shutil.rmtree(shared)


