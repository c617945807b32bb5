"""Batch files: exact size known before writing, hashed while written, renamed into
place, read back without copying."""

from __future__ import annotations

import gc
import os

import pyarrow as pa
import pytest
import xxhash

from podpipe.runtime.data import arrowfile, scratch


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
    monkeypatch.undo()
    arrowfile.write_table(_table(10), tmp_path / "warm.arrow")
    monkeypatch.setattr(arrowfile._HashingFile, "write", failing_write)
    calls.clear()
    with pytest.raises(OSError, match="No space left"):  # over a warm file: it goes too
        arrowfile.write_table(_table(), tmp_path / "a.arrow", reuse=tmp_path / "warm.arrow")
    assert list(tmp_path.iterdir()) == []


def test_a_warm_file_gone_meanwhile_is_written_anew(tmp_path):
    nbytes, checksum = arrowfile.write_table(_table(), tmp_path / "a.arrow",
                                             reuse=tmp_path / "gone.arrow")
    assert arrowfile.read_table(tmp_path / "a.arrow").equals(_table())
    assert [p.name for p in tmp_path.iterdir()] == ["a.arrow"]


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


def _mapped_at(path, found: os.stat_result | None = None) -> list[str]:
    """Where this process maps the file at `path` (or the one `found` was: deleted
    since) — its address ranges, from /proc/self/maps: what the kernel says,
    whatever podpipe thinks it keeps."""
    found = found or os.stat(path)
    device = f"{os.major(found.st_dev):02x}:{os.minor(found.st_dev):02x}"
    with open("/proc/self/maps") as maps:
        return [line.split()[0] for line in maps
                if line.split()[3:5] == [device, str(found.st_ino)]]


def test_a_file_read_again_is_not_mapped_again_and_shows_what_it_holds_now(tmp_path):
    """Outputs are written over warm files: the same file (inode) comes back as an
    input, its mapping kept from the task before; what a reader sees is the file's
    content now, and a file grown meanwhile is mapped again whole."""
    mappings = arrowfile.Mappings()
    path = tmp_path / "warm.arrow"
    arrowfile.write_table(_table(100), path)
    read = arrowfile.Watched(mappings)
    assert read(str(path)).equals(_table(100))
    gc.collect()
    first = _mapped_at(path)
    assert len(first) == 1  # kept, though its task's table is gone
    written_over = tmp_path / "next.arrow"
    arrowfile.write_table(_table(50), written_over, reuse=path)  # the pool's way: same inode
    assert read(str(written_over)).equals(_table(50))
    assert _mapped_at(written_over) == first  # the same mapping, not a new one
    grown = tmp_path / "grown.arrow"
    arrowfile.write_table(_table(5000), grown, reuse=written_over)
    assert read(str(grown)).equals(_table(5000))
    gc.collect()
    again = _mapped_at(grown)
    assert len(again) == 1 and again != first  # mapped anew, the old one let go


def test_inputs_not_to_keep_are_mapped_for_their_task_and_the_least_recent_go(tmp_path):
    mappings = arrowfile.Mappings()
    paths = [tmp_path / f"{i}.arrow" for i in range(4)]
    for path in paths:
        arrowfile.write_table(_table(10), path)
    once = arrowfile.Watched(mappings, keep=False)  # a reduce's inputs, say
    assert once(str(paths[0])).equals(_table(10))
    mappings.MOST = 2
    read = arrowfile.Watched(mappings)
    for path in paths[1:]:
        read(str(path))
    gc.collect()
    # the first not kept at all, then the least recently read went first
    assert [len(_mapped_at(p)) for p in paths] == [0, 0, 1, 1]


def test_an_input_the_stage_keeps_is_pinned_and_its_mapping_is_the_stage_s(tmp_path):
    mappings = arrowfile.Mappings()
    for name in ("a", "b"):
        arrowfile.write_table(_table(10), tmp_path / f"{name}.arrow")
    read = arrowfile.Watched(mappings)
    cached = read(str(tmp_path / "a.arrow"))  # the stage's code keeps this one
    read(str(tmp_path / "b.arrow"))
    gc.collect()
    assert read.pinned() == [str(tmp_path / "a.arrow")]
    a = os.stat(tmp_path / "a.arrow")
    (tmp_path / "a.arrow").unlink()  # deleted whole (pinned): the stage still reads it
    assert cached.equals(_table(10))
    del cached
    gc.collect()  # the stage let go: unmapped, not kept by the agent
    assert len(_mapped_at(None, a)) == 0
    assert len(_mapped_at(tmp_path / "b.arrow")) == 1


def test_a_discarded_file_gives_its_pages_back_though_still_mapped(tmp_path):
    """An agent keeps what it read mapped: deleting the file alone would leave its
    pages in RAM, outside the budget, until that agent let go of it."""
    for how in ("unlink", "discard"):
        path = tmp_path / f"{how}.arrow"
        arrowfile.write_table(_table(100_000), path)
        mappings = arrowfile.Mappings()
        arrowfile.Watched(mappings)(str(path))
        assert len(mappings) == 1
        with open(path, "rb") as f:
            if how == "unlink":
                path.unlink()
                assert os.fstat(f.fileno()).st_blocks > 0  # still held
            else:
                scratch.discard(path)
                assert os.fstat(f.fileno()).st_blocks == 0 and not path.exists()
    scratch.discard(tmp_path / "gone.arrow")  # nothing there: nothing to do
    target = tmp_path / "someone's"
    target.write_bytes(b"theirs")
    (tmp_path / "link.arrow").symlink_to(target)
    scratch.discard(tmp_path / "link.arrow")  # the link goes, what it names is untouched
    assert not (tmp_path / "link.arrow").is_symlink() and target.read_bytes() == b"theirs"
