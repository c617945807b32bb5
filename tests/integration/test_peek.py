"""Looking into the line while it runs: `podpipe peek` and `Run.peek`, real processes.

The pipeline: source -> double -> gated (waits for the GATE file on every batch) ->
sink, ten batches. While `gated` waits, `double`'s outputs are held; the test peeks
at them, then opens the gate: the engine deletes them as `gated` reads them, and
what was lent stays what it was until the reader lets go.
"""

from __future__ import annotations

import gc
import os
import socket
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import podpipe
from conftest import (make_numbers, podpipe as cli, read_sink, run_status, spec, start_run,
                      wait_until, write_spec)


def _start(workdir: Path):
    make_numbers(workdir / "data")
    write_spec(workdir / "p.yaml", spec(
        [{"name": "double", "run": "pystages:double", "inputs": ["source"], "workers": 1},
         {"name": "gated", "run": "pystages:tag_v1_gated", "inputs": ["double"],
          "workers": 1}],
        [{"input": "gated", "uri": "out/"}]))
    run = start_run(workdir, GATE=str(workdir / "gate"))
    wait_until(lambda: run_status(workdir / "run").get("stages", {}).get("double", {})
               .get("batches_done", 0) >= 2, "two batches through double")
    return run


def _mapped_from(scratch: str) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines()
            if scratch in line]


def test_a_peeked_batch_outlives_its_deletion_and_goes_with_its_reader(tmp_path):
    run = _start(tmp_path)
    try:
        scratch = run_status(tmp_path / "run")["scratch"]
        table = podpipe.status(tmp_path / "run").peek("double", 0)
        assert table["x"].to_pylist() == [2 * x for x in range(1000)]
        assert _mapped_from(scratch)  # read in place, not copied
        (tmp_path / "gate").touch()  # `gated` reads every batch: each is deleted
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    assert not Path(scratch).exists()  # the run's scratch is gone...
    assert table["x"].to_pylist() == [2 * x for x in range(1000)]  # ...not what was lent
    assert all("(deleted)" in line for line in _mapped_from(scratch))
    del table
    gc.collect()
    assert _mapped_from(scratch) == []  # its pages went with the reader
    assert read_sink(tmp_path / "out")["x"].to_pylist() == [2 * x for x in range(10_000)]


def test_peek_prints_rows_a_schema_or_a_file_and_says_what_it_cannot_lend(tmp_path):
    run = _start(tmp_path)
    try:
        rows = cli("peek", "run", "double", "--batch", "1", "--head", "3", cwd=tmp_path)
        assert rows.returncode == 0, rows.stderr
        assert "stage 'double', batch 1: 1,000 rows, version src-" in rows.stdout
        assert "from pod RAM" in rows.stdout
        assert [line.split() for line in rows.stdout.splitlines()
                if line.strip().isdigit()] == [["2000"], ["2002"], ["2004"]]
        newest = cli("peek", "run", "double", "--schema", cwd=tmp_path)
        assert newest.returncode == 0 and "x: int64" in newest.stdout
        written = cli("peek", "run", "double", "--batch", "0", "--to", "b0.parquet",
                      cwd=tmp_path)
        assert written.returncode == 0, written.stderr
        assert pq.read_table(tmp_path / "b0.parquet")["x"].to_pylist() == \
            [2 * x for x in range(1000)]
        for args, message in ((["nope"], "no stage 'nope' in this run"),
                              (["double", "--batch", "999"],
                               "'double': batch 999 is not held now (held: 0-")):
            refused = cli("peek", "run", *args, cwd=tmp_path)
            assert refused.returncode == 2 and message in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    over = cli("peek", "run", "double", cwd=tmp_path)
    assert over.returncode == 2
    assert "the run is succeeded, not running; nothing to peek at" in over.stderr
    bad = cli("peek", "run", "double", "--batch", "-1", cwd=tmp_path)
    assert bad.returncode == 2 and "--batch: expected a whole number" in bad.stderr


@pytest.mark.parametrize("what", ["schema", "head"])
def test_peek_flags_are_checked(tmp_path, what):
    done = cli("peek", "run", "double", "--schema", "--to", "x.parquet", cwd=tmp_path) \
        if what == "schema" else cli("peek", "run", "double", "--head", "x", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="a second user needs root")
def test_another_user_cannot_peek(tmp_path):
    """The run's scratch and directory are its user's: another user reaches neither
    the conductor's socket nor the status naming it, so nothing is lent to them."""
    run = _start(tmp_path)
    try:
        sock = str(Path(run_status(tmp_path / "run")["scratch"]) / "conductor.sock")

        def peek() -> bool:
            os.setgid(65534)
            os.setuid(65534)
            try:
                podpipe.status(str(tmp_path / "run")).peek("double", 0)
                return False
            except Exception:  # (its run directory: not readable)
                pass
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(sock)
                except PermissionError:
                    return True  # the scratch is 0700
            return False

        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if peek() else 3)
            finally:
                os._exit(4)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        mine = podpipe.status(tmp_path / "run").peek("double", 0)  # the owner can
        assert mine.num_rows == 1000
        del mine
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stderr


def test_peek_on_a_standing_line_reads_its_running_job(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "double", "run": "pystages:double", "inputs": ["source"], "workers": 1},
         {"name": "gated", "run": "pystages:tag_v1_gated", "inputs": ["double"],
          "workers": 1}],
        [{"name": "out", "input": "gated", "uri": "out/"}], name="peeked"))
    gate = str(tmp_path / "gate")
    assert cli("up", "p.yaml", "--name", "l", cwd=tmp_path, GATE=gate).returncode == 0
    try:
        idle = cli("peek", "l", "double", cwd=tmp_path)
        assert idle.returncode == 2 and "no job is running on the line" in idle.stderr
        submitted = cli("submit", "l", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        job = next((tmp_path / ".podpipe" / "runs").glob("peeked-*"))
        wait_until(lambda: run_status(job).get("stages", {}).get("double", {})
                   .get("batches_done", 0) >= 1, "a batch of the job through double")
        for target in ("l", str(job)):
            rows = cli("peek", target, "double", "--batch", "0", cwd=tmp_path)
            assert rows.returncode == 0, rows.stderr
            assert "stage 'double', batch 0: 1,000 rows" in rows.stdout
        Path(gate).touch()
        assert cli("wait", str(job), cwd=tmp_path).returncode == 0
    finally:
        Path(gate).touch()
        cli("down", "l", cwd=tmp_path)
