"""Batch files: exact size known before writing, hashed while written, renamed into
place, read back without copying."""

from __future__ import annotations

import pyarrow as pa
import pytest
import xxhash

from podpipe.runtime import arrowfile


def _table(rows: int = 1000) -> pa.Table:
    return pa.table({"x": pa.array(range(rows), pa.int64()), "s": [str(i) for i in range(rows)]})


def test_a_written_file_has_the_predicted_size_and_the_checksum_of_its_bytes(tmp_path):
    table = _table()
    path = tmp_path / "000001.arrow"
    nbytes, checksum = arrowfile.write_table(table, path)
    assert nbytes == arrowfile.ipc_size(table) == path.stat().st_size
    assert checksum == xxhash.xxh3_64(path.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["000001.arrow"]  # no temporary left


def test_reading_maps_the_file_instead_of_copying_it(tmp_path):
    table = _table(200_000)
    path = tmp_path / "b.arrow"
    arrowfile.write_table(table, path)
    before = pa.total_allocated_bytes()
    read = arrowfile.read_table(path)
    assert pa.total_allocated_bytes() - before < table.nbytes // 100  # it lives in the map
    assert read.equals(table)


def test_a_write_that_fails_midway_leaves_no_file_behind(tmp_path, monkeypatch):
    calls = []

    def failing_write(self, data):  # the disk fills up after the first buffer
        calls.append(len(memoryview(data)))
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return len(memoryview(data))

    monkeypatch.setattr(arrowfile._HashingFile, "write", failing_write)
    with pytest.raises(OSError, match="No space left"):
        arrowfile.write_table(_table(), tmp_path / "a.arrow")
    assert len(calls) > 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make", [
    lambda t: t,
    lambda t: t.to_batches()[0],
    lambda t: __import__("polars").from_arrow(t),
    lambda t: t.to_pandas(),
], ids=["table", "record-batch", "polars", "pandas"])
def test_stage_results_of_every_supported_kind_become_tables(make):
    table = _table(10)
    assert arrowfile.to_arrow(make(table)).select(["x"]).equals(table.select(["x"]))


def test_an_unsupported_result_is_named(tmp_path):
    with pytest.raises(TypeError, match="returned dict; expected a pyarrow Table"):
        arrowfile.to_arrow({"x": [1]})


def test_a_foreign_file_is_checksummed_like_our_own(tmp_path):
    path = tmp_path / "f.arrow"
    _, ours = arrowfile.write_table(_table(), path)
    assert arrowfile.checksum(path) == ours


def test_command_outputs_may_be_ipc_files_or_streams(tmp_path):
    table = _table(50)
    with pa.OSFile(str(tmp_path / "s.arrows"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    arrowfile.write_table(table, tmp_path / "f.arrow")
    assert arrowfile.read_any_ipc(tmp_path / "s.arrows").equals(table)
    assert arrowfile.read_any_ipc(tmp_path / "f.arrow").equals(table)
