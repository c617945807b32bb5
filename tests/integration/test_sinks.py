"""Sinks you can trust: a rerun never mixes with an earlier output, `_SUCCESS.parquet` last, and
every usual reader reads a sink folder as it is."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from podpipe.runtime.data import sink
from tests.conftest import cli_env, podpipe, spec, wait_until, write_spec


def _pipeline(tmp: Path, *, mode: str | None = None, stage: str = "pystages:double",
              name: str = "p.yaml") -> Path:
    sink = {"name": "out", "input": "double", "uri": "out/"}
    if mode:
        sink["mode"] = mode
    return write_spec(tmp / name, spec([{"name": "double", "run": stage,
                                            "inputs": ["source"]}], [sink]))


def _count(folder: Path) -> int:
    return duckdb.sql(f"select count(*) from '{folder}/*.parquet'").fetchone()[0]


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("part-*.parquet"))


def test_a_rerun_with_other_batches_is_refused_in_mode_error(workdir):
    path = _pipeline(workdir)
    first = podpipe("run", str(path), "--quiet", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert _count(workdir / "out") == 10_000
    before = _parts(workdir / "out")
    assert len(before) == 10

    again = podpipe("run", str(path), "--quiet", "--set", "source.batchRows=5000",
                    cwd=workdir)
    assert again.returncode == 2, again.stderr
    assert "sink 'out'" in again.stderr and "part-000002.parquet" in again.stderr
    assert "mode: overwrite" in again.stderr and "Traceback" not in again.stderr
    assert _parts(workdir / "out") == before  # nothing was written
    assert (workdir / "out" / "_SUCCESS.parquet").exists()  # the earlier output is still whole

    same = podpipe("run", str(path), "--quiet", cwd=workdir)  # the same batches: replaced
    assert same.returncode == 0, same.stderr
    assert _parts(workdir / "out") == before


def test_overwrite_leaves_exactly_the_new_files_and_a_manifest(workdir):
    path = _pipeline(workdir, mode="overwrite")
    assert podpipe("run", str(path), "--quiet", cwd=workdir).returncode == 0
    assert len(_parts(workdir / "out")) == 10

    done = podpipe("run", str(path), "--set", "source.batchRows=3000", cwd=workdir)
    assert done.returncode == 0, done.stderr
    out = workdir / "out"
    assert _parts(out) == [f"part-{b:06d}.parquet" for b in range(4)]
    assert _count(out) == 10_000  # the source's rows, none twice
    assert not list(out.glob("_staging*"))
    assert "out: wrote 4 files, 10,000 rows → out/" in done.stdout
    final = json.loads(podpipe("status", "latest", "--json", cwd=workdir).stdout)
    assert final["stages"]["out"]["rows_out"] == 10_000  # a sink's rows out: what it wrote
    assert final["sinks"]["out"] == {"uri": "out/", "files": 4, "rows": 10_000,
                                     "bytes": sum(f["bytes"] for f in
                                                  sink.manifest(workdir / "out")["files"])}

    manifest = sink.manifest(out)
    assert [f["file"] for f in manifest["files"]] == _parts(out)
    assert manifest["rows"] == 10_000
    assert [f["rows"] for f in manifest["files"]] == [
        pq.read_metadata(out / f["file"]).num_rows for f in manifest["files"]]
    assert all(f["versions"]["double"] for f in manifest["files"])


def test_a_failed_overwrite_leaves_the_previous_output_in_place(workdir):
    path = _pipeline(workdir, mode="overwrite")
    assert podpipe("run", str(path), "--quiet", cwd=workdir).returncode == 0
    out = workdir / "out"
    before = {p.name: p.read_bytes() for p in out.glob("part-*.parquet")}
    marker = (out / "_SUCCESS.parquet").read_bytes()

    failing = _pipeline(workdir, mode="overwrite", stage="pystages:fail_on_third",
                        name="failing.yaml")
    failed = podpipe("run", str(failing), "--quiet", "--set", "source.batchRows=3000",
                     cwd=workdir)
    assert failed.returncode == 1, failed.stderr
    assert {p.name: p.read_bytes() for p in out.glob("part-*.parquet")} == before
    assert (out / "_SUCCESS.parquet").read_bytes() == marker

    fixed = podpipe("run", str(path), "--quiet", "--set", "source.batchRows=3000",
                    cwd=workdir)
    assert fixed.returncode == 0, fixed.stderr
    assert len(_parts(out)) == 4 and _count(out) == 10_000
    # the failed run's staging (if it staged any) stays for its resume; the run that
    # succeeded left none
    assert len(list(out.glob("_staging-*"))) <= 1


def test_a_bad_sink_mode_is_refused_naming_the_field(workdir):
    path = _pipeline(workdir, mode="append")
    result = podpipe("validate", str(path), cwd=workdir)
    assert result.returncode == 2
    assert "spec.sinks[0].mode" in result.stderr and "overwrite" in result.stderr


def test_temporary_files_a_killed_sink_left_are_swept_by_the_next_run(tmp_path):
    """A sink process killed mid-write leaves `.part-N.parquet.PID.tmp` in the sink
    folder; they stayed there through resumes and later runs. Those of gone
    processes (this user's) are removed when a run starts writing there; those of a
    live process are not."""
    import subprocess

    from tests.conftest import make_numbers, read_sink

    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}]))
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])  # a pid that is gone
    dead.wait()
    left = [out / f".part-000003.parquet.{dead.pid}.tmp", out / f"._SUCCESS.parquet.{dead.pid}.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    live = out / f".part-000004.parquet.{os.getpid()}.tmp"  # a live process's: kept
    live.write_bytes(b"being written")
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(path.exists() for path in left)
    assert live.exists()
    assert len(read_sink(out)) == 10_000


def test_two_overwrite_runs_into_one_sink_each_stage_their_own_files(workdir):
    """Each run stages in a folder of its own: the one that commits first leaves the
    other's staged files alone, and the last commit is the output."""
    import subprocess
    import sys

    gate = workdir / "gate"
    slow = _pipeline(workdir, mode="overwrite", stage="pystages:double_then_gated",
                     name="slow.yaml")
    first = subprocess.Popen([sys.executable, "-m", "podpipe", "run", str(slow), "--quiet",
                              "--run-dir", "first"], cwd=workdir, env=cli_env(GATE=str(gate)),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = workdir / "out"
    try:
        def staged() -> bool:
            assert first.poll() is None, first.communicate()
            return len(list(out.glob("_staging-*/part-*.parquet"))) >= 5
        wait_until(staged, "the first run to stage half its files")
        second = podpipe("run", str(_pipeline(workdir, mode="overwrite")), "--quiet",
                         "--set", "source.batchRows=2000", cwd=workdir)
        assert second.returncode == 0, second.stderr
        assert len(_parts(out)) == 6 and _count(out) == 10_000  # the second run's output
        assert len(list(out.glob("_staging-*/part-*.parquet"))) == 5  # the first's, kept
    finally:
        gate.touch()
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert len(_parts(out)) == 10 and _count(out) == 10_000  # the last commit's
    assert not list(out.glob("_staging*")) and not list(out.glob("*.tmp"))


def test_every_usual_reader_reads_a_complete_sink_folder_as_it_is(workdir):
    """A JSON `_SUCCESS` made polars ('different file extensions') and DuckDB ('No
    magic bytes', 'too small to be a Parquet file') fail on the folder."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    path = _pipeline(workdir)
    assert podpipe("run", str(path), "--quiet", cwd=workdir).returncode == 0
    out = workdir / "out"
    assert (out / "_SUCCESS.parquet").exists()
    total = sum(2 * x for x in range(10_000))
    sums = {
        "duckdb *": duckdb.connect().sql(f"select sum(x) from read_parquet('{out}/*')"),
        "duckdb **": duckdb.connect().sql(f"select sum(x) from read_parquet('{out}/**')"),
        "duckdb dir": duckdb.connect().sql(f"select sum(x) from '{out}/*.parquet'"),
    }
    found = {name: relation.fetchone()[0] for name, relation in sums.items()}
    found["polars read"] = pl.read_parquet(f"{out}/")["x"].sum()
    found["polars scan"] = pl.scan_parquet(str(out)).select(pl.col("x").sum()).collect().item()
    found["pandas"] = int(pd.read_parquet(out)["x"].sum())
    found["pyarrow dataset"] = ds.dataset(out, format="parquet").to_table()["x"].to_numpy().sum()
    found["pyarrow read_table"] = pq.read_table(out)["x"].to_numpy().sum()
    assert found == dict.fromkeys(found, total)
    manifest = sink.manifest(out)
    assert [f["file"] for f in manifest["files"]] == _parts(out) and manifest["rows"] == 10_000
