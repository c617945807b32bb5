"""Source batches: deterministic, covering every row exactly once, in order."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpipe.errors import DataError
from podpipe.model.spec import Source
from podpipe.runtime.data import source


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 50), max_size=12), batch_rows=st.integers(1, 40))
def test_packing_covers_every_row_once_and_respects_batch_rows(sizes, batch_rows):
    part_bytes = [7 * size + 1 for size in sizes]
    batches = source._pack("f", sizes, batch_rows, part_bytes)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    covered = []
    for b in batches:
        rows = [r for part in b.parts for r in range(starts[part], starts[part] + sizes[part])]
        if b.length is not None:
            rows = rows[b.offset:b.offset + b.length]
        assert 0 < len(rows) <= batch_rows
        if b.length is None:
            assert b.nbytes == sum(part_bytes[p] for p in b.parts)
        else:  # a slice: its row group is read once, for its first slice
            assert b.nbytes == (part_bytes[b.parts[0]] if b.offset == 0 else 0)
        covered.extend(rows)
    assert covered == list(range(sum(sizes)))
    assert sum(b.nbytes for b in batches) == sum(p for p, n in zip(part_bytes, sizes) if n)


def test_loading_the_plan_gives_back_the_files_rows_in_order(tmp_path):
    for i in range(3):
        table = pa.table({"x": list(range(i * 700, (i + 1) * 700)), "y": [i] * 700})
        pq.write_table(table, tmp_path / f"f{i}.parquet", row_group_size=300)
    src = Source(uri=str(tmp_path / "*.parquet"), format="parquet", batch_rows=250,
                 columns=("x",))
    plan = source.plan(src)
    loader = source.Loader(src)
    tables = [loader.load(b) for b in plan]
    assert all(t.column_names == ["x"] for t in tables)
    assert pa.concat_tables(tables)["x"].to_pylist() == list(range(2100))
    assert plan == source.plan(src)  # deterministic


@pytest.mark.parametrize("fmt,write", [
    ("csv", lambda t, p: __import__("pyarrow.csv").csv.write_csv(t, p)),
    ("arrow", lambda t, p: __import__("pyarrow.feather").feather.write_feather(
        t, p, compression="uncompressed", chunksize=100)),
], ids=["csv", "arrow-ipc"])
def test_csv_and_arrow_ipc_sources_load(tmp_path, fmt, write):
    table = pa.table({"x": list(range(1000))})
    write(table, str(tmp_path / f"data.{fmt}"))
    src = Source(uri=str(tmp_path / f"data.{fmt}"), format=fmt, batch_rows=300)
    plan = source.plan(src)
    assert len(plan) == 4  # csv: 4 slices of 250 rows; arrow: 3 + 3 + 3 + 1 batches of 100
    if fmt == "csv":
        assert [b.length for b in plan] == [250] * 4
    loaded = pa.concat_tables([source.Loader(src).load(b) for b in plan])
    assert loaded["x"].to_pylist() == list(range(1000))


def test_a_row_group_cut_into_slices_is_decoded_once(tmp_path, monkeypatch):
    pq.write_table(pa.table({"x": list(range(1000))}), tmp_path / "f.parquet",
                   row_group_size=1000)
    src = Source(uri=str(tmp_path / "f.parquet"), format="parquet", batch_rows=100)
    plan = source.plan(src)
    assert len(plan) == 10
    loader = source.Loader(src)
    decoded = []
    real = loader._decode
    monkeypatch.setattr(loader, "_decode", lambda b: decoded.append(b) or real(b))
    tables = [loader.load(b) for b in plan]
    assert len(decoded) == 1  # one decode for the ten slices
    assert pa.concat_tables(tables)["x"].to_pylist() == list(range(1000))
    assert loader.kept is None  # let go after its last slice


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "matches no files"),
    (lambda p: (p / "bad.parquet").write_bytes(b"not parquet at all"), "cannot read as parquet"),
], ids=["no-files", "corrupt-file"])
def test_unreadable_sources_are_data_errors(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        source.plan(Source(uri=str(tmp_path / "*.parquet"), format="parquet", batch_rows=10))
