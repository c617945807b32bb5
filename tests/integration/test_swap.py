"""Swapping a stage's version while the run goes: `podpipe swap`, real processes.

The pipeline: source -> slow -> tag (marks each row with its version) -> sink, ten
batches. The swap replaces only `tag`'s process; the conductor and the other
stages keep running, and every batch is written once, by one version.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (cli_env, make_numbers, podpipe, run_status, spec, wait_until,
                      write_spec)

BATCHES = 10


def _start(workdir: Path, slow: str = "0.3", tag: str = "pystages:tag_v1",
           reduce: bool = False) -> subprocess.Popen:
    make_numbers(workdir / "data")
    # One worker each: the run must still be going, batch after batch, when the test
    # swaps (`workers: auto` would give the sleeping stage a worker per batch).
    stages = [{"name": "slow", "run": "pystages:slow", "inputs": ["source"], "workers": 1},
              {"name": "tag", "run": tag, "inputs": ["slow"], "workers": 1}]
    sinks = [{"input": "tag", "uri": "out/"}]
    if reduce:
        stages.append({"name": "versions", "run": "pystages:count_versions", "reduce": True,
                       "inputs": ["tag"]})
        sinks.append({"input": "versions", "uri": "counts/"})
    write_spec(workdir / "p.yaml", spec(stages, sinks))
    return _launch(workdir, SLOW_SECONDS=slow)


def _launch(workdir: Path, **env: str) -> subprocess.Popen:
    """`podpipe run p.yaml` in `workdir`; its `slow` stage sleeps 0.3 s a batch unless
    `SLOW_SECONDS` says otherwise."""
    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run"], cwd=workdir,
                            env=cli_env(**{"SLOW_SECONDS": "0.3", **env}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _two_batches_through_tag(workdir: Path) -> None:
    wait_until(lambda: _status(workdir).get("stages", {}).get("tag", {})
               .get("batches_done", 0) >= 2, "two batches through tag")


def _status(workdir: Path) -> dict:
    return run_status(workdir / "run")


def _pids(status: dict) -> dict[str, int]:
    return {p["stage"] or "conductor": p["pid"] for p in status["processes"]}


def _versions_written(workdir: Path) -> list[str]:
    """Per sink file, in batch order: the one version its rows carry."""
    versions = []
    for path in sorted((workdir / "out").glob("part-*.parquet")):
        tags = set(pq.read_table(path)["version"].to_pylist())
        assert len(tags) == 1, (path, tags)
        versions.append(tags.pop())
    return versions


def test_a_swap_mid_run_changes_later_batches_and_nothing_else(tmp_path):
    run = _start(tmp_path)
    wait_until(lambda: _status(tmp_path).get("stages", {}).get("tag", {})
              .get("batches_done", 0) >= 3, "three batches through tag")
    before = _pids(_status(tmp_path))
    done = podpipe("swap", "run", "tag", "--run", "pystages:tag_v2", "--version", "v2",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "now runs version v2" in done.stdout
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    after = _status(tmp_path)
    pids = _pids(after)
    assert {k: v for k, v in pids.items() if k != "tag"} == \
        {k: v for k, v in before.items() if k != "tag"}  # conductor and others unchanged
    assert pids["tag"] != before["tag"]
    written = _versions_written(tmp_path)
    assert len(written) == BATCHES  # none lost, none twice (one file per batch)
    switch = written.index("v2")
    assert switch >= 3 and written == ["v1"] * switch + ["v2"] * (BATCHES - switch)
    assert pq.read_table(tmp_path / "out").num_rows == 10_000
    tag = after["stages"]["tag"]
    assert tag["version"] == "v2"
    old = next(v for v in tag["versions"] if v != "v2")
    assert old.startswith("src-") and tag["versions"] == {old: switch, "v2": BATCHES - switch}
    # Each sink file, and the journal, record the versions that made it.
    first = pq.read_schema(tmp_path / "out" / "part-000000.parquet").metadata
    last = pq.read_schema(tmp_path / "out" / f"part-{BATCHES - 1:06d}.parquet").metadata
    assert json.loads(first[b"podpipe.versions"])["tag"] == [old]
    assert json.loads(last[b"podpipe.versions"])["tag"] == ["v2"]
    with sqlite3.connect(tmp_path / "run" / "journal.sqlite") as db:
        journaled = dict(db.execute("SELECT batch, version FROM done WHERE node='tag'"))
    assert [journaled[b] for b in range(BATCHES)] == \
        [old] * switch + ["v2"] * (BATCHES - switch)


def test_a_broken_version_holds_the_stage_and_a_swap_back_finishes_the_run(tmp_path):
    run = _start(tmp_path)
    _two_batches_through_tag(tmp_path)
    done = podpipe("swap", "run", "tag", "--run", "pystages:tag_broken", "--version", "v3",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # it started; it fails on its first batch
    wait_until(lambda: _status(tmp_path)["stages"]["tag"]["held"], "the stage to be held")
    held = _status(tmp_path)
    assert held["state"] == "running" and run.poll() is None  # held, not failed
    assert "version 3 is broken on purpose" in held["stages"]["tag"]["held"]
    back = podpipe("swap", "run", "tag", "--run", "pystages:tag_v1", "--version", "v1",
                   "--now", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    written = _versions_written(tmp_path)
    assert len(written) == BATCHES and set(written) == {"v1"}  # nothing lost
    assert pq.read_table(tmp_path / "out").num_rows == 10_000
    assert "v3" not in _status(tmp_path)["stages"]["tag"]["versions"]  # it did no batch


def test_a_version_that_cannot_start_is_reported_and_held(tmp_path):
    run = _start(tmp_path)
    wait_until(lambda: _status(tmp_path).get("stages", {}).get("tag", {})
              .get("batches_done", 0) >= 1, "a batch through tag")
    done = podpipe("swap", "run", "tag", "--run", "pystages:no_such_function",
                   cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "the new version failed" in done.stderr and "swap it back" in done.stderr
    assert _status(tmp_path)["state"] == "running"
    back = podpipe("swap", "run", "tag", "--run", "pystages:tag_v1", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert _versions_written(tmp_path) == ["v1"] * BATCHES


@pytest.mark.parametrize("args, message", [
    (["nope", "--run", "pystages:tag_v2"], "no stage 'nope'"),
    (["tag", "--run", "not a callable"], "expected a Python callable"),
])
def test_bad_swaps_are_refused_with_exit_2_and_the_run_goes_on(tmp_path, args, message):
    run = _start(tmp_path, slow="0.1")
    wait_until(lambda: _status(tmp_path).get("state") == "running", "the run to start")
    done = podpipe("swap", "run", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert _versions_written(tmp_path) == ["v1"] * BATCHES
    after = podpipe("swap", "run", "tag", "--run", "pystages:tag_v2", cwd=tmp_path)
    assert after.returncode == 2 and "not running" in after.stderr


def test_swap_k8s_prints_the_image_patch(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "tag", "run": "pystages:tag_v1", "inputs": ["source"]}],
        [{"input": "tag", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run",
                   cwd=tmp_path).returncode == 0
    done = podpipe("swap", "run", "tag", "--image", "registry/tag:2", "--k8s", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    patch = json.loads(done.stdout)
    assert patch[0]["op"] == "test" and patch[0]["value"] == "tag"
    assert patch[1]["op"] == "replace" and patch[1]["value"] == "registry/tag:2"
    assert patch[1]["path"].endswith("/image")


def _files(workdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(workdir)): p.read_bytes()
            for folder in ("out", "counts") for p in sorted((workdir / folder).glob("part-*.parquet"))}


def test_recompute_ends_exactly_as_a_clean_run_of_the_new_version(tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    first = _start(clean, slow="0", tag="pystages:tag_v2", reduce=True)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    expected = _files(clean)
    assert len(expected) == BATCHES + 1
    work = tmp_path / "w"
    work.mkdir()
    run = _start(work, reduce=True)
    wait_until(lambda: _status(work).get("stages", {}).get("tag", {})
               .get("batches_done", 0) >= 4, "four batches through tag")
    done = podpipe("swap", "run", "tag", "--run", "pystages:tag_v2", "--recompute",
                   cwd=work)
    assert done.returncode == 0, done.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert _files(work) == expected  # the per-batch files and the reduce's, byte for byte
    tag = _status(work)["stages"]["tag"]
    assert sum(tag["versions"].values()) > BATCHES  # the old version's batches, redone
    with sqlite3.connect(work / "run" / "journal.sqlite") as db:
        versions = {v for (v,) in db.execute("SELECT version FROM done WHERE node='tag'")}
    assert versions == {tag["version"]}  # what the old version made is forgotten


# -- apply ---------------------------------------------------------------------------


def _spec_with(workdir: Path, name: str, stages: list[dict], sinks: list[dict]) -> Path:
    return write_spec(workdir / name, spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"], "workers": 1},
         {"name": "tag", "run": "pystages:tag_v1", "inputs": ["slow"], "workers": 1},
         *stages],
        [{"input": "tag", "uri": "out/"}, *sinks]))


def test_apply_adds_a_stage_and_removes_one_mid_run(tmp_path):
    make_numbers(tmp_path / "data")
    _spec_with(tmp_path, "p.yaml", [{"name": "plus", "run": "pystages:plus_one",
                                     "inputs": ["slow"]}],
               [{"name": "plus-out", "input": "plus", "uri": "plus/"}])
    new = _spec_with(tmp_path, "new.yaml", [{"name": "twice", "run": "pystages:double",
                                             "inputs": ["slow"]}],
                     [{"name": "twice-out", "input": "twice", "uri": "twice/"}])
    run = _launch(tmp_path)
    _two_batches_through_tag(tmp_path)
    before = _pids(_status(tmp_path))
    done = podpipe("apply", "run", str(new), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "added twice, twice-out; removed plus, plus-out" in done.stdout
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    after = _status(tmp_path)
    assert set(after["stages"]) == {"source", "slow", "tag", "twice", "sink-0", "twice-out"}
    assert all(s["batches_done"] == s["batches_total"] == BATCHES
               for s in after["stages"].values())
    pids = _pids(after)
    assert all(pids[n] == before[n] for n in ("conductor", "source", "slow", "tag", "sink-0"))
    # The added stage got every batch, some of them from the source again.
    twice = pq.read_table(tmp_path / "twice")
    assert sorted(twice["x"].to_pylist()) == [2 * x for x in range(10_000)]
    assert len(list((tmp_path / "twice").glob("part-*.parquet"))) == BATCHES
    assert len(list((tmp_path / "plus").glob("part-*.parquet"))) < BATCHES  # stopped
    assert _versions_written(tmp_path) == ["v1"] * BATCHES  # the rest went on untouched
    assert (tmp_path / "run" / "spec.yaml").read_text() == new.read_text()


def test_apply_adds_a_table_and_a_stage_that_reads_it_mid_run(tmp_path):
    import pyarrow as pa

    make_numbers(tmp_path / "data")
    pq.write_table(pa.table({"k": range(10), "label": [f"L{k}" for k in range(10)]}),
                   tmp_path / "codes.parquet")
    _spec_with(tmp_path, "p.yaml", [], [])
    new = write_spec(tmp_path / "new.yaml", {**spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"], "workers": 1},
         {"name": "tag", "run": "pystages:tag_v1", "inputs": ["slow"], "workers": 1},
         {"name": "labelled", "run": "pystages:with_label", "inputs": ["slow", "codes"]}],
        [{"input": "tag", "uri": "out/"},
         {"name": "labelled-out", "input": "labelled", "uri": "labelled/"}])})
    document = json.loads(json.dumps(__import__("yaml").safe_load(new.read_text())))
    document["spec"]["tables"] = [{"name": "codes", "uri": "codes.parquet"}]
    write_spec(new, document)
    run = _launch(tmp_path)
    _two_batches_through_tag(tmp_path)
    done = podpipe("apply", "run", str(new), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "added codes, labelled, labelled-out" in done.stdout
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    after = _status(tmp_path)
    assert after["stages"]["codes"]["kind"] == "table"
    assert after["stages"]["codes"]["batches_done"] == 1
    labelled = pq.read_table(tmp_path / "labelled")
    assert sorted(labelled.to_pylist(), key=lambda r: r["x"]) == [
        {"x": x, "label": f"L{x % 10}"} for x in range(10_000)]
    assert _versions_written(tmp_path) == ["v1"] * BATCHES  # the rest went on untouched


def test_apply_gives_a_stage_more_workers_and_takes_them_back_mid_run(tmp_path):
    make_numbers(tmp_path / "data")

    def spec_with(name: str, workers: int) -> Path:  # tag waits for the gate after 3
        return write_spec(tmp_path / name, spec(
            [{"name": "slow", "run": "pystages:slow", "inputs": ["source"], "workers": workers},
             {"name": "tag", "run": "pystages:tag_v1_then_gated", "inputs": ["slow"],
              "workers": 1}],
            [{"input": "tag", "uri": "out/"}]))
    spec_with("p.yaml", 1)
    more = spec_with("more.yaml", 3)
    run = _launch(tmp_path, SLOW_SECONDS="0.1", GATE=str(tmp_path / "gate"))
    try:
        wait_until(lambda: _status(tmp_path).get("stages", {}).get("slow", {})
                   .get("batches_done", 0) >= 1, "a batch through slow")
        done = podpipe("apply", "run", str(more), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "resized slow" in done.stdout and "changed" not in done.stdout
        wait_until(lambda: _status(tmp_path)["stages"]["slow"]["workers"] == 3, "three workers")
        done = podpipe("apply", "run", "p.yaml", cwd=tmp_path)  # and back to one
        assert done.returncode == 0, done.stderr
        wait_until(lambda: _status(tmp_path)["stages"]["slow"]["workers"] == 1, "one worker")
    finally:
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    slow = _status(tmp_path)["stages"]["slow"]
    assert slow["workers_max"] == 3 and slow["workers"] == 1
    assert slow["batches_done"] == BATCHES and slow["restarts"] == 0
    assert sorted(pq.read_table(tmp_path / "out")["x"].to_pylist()) == list(range(10_000))


def test_apply_swaps_a_changed_stage(tmp_path):
    run = _start(tmp_path)
    _two_batches_through_tag(tmp_path)
    new = write_spec(tmp_path / "new.yaml", spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
         {"name": "tag", "run": "pystages:tag_v2", "inputs": ["slow"]}],
        [{"input": "tag", "uri": "out/"}]))
    done = podpipe("apply", "run", str(new), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "changed tag" in done.stdout
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    written = _versions_written(tmp_path)
    switch = written.index("v2")
    assert switch >= 2 and written == ["v1"] * switch + ["v2"] * (BATCHES - switch)


@pytest.mark.parametrize("change, message", [
    ({"source": {"uri": "data/part-0.parquet", "batchRows": 1000}}, "spec.source changed"),
    ({"stages": [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
                 {"name": "tag", "run": "pystages:tag_v1", "inputs": ["slow", "source"]}]},
     "'tag': its inputs changed"),
    ({"stages": [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
                 {"name": "tag", "run": "pystages:tag_v1", "inputs": ["nope"]}]},
     "new.yaml:"),  # the user's file, not the run's copy
])
def test_apply_refuses_what_a_running_run_cannot_take(tmp_path, change, message):
    run = _start(tmp_path, slow="0.1")
    wait_until(lambda: _status(tmp_path).get("state") == "running", "the run to start")
    document = spec([{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
                     {"name": "tag", "run": "pystages:tag_v1", "inputs": ["slow"]}],
                    [{"input": "tag", "uri": "out/"}])
    document["spec"].update(change)
    new = write_spec(tmp_path / "new.yaml", document)
    done = podpipe("apply", "run", str(new), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert _versions_written(tmp_path) == ["v1"] * BATCHES


# -- reuse across runs ---------------------------------------------------------------


def _reuse_spec(workdir: Path, name: str, tag: str) -> Path:
    document = spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
         {"name": "tag", "run": tag, "inputs": ["slow"]},
         {"name": "twice", "run": "pystages:double", "inputs": ["slow"]},
         {"name": "versions", "run": "pystages:count_versions", "reduce": True,
          "inputs": ["tag"]}],
        [{"input": "tag", "uri": "out/"}, {"name": "twice-out", "input": "twice",
                                           "uri": "twice/"},
         {"name": "counts", "input": "versions", "uri": "counts/"}])
    document["spec"]["checkpoints"] = {"durable": f"file://{workdir / 'store'}",
                                       "reuse": True}
    return write_spec(workdir / name, document)


def _computed(workdir: Path, run: str) -> dict[str, int]:
    """Per stage: batches it computed (done, not reused)."""
    stages = json.loads((workdir / run / "status.json").read_text())["stages"]
    return {n: s["batches_done"] - s["reused"] for n, s in stages.items()
            if s["kind"] in ("stage", "reduce")}


def test_a_changed_spec_run_again_computes_only_the_changed_stage_and_what_follows(tmp_path):
    make_numbers(tmp_path / "data")
    _reuse_spec(tmp_path, "v1.yaml", "pystages:tag_v1")
    _reuse_spec(tmp_path, "v2.yaml", "pystages:tag_v2")
    for name, spec_file in (("one", "v1.yaml"), ("two", "v2.yaml"), ("three", "v2.yaml")):
        done = podpipe("run", spec_file, "--quiet", "--fresh", "--run-dir", name,
                       cwd=tmp_path, SLOW_SECONDS="0")
        assert done.returncode == 0, done.stderr
    assert _computed(tmp_path, "one") == {"slow": BATCHES, "tag": BATCHES,
                                          "twice": BATCHES, "versions": 1}
    # tag changed: it and the reduce after it run again; slow and twice are reused
    assert _computed(tmp_path, "two") == {"slow": 0, "tag": BATCHES, "twice": 0,
                                          "versions": 1}
    assert _computed(tmp_path, "three") == {"slow": 0, "tag": 0, "twice": 0,
                                            "versions": 0}
    assert _versions_written(tmp_path) == ["v2"] * BATCHES
    assert sorted(pq.read_table(tmp_path / "twice")["x"].to_pylist()) == \
        [2 * x for x in range(10_000)]
    counts = pq.read_table(tmp_path / "counts").to_pylist()
    assert counts == [{"version": "v2", "x_count": 10_000}]


def test_apply_brings_a_swapped_stage_back_to_what_the_spec_says(tmp_path):
    run = _start(tmp_path)
    wait_until(lambda: _status(tmp_path).get("stages", {}).get("tag", {})
               .get("batches_done", 0) >= 1, "a batch through tag")
    swapped = podpipe("swap", "run", "tag", "--run", "pystages:tag_v2", cwd=tmp_path)
    assert swapped.returncode == 0, swapped.stderr
    wait_until(lambda: _status(tmp_path)["stages"]["tag"]["batches_done"] >= 3, "v2 batches")
    done = podpipe("apply", "run", "p.yaml", cwd=tmp_path)  # the spec it started with
    assert done.returncode == 0, done.stderr
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    written = _versions_written(tmp_path)
    assert "v2" in written and written[-1] == "v1"  # back to the spec's version
    last_v2 = max(i for i, v in enumerate(written) if v == "v2")
    assert set(written[last_v2 + 1:]) == {"v1"}
