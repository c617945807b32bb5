"""A candidate's output against the live one's (`runtime.data.compare`), on real tables."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from podpipe.runtime.data.compare import compare


def test_equal_contents_are_equal_however_they_are_chunked():
    live = pa.table({"x": [1, 2, 3], "s": ["a", None, "c"]})
    chunked = pa.concat_tables([live.slice(0, 1), live.slice(1)])
    assert chunked.column("x").num_chunks == 2
    said = compare(live, chunked)
    assert said.equal and said.columns == [] and said.said() == "the contents differ"


def test_nulls_equal_nulls_and_nan_equals_nan():
    live = pa.table({"f": [1.0, None, math.nan]})
    same = compare(live, pa.table({"f": [1.0, None, math.nan]}))
    assert not same.columns and same.rows_differing == 0


def test_numbers_that_differ_say_where_and_by_how_much():
    live = pa.table({"x": [10, 20, 30, 40], "y": ["a", "b", "c", "d"]})
    said = compare(live, pa.table({"x": [10, 21, 30, 44], "y": ["a", "b", "c", "e"]}))
    assert not said.equal and said.rows_differing == 2
    x, y = said.columns
    assert (x.name, x.rows, x.max_abs) == ("x", 2, 4.0)
    assert x.max_rel == pytest.approx(4 / 44)
    assert (y.name, y.rows, y.max_abs, y.max_rel) == ("y", 1, None, None)
    assert said.examples == [{"row": 1, "x": [20, 21], "y": ["b", "b"]},
                             {"row": 3, "x": [40, 44], "y": ["d", "e"]}]
    assert said.said() == "2 of 4 rows differ, in x (2 rows, max abs 4, max rel 0.0909), " \
        "y (1 rows)"


def test_other_schemas_and_row_counts_are_named():
    live = pa.table({"x": pa.array([1, 2], pa.int64())})
    wider = compare(live, pa.table({"x": pa.array([1, 2], pa.int64()), "z": [0, 0]}))
    assert not wider.equal and "'z' is in one only" in wider.schema
    assert wider.columns == []  # the common column is the same
    cast = compare(live, pa.table({"x": pa.array([1.0, 2.5])}))
    assert "int64 in one and double in the other" in cast.schema
    assert [(c.name, c.rows) for c in cast.columns] == [("x", 1)]
    fewer = compare(live, live.slice(1))
    assert (fewer.live_rows, fewer.rows, fewer.columns) == (2, 1, [])
    assert fewer.said() == "1 rows where the live version made 2"


def test_nested_values_are_compared_as_python_values():
    live = pa.table({"l": [[1, 2], [3]]})
    said = compare(live, pa.table({"l": [[1, 2], [4]]}))
    assert [(c.name, c.rows) for c in said.columns] == [("l", 1)]
    assert said.examples == [{"row": 1, "l": ["[3]", "[4]"]}]
