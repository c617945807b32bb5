"""A standing line's pieces that need no process: what a job may set, where a line
lives, its record, warm workers, a job's scratch swept, a queued job's status."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import msgspec
import pytest

from podpipe.engine.state import RunState
from podpipe.errors import UsageError
from podpipe.model.graph import Graph
from podpipe.runtime.conductor.agents import Agents, Conn
from podpipe.runtime.data.scratch import Scratch
from podpipe.runtime.plumbing import protocol, sockets
from podpipe.runtime.plumbing.loop import EventLoop
from podpipe.runtime.rundir import layout as rundir
from podpipe.runtime.runs import lines

from podsim import CHAIN


@pytest.mark.parametrize("item", ["source.uri=data/b/*.parquet", "source.batchRows=10",
                                  "source.columns=[a, b]", "sinks.out.uri=out/b/",
                                  "sinks.0.mode=overwrite", "stages.f.env.LEVEL=3"])
def test_a_job_may_set_its_data(item):
    lines.job_overrides([item])  # no error


@pytest.mark.parametrize("item", ["stages.f.run=m:g", "stages.f.inputs=[source]", "memory=1Gi",
                                  "stages.f.workers=4", "sinks.out.input=f", "source=x",
                                  "checkpoints.node=/tmp"])
def test_a_job_may_not_set_the_graph_or_the_line(item):
    with pytest.raises(UsageError, match=f"--set {item.partition('=')[0]}: a job may set only"):
        lines.job_overrides([item])


def test_a_line_is_a_name_or_a_folder():
    assert lines.home("q1") == Path(".podpipe") / "lines" / "q1"
    assert lines.home("/srv/lines/q1") == Path("/srv/lines/q1")
    assert lines.home("./q1") == Path("./q1")


def test_a_line_record_reads_back_and_a_dead_one_is_not_up(tmp_path):
    record = lines.LineRecord(name="q1", pid=os.getpid(), start=None, socket="s",
                              spec="p.yaml", cwd="/", overrides=[], started=0.0, state="up")
    lines.write(tmp_path, record)
    again = lines.read(tmp_path)
    assert again == record and again.up
    gone = msgspec.structs.replace(record, pid=2**22 + 7)  # (beyond pid_max's default)
    assert not gone.up and not lines.coming_up(gone)
    with pytest.raises(UsageError, match="no such line"):
        lines.read(tmp_path / "nope")


def test_a_warm_line_hands_a_job_the_workers_it_has():
    graph = Graph.of(CHAIN)
    fixed = RunState(graph, 4, 100, workers={n: 1 for n in graph.order}).ledger
    auto = RunState(graph, 4, 100, workers={n: None for n in graph.order}).ledger
    warm = {n: [0, 2, 3] for n in graph.order}
    fixed.warm(warm)
    auto.warm(warm)
    node = graph.order[1]
    assert sorted(fixed.agents[node]) == [0]          # a fixed count is the spec's
    assert sorted(auto.agents[node]) == [0, 2, 3]      # auto: those the line has
    auto.warm({node: []})
    assert sorted(auto.agents[node]) == [0, 2, 3]      # none known: as it was


def test_a_connection_unbound_goes_unheard_until_it_says_hello(tmp_path):
    listener = sockets.listen(tmp_path / "s.sock")
    with EventLoop() as loop:
        agents = Agents(loop, listener)
        ours, theirs = socket.socketpair()
        conn = Conn(ours)
        assert agents.hello(conn, protocol.Hello(node="f", version="v", pid=1))
        assert agents.node_of(conn) == "f"
        assert agents.unbind("f") is conn
        assert agents.node_of(conn) is None and not agents.connected("f")
        assert agents.hello(conn, protocol.Hello(node="f", version="v2", pid=1))
        assert agents.node_of(conn) == "f"
        agents.close()
        ours.close()
        theirs.close()


def test_a_jobs_end_sweeps_its_data_but_kept_tables_running_jobs_and_the_socket(tmp_path):
    line = Scratch(tmp_path)._claim("line")
    line.socket.write_text("")
    over, running = line.child("job-a"), line.child("job-b")
    for job in (over, running):
        for node in ("f", "t"):
            job.make_output_dir(node)
            job.output_path(node, 0).write_bytes(b"x")
        job.pool_path(1).write_bytes(b"y")
    table = over.output_path("t", 0)
    assert over.path.name.startswith("job-a.") and over.path.parent == tmp_path / "jobs"
    assert line.child("job-a").path != over.path  # (resumed: a folder of its own)
    line.sweep_jobs({running.path}, {str(table)})
    assert line.socket.exists() and (tmp_path / "owner.json").exists()
    assert table.exists() and not over.output_path("f", 0).exists()
    assert not over.pool_path(1).exists()
    assert running.output_path("f", 0).exists() and running.pool_path(1).exists()
    line.sweep_jobs({running.path}, set())  # the table no longer kept: the folder goes
    assert not over.path.exists() and running.path.exists()
    assert [p for p in (tmp_path / "jobs").iterdir()] == [running.path]
    assert oct((tmp_path / "jobs").stat().st_mode & 0o777) == "0o700"


def test_a_queued_job_says_so_and_one_that_failed_before_it_started_too(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text(_SPEC)
    run = tmp_path / "runs" / "job"
    rundir.make(run, str(spec), [], line=str(tmp_path / "line"))
    rundir.lock(run)
    try:
        assert rundir.status_of(run).state == "queued"
    finally:
        rundir.unlock(run)
    assert rundir.status_of(run).state == "interrupted"  # nobody holds it: a resume's
    rundir.failed_before_start(run, "source: no files match data/*.parquet")
    failed = rundir.status_of(run)
    assert failed.state == "failed" and "no files match" in (failed.error or "")


_SPEC = """\
apiVersion: podpipe.dev/v1alpha1
kind: Pipeline
metadata: {name: t}
spec:
  source: {uri: "data/*.parquet", batchRows: 10}
  stages:
    - {name: f, run: "m:f", inputs: [source]}
  sinks:
    - {input: f, uri: "out/"}
  memory: 64MiB
"""


def test_a_class_set_up_with_a_table_is_kept_only_while_its_table_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from podpipe.model import spec as specs
    from podpipe.model.output import Output
    from podpipe.runtime.data import tables
    from podpipe.runtime.runs.warmth import Warmth

    pq.write_table(pa.table({"k": [1]}), tmp_path / "codes.parquet")
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "w"},
           "spec": {"source": {"uri": "x.parquet"},
                    "tables": [{"name": "codes", "uri": str(tmp_path / "codes.parquet")}],
                    "stages": [{"name": "a", "run": "m:C", "inputs": ["source"],
                                "setupInputs": ["codes"]},
                               {"name": "b", "run": "m:f", "inputs": ["a"]}],
                    "sinks": [{"input": "b", "uri": "o/"}]}}
    pipeline = specs.parse(yaml.safe_dump(doc))
    kept = tmp_path / "codes.arrow"
    kept.write_bytes(b"loaded")
    warmth = Warmth(served=pipeline)
    warmth.tables = {"codes": (pipeline.table("codes"), tables.version(pipeline.table("codes")),
                               Output(node="codes", key=0, path=str(kept), nbytes=6, rows=1))}
    assert warmth.unchanged(pipeline) == {"a", "b", "sink-0"}
    pq.write_table(pa.table({"k": [1, 2]}), tmp_path / "codes.parquet")  # it changed
    assert warmth.unchanged(pipeline) == {"b", "sink-0"}  # a sets up anew with it


def test_a_line_with_jobs_at_once_shows_the_younger_beside_the_running_one():
    import io

    from rich.console import Console

    from podpipe import console

    record = lines.LineRecord(name="q1", pid=os.getpid(), start=None, socket="s",
                              spec="p.yaml", cwd="/", overrides=[], started=0.0, state="up")
    record.jobs.running, record.jobs.beside = "job-a", ["job-b"]
    shown = io.StringIO()
    Console(file=shown, width=80, color_system=None).print(console.line_table(record, "here"))
    assert "job-a" in shown.getvalue() and "beside it  job-b" in shown.getvalue()
    listed = io.StringIO()
    Console(file=listed, width=80, color_system=None).print(
        console.lines_table([(Path("q1"), record)], "here"))
    assert "job-a, job-b" in listed.getvalue()
