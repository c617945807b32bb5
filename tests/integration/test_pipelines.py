"""Real pods on this machine: the example's answer, graph shapes, stage kinds."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import (ROOT, SF, node_stage, podpipe, read_sink, run_status, spec, start_run,
                      wait_until, write_spec)



def test_the_tpch_example_matches_the_official_answer(lineitem, tmp_path):
    from examples.tpch import data

    done = podpipe("run", str(ROOT / "examples/tpch/q1.yaml"), "--quiet",
                   "--set", f"source.uri={lineitem}/*.parquet", "--set", "source.batchRows=15000",
                   "--set", f"sinks.0.uri={tmp_path / 'q1'}", "--run-dir", str(tmp_path / "run"),
                   cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert data.compare(pq.read_table(tmp_path / "q1"), SF) == []
    status = json.loads(podpipe("status", str(tmp_path / "run"), "--json", cwd=ROOT).stdout)
    assert status["state"] == "succeeded"
    n = status["source_batches"]
    assert n > 1
    assert {n: (s["batches_done"], s["batches_total"]) for n, s in status["stages"].items()} == {
        "source": (n, n), "filter": (n, n), "prices": (n, n), "partial": (n, n),
        "total": (1, 1), "sink-0": (1, 1)}
    assert status["stages"]["filter"]["bytes_read"] == status["stages"]["source"]["bytes_written"]


@pytest.mark.parametrize("launcher", ["fork", "spawn"])
def test_fan_out_and_fan_in_pass_inputs_in_spec_order(workdir, launcher):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "doubled", "run": "pystages:double", "inputs": ["source"]},
         {"name": "plus", "run": "pystages:plus_one", "inputs": ["source"]},
         {"name": "both", "run": "pystages:combine", "inputs": ["doubled", "plus"]}],
        [{"input": "both", "uri": "out/"}, {"name": "raw", "input": "plus", "uri": "raw/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir,
                   PODPIPE_LAUNCHER=launcher)
    assert done.returncode == 0, done.stderr
    out = read_sink(workdir / "out")
    assert out["x"].to_pylist() == [2 * x for x in range(10_000)]
    assert out["y"].to_pylist() == [x + 1 for x in range(10_000)]
    assert len(list((workdir / "out").glob("part-*.parquet"))) == 10
    assert read_sink(workdir / "raw")["x"].to_pylist() == [x + 1 for x in range(10_000)]
    assert (workdir / "run/logs/forkserver.log").exists() == (launcher == "fork")


def test_a_reduce_gets_every_batch_as_one_chunked_table(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "chunks", "run": "pystages:chunk_report", "reduce": True,
          "inputs": ["source"]}],
        [{"input": "chunks", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out = read_sink(workdir / "out")
    assert out["rows"].to_pylist() == [1000] * 10
    assert sum(out["sum"].to_pylist()) == sum(range(10_000))
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["_SUCCESS.parquet", "part-000000.parquet"]


@pytest.mark.parametrize("function,expected", [
    ("pystages:as_polars", lambda x: 3 * x),
    ("pystages:as_pandas", lambda x: x - 1),
], ids=["polars", "pandas"])
def test_stages_may_return_polars_or_pandas(workdir, function, expected):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": function, "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert read_sink(workdir / "out")["x"].to_pylist() == [expected(x) for x in range(10_000)]


@pytest.fixture
def js_stage() -> Path:
    return node_stage("double.mjs")


def test_a_command_stage_in_another_language_reads_and_writes_arrow_ipc(workdir, js_stage):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "js", "command": ["node", str(js_stage)], "inputs": ["source"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["js"]}],
        [{"input": "js", "uri": "out/"}, {"name": "sum", "input": "total", "uri": "sum/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out = read_sink(workdir / "out")
    assert out["x"].to_pylist() == [2.0 * x for x in range(10_000)]
    assert out["batch"].to_pylist() == [x // 1000 for x in range(10_000)]
    assert read_sink(workdir / "sum").to_pylist() == [{"rows": 10_000,
                                                       "sum": 2.0 * sum(range(10_000))}]


def test_a_failing_command_fails_the_run_naming_stage_and_batch(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "sh", "command": ["sh", "-c", "exit 3"], "inputs": ["source"]}],
        [{"input": "sh", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 1
    assert "stage 'sh', batch 0: RuntimeError: command 'sh' exited with code 3" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("kind", ["csv", "arrow", "file-url"])
def test_csv_arrow_ipc_and_url_sources_run_end_to_end(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.feather as feather

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        table = pa.table({"x": pa.array(range(i * 1000, (i + 1) * 1000), pa.int64())})
        if kind == "csv":
            pacsv.write_csv(table, folder / f"p{i}.csv")
        elif kind == "arrow":
            feather.write_feather(table, folder / f"p{i}.arrow", compression="uncompressed",
                                  chunksize=250)
        else:
            pq.write_table(table, folder / f"p{i}.parquet")
    uri = {"csv": "in/*.csv", "arrow": "in/*.arrow",
           "file-url": f"file://{folder}/*.parquet"}[kind]
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}], uri=uri,
                                         batch_rows=500))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_sink(tmp_path / "out")["x"].to_pylist() == [2 * x for x in range(3000)]
    batches = json.loads((tmp_path / "run/status.json").read_text())["source_batches"]
    assert batches == {"csv": 6, "arrow": 6, "file-url": 6}[kind]  # 500 rows each


def test_a_stage_sees_its_env(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"],
          "env": {"BOOM_AT": "-1"}}],  # never matches: the default (2500) would fail
        [{"input": "boom", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert read_sink(workdir / "out").num_rows == 10_000


def test_sinks_are_deterministic_and_a_rerun_replaces_not_duplicates(workdir):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", cwd=workdir).returncode == 0
    first = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    assert podpipe("run", "p.yaml", "--quiet", cwd=workdir).returncode == 0
    second = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    assert first == second and len(first) == 11 and "_SUCCESS.parquet" in first


def test_progress_and_summary_are_shown_without_quiet(workdir):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", cwd=workdir, COLUMNS="160")
    assert done.returncode == 0, done.stderr
    for text in ("succeeded", "RAM scratch", "read: from it, zero-copy", "10/10"):
        assert text in done.stdout
    assert pc.sum(read_sink(workdir / "out")["x"]).as_py() == 2 * sum(range(10_000))


def test_inputs_a_stage_keeps_stay_as_they_were(workdir):
    """Outputs are written over warm files once read: never over one a stage's code
    still holds (the agent reports it pinned)."""
    write_spec(workdir / "p.yaml", spec(
        [{"name": "double", "run": "pystages:double", "inputs": ["source"], "workers": 1},
         {"name": "keep", "run": "pystages:keeps_inputs", "inputs": ["source"],
          "workers": 1}],
        [{"input": "double", "uri": "out/"}, {"name": "kept", "input": "keep",
                                                "uri": "kept/"}], batch_rows=500))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert read_sink(workdir / "kept")["x"].to_pylist() == list(range(10_000))


def test_what_an_agent_keeps_mapped_holds_no_pages_of_deleted_files(workdir):
    """Agents keep their inputs mapped from task to task; a file deleted meanwhile is
    emptied first, so those mappings hold none of its pages (RAM outside the budget
    they would be). The probe starts once the source has made all 40 batches: the
    outputs it reads and frees fill the pool of warm files (16) with nothing taking
    from it, and the rest are deleted while the probe still maps them."""
    write_spec(workdir / "p.yaml", spec(
        [{"name": "probe", "run": "pystages:mapped_deleted_gated", "inputs": ["source"],
          "workers": 1}], [{"input": "probe", "uri": "out/"}], batch_rows=250))
    gate = workdir / "gate"
    run = start_run(workdir, GATE=str(gate))
    try:
        wait_until(lambda: run_status(workdir / "run").get("stages", {}).get(
            "source", {}).get("batches_done") == 40, "the source's 40 batches")
        gate.touch()
    finally:
        _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    out = read_sink(workdir / "out")
    assert out["x"].to_pylist() == list(range(10_000))
    assert pc.max(out["deleted_maps"]).as_py() > 0  # files it read were deleted since
    assert pc.max(out["deleted_kib"]).as_py() == 0
