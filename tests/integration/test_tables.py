"""Tables: TPC-H Q12 and Q3 join every lineitem batch with orders (and customer),
tables loaded into the pod once. The answers are the official ones, the same bytes
for any number of replicas and after failures; the table is in scratch once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SF, cli_env, podpipe, run_status, wait_until

SPECS = ROOT / "examples" / "tpch"


def _args(lineitem: Path, query: int, **stages: str) -> list[str]:
    """`podpipe run` arguments for the bundled query over the test data, 12 batches;
    `stages`: a stage's function replaced (`join="pystages:..."`)."""
    data = lineitem.parent
    args = [str(SPECS / f"q{query}.yaml"), "--quiet",
            "--set", f"source.uri={lineitem}/*.parquet", "--set", "source.batchRows=5000",
            "--set", f"tables.orders.uri={data}/orders/", "--set", "sinks.0.uri=out/"]
    if query == 3:
        args += ["--set", f"tables.customer.uri={data}/customer/"]
    for stage, function in stages.items():
        args += ["--set", f"stages.{stage}.run={function}"]
    return args


def _answer(workdir: Path) -> bytes:
    files = sorted((workdir / "out").glob("part-*.parquet"))
    assert len(files) == 1, files
    return files[0].read_bytes()


def _same_data(workdir: Path, clean: bytes) -> bool:
    """The same rows as the clean run's, in the same order (a test that replaces a
    stage's function writes other versions into the file's metadata)."""
    return pq.read_table(workdir / "out").equals(pq.read_table(pa.BufferReader(clean)))


@pytest.fixture(scope="module")
def clean(lineitem, tmp_path_factory) -> dict[int, bytes]:
    """Each query's answer from an undisturbed run, checked against the official one."""
    from examples.tpch import data

    answers = {}
    for query in (12, 3):
        workdir = tmp_path_factory.mktemp(f"q{query}")
        done = podpipe("run", *_args(lineitem, query), cwd=workdir)
        assert done.returncode == 0, done.stderr
        assert data.compare(pq.read_table(workdir / "out"), SF, query) == []
        answers[query] = _answer(workdir)
        versions = json.loads(pq.read_metadata(next((workdir / "out").glob("*.parquet")))
                              .metadata[b"podpipe.versions"])
        assert versions["orders"][0].startswith("tbl-")  # the table's identity, recorded
    return answers


@pytest.mark.parametrize("query", [12, 3])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_answer_is_the_same_bytes_for_any_number_of_replicas(lineitem, clean, tmp_path,
                                                                  query, replicas):
    done = podpipe("run", *_args(lineitem, query), "--set", "shards=6",
                   "--replicas", str(replicas), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _answer(tmp_path) == clean[query]


def test_a_killed_stage_is_restarted_and_maps_the_same_table(lineitem, clean, tmp_path):
    done = podpipe("run", *_args(lineitem, 12, join="pystages:q12_join_dying_once"),
                   "--run-dir", "run", cwd=tmp_path, DIE_ON_CALL="3",
                   DIE_MARKER=str(tmp_path / "died"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "died").exists()
    status = run_status(tmp_path / "run")
    assert status["stages"]["join"]["restarts"] == 1
    assert status["stages"]["orders"]["batches_done"] == 1  # loaded once, not again
    assert status["stages"]["orders"]["restarts"] == 0
    assert _same_data(tmp_path, clean[12])


def _start_gated(lineitem: Path, workdir: Path, query: int, *more: str) -> subprocess.Popen:
    reduce = {12: {"total": "pystages:q12_total_gated"}, 3: {"top": "pystages:q3_top_gated"}}
    return subprocess.Popen(
        [sys.executable, "-m", "podpipe", "run", *_args(lineitem, query, **reduce[query]),
         "--run-dir", "run", *more],
        cwd=workdir, env=cli_env(GATE=str(workdir / "gate")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _at_the_gate(run: subprocess.Popen, workdir: Path, reduce: str) -> dict:
    """The status once the gated reduce is running (every batch done before it)."""
    def there() -> bool:
        assert run.poll() is None, run.communicate()
        return run_status(workdir / "run").get("stages", {}).get(reduce, {}).get(
            "in_flight", 0) == 1
    wait_until(there, f"{reduce} to start")
    return run_status(workdir / "run")


def _kill_conductor(run: subprocess.Popen, before: dict) -> None:
    run.send_signal(signal.SIGKILL)
    run.communicate()
    deadline = time.monotonic() + 10
    for process in before["processes"]:
        while Path(f"/proc/{process['pid']}").exists():
            assert time.monotonic() < deadline, f"{process} outlived its conductor"
            time.sleep(0.02)


def test_a_killed_conductor_resumes_and_loads_the_table_again(lineitem, clean, tmp_path):
    run = _start_gated(lineitem, tmp_path, 12)
    before = _at_the_gate(run, tmp_path, "total")
    _kill_conductor(run, before)
    (tmp_path / "gate").touch()
    done = podpipe("resume", "run", cwd=tmp_path, GATE=str(tmp_path / "gate"))
    assert done.returncode == 0, done.stderr
    after = run_status(tmp_path / "run")
    assert after["stages"]["orders"]["batches_done"] == 1  # loaded again: never checkpointed
    assert after["stages"]["count"]["rows_in"] == 0  # the batches were kept: none ran again
    assert _same_data(tmp_path, clean[12])


def test_resuming_over_a_table_that_changed_is_refused(lineitem, tmp_path):
    copied = tmp_path / "orders"
    copied.mkdir()
    for part in sorted((lineitem.parent / "orders").iterdir()):
        (copied / part.name).write_bytes(part.read_bytes())
    run = _start_gated(lineitem, tmp_path, 12, "--set", f"tables.orders.uri={copied}/")
    before = _at_the_gate(run, tmp_path, "total")
    _kill_conductor(run, before)
    first = sorted(copied.iterdir())[0]
    os.utime(first, (first.stat().st_atime, first.stat().st_mtime - 60))  # rewritten
    done = podpipe("resume", "run", cwd=tmp_path, GATE=str(tmp_path / "gate"))
    assert done.returncode == 2, done.stderr
    assert "spec.tables[0] ('orders'): its files changed since the run loaded it" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))
    shutil.rmtree(before["scratch"])  # the dead run's RAM, as the next run's sweep would


def test_a_table_is_in_scratch_once_however_many_workers_read_it(lineitem, clean, tmp_path):
    run = _start_gated(lineitem, tmp_path, 3, "--set", "stages.shipped.workers=2",
                       "--set", "stages.join.workers=2", "--set", "memory=64Mi")
    try:
        status = _at_the_gate(run, tmp_path, "top")
        data = Path(status["scratch"]) / "data"
        for table in ("orders", "customer"):
            assert [p.name for p in (data / table).iterdir()] == ["000000.arrow"]
        held = sum((data / t / "000000.arrow").stat().st_size for t in ("orders", "customer"))
        assert status["stages"]["join"]["workers_max"] == 2
        assert status["scratch_bytes"] >= held  # the tables count in the budget
    finally:
        (tmp_path / "gate").touch()
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    final = run_status(tmp_path / "run")
    assert held <= final["peak_scratch_bytes"] <= final["budget_bytes"]
    assert final["stages"]["orders"]["tier"] == "ram"
    assert _same_data(tmp_path, clean[3])


def test_a_table_larger_than_half_the_budget_is_mapped_from_the_node_tier(lineitem, clean,
                                                                           tmp_path):
    done = podpipe("run", *_args(lineitem, 12), "--run-dir", "run", "--memory", "400Ki",
                   "--set", "source.batchRows=1000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["stages"]["orders"]["tier"] == "node"
    assert status["peak_scratch_bytes"] <= status["budget_bytes"]
    assert _answer(tmp_path) == clean[12]
