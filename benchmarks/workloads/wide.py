"""A wider graph over lineitem: Q1 and Q6 branches share one filtered input and meet
again per batch before the final reduce (fan-out, fan-in, 7 stages).

    source -> filter -> prices -> partial ----------\
                     \-> q6_select -> q6_revenue ---> combine -> total
"""

from __future__ import annotations

import datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

from examples.tpch import stages as q1

Q6_FROM, Q6_TO = datetime.date(1994, 1, 1), datetime.date(1995, 1, 1)


def q6_select(lineitem: pa.Table) -> pa.Table:
    """Q6's predicate: shipped in 1994, discount 0.06 +- 0.01, quantity < 24."""
    date = lineitem["l_shipdate"]
    discount = lineitem["l_discount"]
    keep = pc.and_(pc.and_(pc.greater_equal(date, pa.scalar(Q6_FROM, pa.date32())),
                           pc.less(date, pa.scalar(Q6_TO, pa.date32()))),
                   pc.and_(pc.and_(pc.greater_equal(discount, pa.scalar(Decimal("0.05"))),
                                   pc.less_equal(discount, pa.scalar(Decimal("0.07")))),
                           pc.less(lineitem["l_quantity"], pa.scalar(Decimal("24")))))
    return lineitem.filter(keep).select(["l_extendedprice", "l_discount"])


def q6_revenue(selected: pa.Table) -> pa.Table:
    revenue = pc.sum(pc.multiply(selected["l_extendedprice"], selected["l_discount"]))
    return pa.table({"revenue": pa.array([revenue.as_py() or Decimal(0)],
                                         pa.decimal128(38, 4))})


def combine(partial: pa.Table, revenue: pa.Table) -> pa.Table:
    """Per batch: the Q1 partial sums, with that batch's Q6 revenue on the first row
    (zero on the others, so that the reduce can sum it)."""
    values = [revenue["revenue"][0].as_py()] + [Decimal(0)] * (partial.num_rows - 1)
    return partial.append_column("revenue", pa.array(values, revenue.schema.field(0).type))


def total(combined: pa.Table) -> pa.Table:
    """Q1's answer, with Q6's revenue beside it."""
    answer = q1.total(combined.drop_columns(["revenue"]))
    revenue = pc.sum(combined["revenue"]).as_py()
    return answer.append_column("q6_revenue",
                                pa.array([revenue] * answer.num_rows, pa.decimal128(38, 4)))
