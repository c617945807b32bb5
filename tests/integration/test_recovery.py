"""Failures and what survives them: a dead conductor, a lost pod, a corrupt copy.

The pipeline: source -> slow -> double -> (per-batch sink, and a reduce -> sink).
A batch is finished for good once its `double` output (what the reduce reads) is
kept in some tier and its per-batch sink file is written; `podpipe resume` runs
only the other batches again. Every case ends with the undisturbed run's bytes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import cli_env, make_numbers, podpipe, run_status, spec, write_spec

BATCHES, ROWS = 10, 1000


def _spec(workdir: Path) -> Path:
    make_numbers(workdir / "data")  # 10 batches of 1000 rows
    return write_spec(workdir / "p.yaml", spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
         {"name": "double", "run": "pystages:double", "inputs": ["slow"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["double"]}],
        [{"name": "doubled", "input": "double", "uri": "out/doubled/"},
         {"name": "summed", "input": "total", "uri": "out/summed/"}]))


def _output(workdir: Path) -> dict[str, bytes]:
    out = workdir / "out"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}


@pytest.fixture
def expected(tmp_path: Path) -> dict[str, bytes]:
    clean = tmp_path / "clean"
    clean.mkdir()
    _spec(clean)
    done = podpipe("run", "p.yaml", "--quiet", cwd=clean, SLOW_SECONDS="0")
    assert done.returncode == 0, done.stderr
    result = _output(clean)
    assert len(result) == BATCHES + 1
    return result


def _start(workdir: Path, slow: str = "0.15", **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run"], cwd=workdir,
                            env=cli_env(SLOW_SECONDS=slow, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _status(workdir: Path) -> dict:
    try:
        return json.loads((workdir / "run" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _kill_conductor_when(run: subprocess.Popen, workdir: Path, until) -> dict:
    """SIGKILL the conductor once `until()`; returns the status it last wrote."""
    deadline = time.monotonic() + 60
    while not until():
        assert run.poll() is None, run.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = _status(workdir)
    run.kill()
    run.communicate()
    _wait_gone([p["pid"] for p in before["processes"]])
    return before


def _kill_conductor_after(run: subprocess.Popen, workdir: Path, batches: int) -> dict:
    """SIGKILL the conductor once `batches` per-batch sink files are written and as
    many node-tier copies journaled."""
    def enough() -> bool:
        status = _status(workdir)
        return (status.get("stages", {}).get("doubled", {}).get("batches_done", 0) >= batches
                and status.get("node_tier", {}).get("copies", 0) >= batches)
    return _kill_conductor_when(run, workdir, enough)


def _wait_gone(pids: list[int]) -> None:
    deadline = time.monotonic() + 10
    for pid in pids:
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"process {pid} outlived its conductor"
            time.sleep(0.02)


def _resume(workdir: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = podpipe("resume", "run", *flags, cwd=workdir, SLOW_SECONDS="0.01")
    return done, _status(workdir)


def test_after_the_conductor_dies_resume_finishes_from_ram_without_redoing_batches(
        tmp_path, expected):
    workdir = tmp_path / "w"
    _spec(workdir)
    run = _start(workdir)
    before = _kill_conductor_after(run, workdir, 4)
    assert Path(before["scratch"]).is_dir()  # the pod is still there: RAM survived
    done, after = _resume(workdir)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    double = after["stages"]["double"]
    kept = double["restored"]["ram"]
    assert kept >= 4 and double["restored"]["node"] == 0
    assert double["rows_in"] == ROWS * (BATCHES - kept)  # only the others ran
    assert after["stages"]["doubled"]["recomputed"] == 0  # no written batch again
    assert after["state"] == "succeeded" and not Path(after["scratch"]).exists()


def test_after_the_pod_is_lost_resume_finishes_from_the_node_tier(tmp_path, expected):
    workdir = tmp_path / "w"
    _spec(workdir)
    run = _start(workdir)
    before = _kill_conductor_after(run, workdir, 4)
    shutil.rmtree(before["scratch"])  # the pod's RAM is gone
    done, after = _resume(workdir)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    double = after["stages"]["double"]
    assert double["restored"]["ram"] == 0 and double["restored"]["node"] >= 4
    assert double["rows_in"] == ROWS * (BATCHES - double["restored"]["node"])
    # the report says what came from which tier, and shows both conductors' tasks
    assert podpipe("report", "run", cwd=workdir).returncode == 0
    page = (workdir / "run" / "report.html").read_text()
    restored = re.search(r"<tr><td>double</td><td>(\d+)</td><td>(\d+)</td>", page)
    assert restored and int(restored.group(2)) == double["restored"]["node"]
    assert "<h2>Resumed</h2>" in page


def test_a_corrupt_copy_is_detected_by_checksum_and_its_batch_computed_again(tmp_path,
                                                                            expected):
    workdir = tmp_path / "w"
    _spec(workdir)
    run = _start(workdir)
    before = _kill_conductor_after(run, workdir, 4)
    shutil.rmtree(before["scratch"])
    copy = sorted((workdir / "run" / "node" / "double").glob("*.arrow"))[1]
    copy.write_bytes(copy.read_bytes()[:-7])  # truncated on a bad disk
    done, after = _resume(workdir)
    assert done.returncode == 0, done.stderr
    said = f"double batch {int(copy.stem)}: the node copy is corrupt"
    assert "resumed: " in done.stdout and " note in " in done.stdout  # a line; the log says
    assert said in (workdir / "run" / "logs" / "conductor.log").read_text()  # which
    assert any(said in note for note in after["restore_notes"])
    assert _output(workdir) == expected
    double = after["stages"]["double"]
    assert double["recomputed"] >= 1


@pytest.mark.parametrize("reuse,determinism", [(False, "off"), (True, "off"),
                                               (False, "warn")])
def test_only_outputs_a_copy_is_checked_against_are_hashed(tmp_path, reuse, determinism):
    """What the reduce reads is kept on the node tier, checked by its checksum on a
    resume; an output read once and deleted is never checked: with `checks.determinism:
    off` it is not hashed, unless outputs are reused across runs (keyed by their
    inputs' checksums); by default every output is (a batch made again is compared)."""
    workdir = tmp_path / "w"
    _spec(workdir)
    args = ["--set", f"checkpoints.durable=file://{workdir}/durable",
            "--set", "checkpoints.reuse=true"] if reuse else []
    args += ["--set", f"checks.determinism={determinism}"]
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", *args, cwd=workdir,
                   SLOW_SECONDS="0")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(workdir / "run" / "journal.sqlite") as db:
        rows = db.execute("SELECT node, checksum FROM outputs WHERE tier = 'ram'").fetchall()
    checksums = {node: {c for n, c in rows if n == node} for node, _ in rows}
    assert all(re.fullmatch(r"[0-9a-f]{16}", c) for c in checksums["double"])
    assert len(checksums["double"]) == BATCHES
    if reuse or determinism != "off":
        assert all(re.fullmatch(r"[0-9a-f]{16}", c) for c in checksums["slow"])
    else:
        assert checksums["slow"] == {""}


@pytest.mark.parametrize("setup,message", [
    ("succeeded", "already succeeded; nothing to resume"),
    ("missing", "not a podpipe run directory"),
])
def test_resume_refuses_what_it_cannot_resume(tmp_path, setup, message):
    workdir = tmp_path / "w"
    _spec(workdir)
    if setup == "succeeded":
        assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir,
                       SLOW_SECONDS="0").returncode == 0
    done = podpipe("resume", "run", cwd=workdir)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr


def test_run_into_a_run_directory_that_holds_a_run_points_to_resume(tmp_path):
    workdir = tmp_path / "w"
    _spec(workdir)
    run = _start(workdir)
    _kill_conductor_after(run, workdir, 2)
    done = podpipe("run", "p.yaml", "--run-dir", "run", cwd=workdir)
    assert done.returncode == 2 and "podpipe resume run" in done.stderr


def test_chaos_kill_a_random_process_at_a_random_moment_then_resume(tmp_path, expected):
    """Kill -9 the conductor or a stage process at a random moment; resume until the run
    succeeds. PODPIPE_CHAOS_RUNS sets how many times (default 20)."""
    rng = random.Random(int(os.environ.get("PODPIPE_CHAOS_SEED", "7")))
    for attempt in range(int(os.environ.get("PODPIPE_CHAOS_RUNS", "20"))):
        workdir = tmp_path / f"chaos-{attempt}"
        _spec(workdir)
        run = _start(workdir, slow="0.05")
        time.sleep(rng.uniform(0.3, 1.5))
        processes = _status(workdir).get("processes", [])
        victim = rng.choice(processes) if processes else None
        if victim is not None and run.poll() is None:
            try:
                os.kill(victim["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.communicate(timeout=60)
        for _ in range(3):
            if _status(workdir).get("state") == "succeeded":
                break
            if victim and victim["role"] == "conductor":
                _wait_gone([p["pid"] for p in processes])
            done, _ = _resume(workdir, "--quiet")
            assert done.returncode == 0, (attempt, victim, done.stderr)
        assert _status(workdir)["state"] == "succeeded", (attempt, victim)
        assert _output(workdir) == expected, (attempt, victim)
        shutil.rmtree(workdir)


# -- the durable tier ------------------------------------------------------------------


def _durable_spec(workdir: Path, url: str) -> Path:
    path = _spec(workdir)
    document = yaml.safe_load(path.read_text())
    document["spec"]["checkpoints"] = {"durable": url, "everyBatches": 2, "interval": 0.5}
    return write_spec(path, document)


def _manifests(store: Path) -> list[Path]:
    return sorted(store.rglob("manifest-*.json"))


def _lose_the_node(run: subprocess.Popen, workdir: Path, until) -> None:
    """Run until `until()`, then lose the node: processes, RAM scratch, run directory."""
    before = _kill_conductor_when(run, workdir, until)
    shutil.rmtree(before["scratch"], ignore_errors=True)
    shutil.rmtree(workdir / "run")


def test_after_the_node_is_lost_the_same_run_starts_from_the_durable_checkpoint(
        tmp_path, expected):
    workdir, store = tmp_path / "w", tmp_path / "store"
    _durable_spec(workdir, f"file://{store}")
    run = _start(workdir)
    _lose_the_node(run, workdir, lambda: len(_manifests(store)) >= 2)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir,
                   SLOW_SECONDS="0.01")
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    after = _status(workdir)
    restored = after["stages"]["double"]["restored"]
    assert restored["durable"] >= 2 and restored["ram"] == restored["node"] == 0
    assert after["stages"]["double"]["rows_in"] == ROWS * (BATCHES - restored["durable"])
    assert len(_manifests(store)) <= 3  # checkpoints.keep


def test_run_fresh_ignores_the_durable_checkpoints(tmp_path, expected):
    workdir, store = tmp_path / "w", tmp_path / "store"
    _durable_spec(workdir, f"file://{store}")
    run = _start(workdir)
    _lose_the_node(run, workdir, lambda: len(_manifests(store)) >= 1)
    done = podpipe("run", "p.yaml", "--quiet", "--fresh", "--run-dir", "run", cwd=workdir,
                   SLOW_SECONDS="0")
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    double = _status(workdir)["stages"]["double"]
    assert double["restored"] == {"ram": 0, "node": 0, "durable": 0}
    assert double["rows_in"] == ROWS * BATCHES


@pytest.fixture
def s3():
    from benchmarks.paradigms import MotoServer

    with MotoServer() as server:
        env = {**os.environ, **server.env}
        subprocess.run([sys.executable, "-c", "import fsspec; fsspec.filesystem('s3')"
                        ".mkdir('checkpoints')"], env=env, check=True)
        yield server


def test_over_s3_a_lost_node_resumes_from_the_object_store(tmp_path, expected, s3):
    workdir = tmp_path / "w"
    _durable_spec(workdir, "s3://checkpoints/runs")
    run = _start(workdir, **s3.env)
    _lose_the_node(run, workdir, lambda: (_status(workdir).get("durable") or {}).get(
        "checkpoints", 0) >= 2)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir,
                   SLOW_SECONDS="0.01", **s3.env)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    assert _status(workdir)["stages"]["double"]["restored"]["durable"] >= 2


def test_when_the_store_goes_down_the_run_goes_on_and_says_checkpoints_are_behind(
        tmp_path, expected, s3):
    workdir = tmp_path / "w"
    _durable_spec(workdir, "s3://checkpoints/down")
    run = _start(workdir, **s3.env)
    deadline = time.monotonic() + 60
    while (_status(workdir).get("durable") or {}).get("checkpoints", 0) < 1:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    s3.process.kill()  # the store is gone mid-run
    s3.process.wait()
    _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    assert _output(workdir) == expected
    durable = _status(workdir)["durable"]
    assert durable["behind"]  # its last checkpoints never reached the store


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_resume_over_a_changed_source_is_refused_and_redone_whole_if_accepted(tmp_path,
                                                                               replicas):
    """The source rewritten between a failure and `resume` (same files, same batches,
    other values): the resume mixed old and new data and exited 0 — with several
    replicas too, whose pods resume from their durable checkpoints."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import read_sink

    make_numbers(tmp_path / "data")  # x = 0 .. 9,999 in two files
    document = spec([{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
                    [{"input": "boom", "uri": "out/"}], shards=replicas)
    document["spec"]["checkpoints"] = {"everyBatches": 1, "interval": 0.2}
    write_spec(tmp_path / "p.yaml", document)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", "--replicas", str(replicas),
                   cwd=tmp_path, BOOM_AT="7500")  # the second file's middle: its first
    # batches are done (with two replicas, in both pods: one fails, the other finishes)
    assert done.returncode == 1, done.stderr
    for i in range(2):  # the same shape, x doubled
        pq.write_table(pa.table({"x": pa.array(range(2 * i * 5000, 2 * (i + 1) * 5000, 2),
                                               pa.int64())}),
                       tmp_path / "data" / f"part-{i}.parquet", row_group_size=1000)
    done = podpipe("resume", "run", "--quiet", cwd=tmp_path, BOOM_AT="-1")
    assert done.returncode == 2, done.stderr
    assert "the source changed since the run started" in done.stderr
    assert "part-0.parquet" in done.stderr and "--accept-changed-source" in done.stderr
    done = podpipe("resume", "run", "--quiet", "--accept-changed-source", cwd=tmp_path,
                   BOOM_AT="-1")
    assert done.returncode == 0, done.stderr
    assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == list(range(0, 20_000, 2))


def test_a_durable_checkpoint_of_another_source_is_not_used(tmp_path):
    """A run on another node starts from the durable tier's checkpoints of the same
    spec: made before the source was rewritten, they would mix old data into the new
    run. Each records the source it was made from; one of another is not used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import read_sink

    make_numbers(tmp_path / "data")
    document = spec([{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]},
                     {"name": "total", "run": "pystages:sum_all", "reduce": True,
                      "inputs": ["boom"]}],
                    [{"input": "total", "uri": "out/"}])
    document["spec"]["checkpoints"] = {"everyBatches": 1, "interval": 0.2,
                                       "durable": f"file://{tmp_path / 'store'}"}
    write_spec(tmp_path / "p.yaml", document)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "lost", cwd=tmp_path,
                   BOOM_AT="7500")
    assert done.returncode == 1, done.stderr
    assert list((tmp_path / "store").rglob("manifest-*.json"))
    for i in range(2):  # the same shape, x doubled
        pq.write_table(pa.table({"x": pa.array(range(2 * i * 5000, 2 * (i + 1) * 5000, 2),
                                               pa.int64())}),
                       tmp_path / "data" / f"part-{i}.parquet", row_group_size=1000)
    done = podpipe("run", "p.yaml", "--run-dir", "again", cwd=tmp_path, BOOM_AT="-1")
    assert done.returncode == 0, done.stderr
    assert read_sink(tmp_path / "out")["sum"].to_pylist() == [sum(range(0, 20_000, 2))]
    notes = run_status(tmp_path / "again")["restore_notes"]
    assert any("made from another source" in note for note in notes), notes
    assert "made from another source" in (tmp_path / "again" / "logs" / "conductor.log"
                                          ).read_text()


def test_a_run_killed_before_its_first_status_is_listed_and_resumed(tmp_path):
    """A conductor killed in its first moments left a run directory without
    `status.json` (nor a journal): `runs` never listed it and `resume` refused it. It
    is listed as interrupted, and a resume runs it from nothing."""
    from conftest import read_sink

    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", cwd=tmp_path).returncode == 0
    run_dir = (tmp_path / ".podpipe" / "runs" / "latest").resolve()
    for name in ("status.json", "journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"):
        (run_dir / name).unlink(missing_ok=True)  # as the killed conductor left it
    shutil.rmtree(tmp_path / "out")
    listed = json.loads(podpipe("runs", "--json", cwd=tmp_path).stdout)
    assert [(Path(r["run_dir"]).name, r["state"]) for r in listed] == [
        (run_dir.name, "interrupted")]
    done = podpipe("resume", "latest", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == [2 * x for x in range(10_000)]


def test_a_stages_own_child_left_by_a_killed_conductor_is_ended_by_the_resume(tmp_path):
    """A stage's child (here `sleep 300`, started by the stage's code) outlived a
    killed conductor — the subreaper that would have ended it — and its resume."""
    from conftest import read_sink, start_run, wait_until

    make_numbers(tmp_path / "data", files=1, rows=1000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "a", "run": "pystages:spawns_a_sleeper_gated", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}]))
    child_file = tmp_path / "child.pid"
    env = {"GATE": str(tmp_path / "gate"), "CHILD_PID": str(child_file)}
    run = start_run(tmp_path, **env)
    wait_until(child_file.exists, "the stage's child")
    child = int(child_file.read_text())
    stages = [p["pid"] for p in json.loads((tmp_path / "run" / "status.json").read_text())
              ["processes"] if p["role"] == "stage"]

    def alive(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        run.kill()  # the conductor
        run.communicate()
        wait_until(lambda: not any(alive(p) for p in stages), "the stage processes to die")
        assert alive(child)  # what the conductor would have ended
        (tmp_path / "gate").touch()
        done = podpipe("resume", "run", "--quiet", cwd=tmp_path, **env)
        assert done.returncode == 0, done.stderr
        assert not alive(child)
        assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == \
            [2 * x for x in range(1000)]
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
