"""Stages around the quote service: which lines to quote, and the quotes summed."""

from __future__ import annotations

import datetime

import pyarrow as pa
import pyarrow.compute as pc

MONTH = (datetime.date(1995, 6, 1), datetime.date(1995, 7, 1))


def june_lines(lineitem: pa.Table) -> pa.Table:
    """The lines shipped in June 1995: what is sent to the service."""
    shipped = lineitem["l_shipdate"]
    keep = pc.and_(pc.greater_equal(shipped, pa.scalar(MONTH[0])),
                   pc.less(shipped, pa.scalar(MONTH[1])))
    return lineitem.filter(keep).select(["l_shipmode", "l_quantity"])


def with_quotes(lines: pa.Table, quotes: pa.Table) -> pa.Table:
    """Not a stage: the floor of the example's test (the lines and their quotes)."""
    return lines.append_column("quote", quotes["quote"])


def total(quotes: pa.Table) -> pa.Table:
    """Quotes summed: one row, the cost of shipping June 1995."""
    return pa.table({"quotes": [quotes.num_rows],
                     "total": pa.array([pc.sum(quotes["quote"]).as_py()],
                                       quotes.schema.field("quote").type)})
