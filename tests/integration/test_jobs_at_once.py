"""A line with `jobs: 2`: the next job starts while the one before drains.

Real processes throughout (the detached line of `podpipe up`, `podpipe submit`).
The older job is held at a gate (its `double` stage waits for a file the test
makes), so that what the younger job does meanwhile is a condition the run cannot
skip, whatever the machine's speed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import cli_env, make_numbers, podpipe, spec, wait_until, write_spec
from test_lines import _line, _sinks, _to


def _spec(workdir: Path) -> None:
    make_numbers(workdir / "data")  # 2 files of 5,000 rows: 10 batches of 1,000
    write_spec(workdir / "p.yaml", spec(
        [{"name": "check", "run": "pystages:fail_while_marked", "inputs": ["source"]},
         {"name": "double", "run": "pystages:double_gated_failing", "inputs": ["check"],
          "workers": 1},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["double"]}],
        [{"name": "doubled", "input": "double", "uri": "out/doubled/"},
         {"name": "summed", "input": "total", "uri": "out/summed/"}], jobs=2))


def _dir(workdir: Path, job: str) -> str:
    return str(workdir / ".podpipe" / "runs" / job)


def _status(workdir: Path, job: str) -> dict:
    return json.loads((Path(_dir(workdir, job)) / "status.json").read_text())


def _done(workdir: Path, job: str, node: str) -> int:
    try:
        return _status(workdir, job)["stages"][node]["batches_done"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0


def _tasks(workdir: Path, job: str) -> list[dict]:
    """Its tasks done, their times made absolute (seconds since the epoch)."""
    started = _status(workdir, job)["started"]
    lines = (workdir / ".podpipe" / "runs" / job / "tasks.jsonl").read_text().splitlines()
    return [{**t, "handed": started + t["handed"], "ended": started + t["ended"]}
            for t in map(json.loads, lines) if t["state"] == "done"]


@pytest.fixture
def line(tmp_path: Path):
    """Line `t` (jobs: 2) up over `_spec`, serving its metrics on the port in
    tmp_path/port, with a reference run's sinks in out/ref."""
    _spec(tmp_path)
    (tmp_path / "open").touch()
    env = {"FAIL_MARKER": str(tmp_path / "no-marker"), "GATE": str(tmp_path / "open")}
    ref = podpipe("run", "p.yaml", "--quiet", *_to("ref"), cwd=tmp_path, **env)
    assert ref.returncode == 0, ref.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "port").write_text(str(port))
    up = podpipe("up", "p.yaml", "--name", "t", "--metrics-port", str(port), cwd=tmp_path,
                 **env)
    assert up.returncode == 0, up.stderr
    yield tmp_path
    if _line(tmp_path)["state"] == "up":
        podpipe("down", "t", cwd=tmp_path)


def _scrape(workdir: Path) -> dict[str, set[str]]:
    """Each series name the line's endpoint serves, and the jobs it is labelled with."""
    port = (workdir / "port").read_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "podpipe_job" in sample.labels:
                found.setdefault(sample.name, set()).add(sample.labels["podpipe_job"])
    return found


def _submit(workdir: Path, name: str, *more: str) -> str:
    done = podpipe("submit", "t", *_to(name), *more, cwd=workdir)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[0]


def _overlapping(workdir: Path, older: tuple[str, ...] = (),
                 younger: tuple[str, ...] = ()) -> tuple[str, str]:
    """Two jobs on the line at once: the older (sinks under out/a, with `older`'s
    `--set`s) held at `double` by the gate file gate-a, the younger (out/b, `younger`'s)
    through its `check` — on the stations the older handed over — on all 10 batches.
    Their ids."""
    first = _submit(workdir, "a", "--set", f"stages.double.env.GATE={workdir / 'gate-a'}",
                    *older)
    wait_until(lambda: _done(workdir, first, "check") == 10, "the older job's check")
    second = _submit(workdir, "b", *younger)
    wait_until(lambda: _done(workdir, second, "check") == 10, "the younger job's check")
    return first, second


def _succeeded(workdir: Path, job: str) -> None:
    """`podpipe wait JOB` exits 0: the job succeeded."""
    done = podpipe("wait", _dir(workdir, job), cwd=workdir)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_next_job_runs_on_the_stations_the_one_before_is_done_with(line: Path):
    workdir = line
    warm = _line(workdir)["processes"]
    # The older job is held at `double`: the younger one's source and check, handed
    # over, take every batch meanwhile, in the same warm processes.
    older, younger = _overlapping(workdir)
    assert _status(workdir, older)["state"] == "running"
    assert _done(workdir, older, "double") == 0 and _done(workdir, younger, "double") == 0
    record = _line(workdir)
    assert record["jobs"]["running"] == older and record["jobs"]["beside"] == [younger]
    assert record["processes"] == warm
    served = _scrape(workdir)  # both jobs' series, each labelled with its id
    assert served["podpipe_batches_done_total"] == {older, younger}
    assert served["podpipe_scratch_bytes"] == {older, younger}
    (workdir / "gate-a").touch()
    for job, name in ((older, "a"), (younger, "b")):
        _succeeded(workdir, job)
        assert _sinks(workdir / "out" / name) == _sinks(workdir / "out" / "ref")
    # Each station served the older job to its end before the younger one.
    first, second = _tasks(workdir, older), _tasks(workdir, younger)
    for node in ("source", "check", "double", "total", "doubled", "summed"):
        assert max(t["ended"] for t in first if t["node"] == node) <= \
            min(t["handed"] for t in second if t["node"] == node), node
    assert _line(workdir)["processes"] == warm


def test_an_older_job_that_fails_leaves_the_younger_one_whole(line: Path):
    workdir = line
    (workdir / "marker").touch()
    older, younger = _overlapping(
        workdir, older=("--set", f"stages.double.env.FAIL_MARKER={workdir / 'marker'}"))
    (workdir / "gate-a").touch()  # the older job's double fails batch 2
    failed = podpipe("wait", _dir(workdir, older), cwd=workdir)
    assert failed.returncode == 1
    assert "double" in failed.stderr + failed.stdout and "batch 2" in failed.stderr + \
        failed.stdout
    _succeeded(workdir, younger)
    assert _sinks(workdir / "out" / "b") == _sinks(workdir / "out" / "ref")
    (workdir / "marker").unlink()
    # back on the line, it redoes what is missing
    again = podpipe("resume", _dir(workdir, older), cwd=workdir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _sinks(workdir / "out" / "a") == _sinks(workdir / "out" / "ref")


def _versions(folder: Path) -> list[list[str]]:
    """Each part file's versions of `double`, in batch order."""
    return [json.loads(pq.read_schema(p).metadata[b"podpipe.versions"])["double"]
            for p in sorted(folder.glob("part-*.parquet"))]


def test_a_swap_while_jobs_overlap_waits_for_the_older_then_swaps_the_younger(line: Path):
    """Held while the older job is on the line, the swap then goes to the younger one
    from its next batch: its `double` (one worker, held at its own gate) made at most
    the batch it was on with the old version."""
    workdir = line
    older, younger = _overlapping(
        workdir, younger=("--set", f"stages.double.env.GATE={workdir / 'gate-b'}"))
    swap = subprocess.Popen([sys.executable, "-m", "podpipe", "swap", "t", "double", "--run",
                             "pystages:double"], cwd=workdir, env=cli_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = workdir / ".podpipe" / "lines" / "t" / "logs" / "line.log"
    wait_until(lambda: "swap of stage 'double' waits until one job is on the line" in
               log.read_text(), "the swap to wait")
    assert swap.poll() is None  # (the older job, held at its gate, is on the line)
    (workdir / "gate-a").touch()
    _succeeded(workdir, older)
    asked = Path(_dir(workdir, younger)) / "logs" / "conductor.log"
    wait_until(lambda: "swap of stage 'double' requested" in asked.read_text(),
               "the swap to reach the younger job")
    (workdir / "gate-b").touch()
    out, err = swap.communicate(timeout=120)
    assert swap.returncode == 0, err
    _succeeded(workdir, younger)
    old, new = _versions(workdir / "out" / "a" / "doubled"), \
        _versions(workdir / "out" / "b" / "doubled")
    assert len(old) == len(new) == 10 and len({v[0] for v in old}) == 1
    assert new[1:] == [new[-1]] * 9 and new[-1] != old[0] and new[0] in (old[0], new[-1])
    for name in ("a", "b"):
        assert pq.read_table(workdir / "out" / name / "doubled").equals(
            pq.read_table(workdir / "out" / "ref" / "doubled"))


def test_a_line_killed_while_jobs_overlap_comes_back_and_finishes_both(line: Path):
    workdir = line
    older, younger = _overlapping(workdir)
    first = _line(workdir)
    os.kill(first["pid"], signal.SIGKILL)
    wait_until(lambda: _line(workdir)["pid"] != first["pid"]
               and _line(workdir)["state"] == "up", "the line to come back")
    (workdir / "gate-a").touch()
    for job, name in ((older, "a"), (younger, "b")):
        _succeeded(workdir, job)
        assert _sinks(workdir / "out" / name) == _sinks(workdir / "out" / "ref")


def test_a_table_changed_while_an_older_job_reads_it_is_each_jobs_own(tmp_path: Path):
    """The younger job loads the changed table anew; the older one reads the table it
    loaded to its end; once both are over, only the newer table stays in RAM."""
    import pyarrow as pa

    make_numbers(tmp_path / "data")
    codes = tmp_path / "codes.parquet"
    pq.write_table(pa.table({"k": range(10), "label": [f"L{k}" for k in range(10)]}), codes)
    document = spec([{"name": "labelled", "run": "pystages:with_label_gated", "workers": 1,
                      "inputs": ["source", "codes"]}], [{"input": "labelled", "uri": "out/x/"}],
                    jobs=2)
    document["spec"]["tables"] = [{"name": "codes", "uri": "codes.parquet"}]
    write_spec(tmp_path / "p.yaml", document)
    (tmp_path / "open").touch()
    up = podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path, GATE=str(tmp_path / "open"))
    assert up.returncode == 0, up.stderr
    try:
        older = podpipe("submit", "t", "--set", "sinks.0.uri=out/a/", "--set",
                        f"stages.labelled.env.GATE={tmp_path / 'gate-a'}",
                        cwd=tmp_path).stdout.split()[0]
        wait_until(lambda: _done(tmp_path, older, "source") == 10, "the older job's source")
        pq.write_table(pa.table({"k": range(10), "label": [f"M{k}" for k in range(10)]}),
                       codes)
        os.utime(codes, (1, 1))  # (another size or time: the files' identity changed)
        younger = podpipe("submit", "t", "--set", "sinks.0.uri=out/b/",
                          cwd=tmp_path).stdout.split()[0]
        wait_until(lambda: _done(tmp_path, younger, "codes") == 1, "the younger job's table")
        (tmp_path / "gate-a").touch()
        for job in (older, younger):
            _succeeded(tmp_path, job)
        for name, letter in (("a", "L"), ("b", "M")):
            labels = set(pq.read_table(tmp_path / "out" / name).column("label").to_pylist())
            assert {label[0] for label in labels} == {letter}, (name, labels)
        scratch = Path(_line(tmp_path)["socket"]).parent
        kept = [p for p in (scratch / "jobs").rglob("*.arrow")]
        assert [p.parent.parent.parent.name.split(".")[0] for p in kept] == [younger], kept
    finally:
        podpipe("down", "t", cwd=tmp_path)


def test_a_change_whose_command_gave_up_waiting_is_dropped(line: Path):
    workdir = line
    older, younger = _overlapping(workdir)
    swap = podpipe("swap", "t", "double", "--run", "pystages:double", "--timeout", "1",
                   cwd=workdir)
    assert swap.returncode != 0 and "no answer" in swap.stderr, swap.stderr
    (workdir / "gate-a").touch()
    for job in (older, younger):
        _succeeded(workdir, job)
    assert _versions(workdir / "out" / "a" / "doubled") == \
        _versions(workdir / "out" / "b" / "doubled")  # the younger: not swapped
    assert "swap of stage 'double' requested" not in \
        (Path(_dir(workdir, younger)) / "logs" / "conductor.log").read_text()
