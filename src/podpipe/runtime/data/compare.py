"""One batch's output by a stage's candidate against the live version's (`podpipe
shadow`): equal, or where they differ.

Equal means the same schema and the same contents (`Table.equals`: values, not
bytes — a candidate that chunks its output otherwise is still equal). Otherwise: how
the schemas differ; the row counts; and, for the same number of rows, row by row
for each column both have: how many rows differ, for numbers the largest absolute
and relative difference, and a few differing rows. Nulls equal nulls, NaN equals
NaN. Columns of a type Arrow cannot compare element-wise (lists, structs) are
compared as Python values.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from podpipe.runtime.data.arrowfile import schema_difference
from podpipe.runtime.plumbing.protocol import Comparison, Differing

EXAMPLES = 3  # differing rows shown


def compare(live: pa.Table, candidate: pa.Table, examples: int = EXAMPLES) -> Comparison:
    same_schema = live.schema.equals(candidate.schema)
    schema = "" if same_schema else schema_difference(live.schema, candidate.schema)
    rows = (live.num_rows, candidate.num_rows)
    if same_schema and rows[0] == rows[1] and live.equals(candidate):
        return Comparison(equal=True, live_rows=rows[0], rows=rows[1])
    if rows[0] != rows[1]:  # row by row means nothing: the counts say it
        return Comparison(equal=False, live_rows=rows[0], rows=rows[1], schema=schema)
    columns: list[Differing] = []
    masks: dict[str, pa.Array] = {}
    for name in [n for n in live.column_names if n in candidate.column_names]:
        a, b = live.column(name), candidate.column(name)
        mask = _differs(a, b)
        count = pc.sum(mask).as_py() or 0
        if count:
            masks[name] = mask
            columns.append(Differing(name, count, *_numeric(a, b, mask)))
    any_row = None
    for mask in masks.values():
        any_row = mask if any_row is None else pc.or_(any_row, mask)
    differing = 0 if any_row is None else (pc.sum(any_row).as_py() or 0)
    shown = [] if any_row is None else \
        pc.indices_nonzero(any_row).slice(0, examples).to_pylist()
    return Comparison(
        equal=False, live_rows=rows[0], rows=rows[1], schema=schema,
        rows_differing=differing, columns=columns,
        examples=[{"row": i, **{name: [_plain(live.column(name)[i].as_py()),
                                       _plain(candidate.column(name)[i].as_py())]
                                for name in masks}} for i in shown])


def _differs(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.Array:
    """True where `a` and `b` differ, row by row (a column of another type in the
    candidate: where the values differ once cast to one type, the live one's or else
    the candidate's; all rows if they cannot be)."""
    if not a.type.equals(b.type):
        try:
            b = b.cast(a.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            try:
                a = a.cast(b.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                return pa.array([True] * len(a))
    try:
        same = pc.fill_null(pc.equal(a, b), False)
    except pa.ArrowNotImplementedError:  # lists, structs: as Python values
        return pa.array([x != y for x, y in zip(a.to_pylist(), b.to_pylist())])
    same = pc.or_(same, pc.and_(pc.is_null(a), pc.is_null(b)))
    if pa.types.is_floating(a.type):
        same = pc.or_(same, pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False))
    return pc.invert(same)


def _numeric(a: pa.ChunkedArray, b: pa.ChunkedArray,
             mask: pa.Array) -> tuple[float | None, float | None]:
    """For numbers, the largest absolute and relative differences where they differ."""
    kinds = (pa.types.is_integer, pa.types.is_floating, pa.types.is_decimal)
    if not (any(k(a.type) for k in kinds) and any(k(b.type) for k in kinds)):
        return None, None
    try:
        x = pc.filter(a, mask).cast(pa.float64())
        y = pc.filter(b, mask).cast(pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None, None
    gap = pc.abs(pc.subtract(x, y))
    scale = pc.max_element_wise(pc.abs(x), pc.abs(y))
    relative = pc.divide(gap, pc.if_else(pc.equal(scale, 0.0), None, scale))
    return _finite(pc.max(gap).as_py()), _finite(pc.max(relative).as_py())


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """A value as JSON carries it: numbers, text, booleans and null as they are, the
    rest (dates, decimals, bytes, nested) as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)
