"""TPC-H Q12 and Q3 as pod pipelines: lineitem streams through, orders and customer
are tables loaded into the pod once (`spec.tables`) and joined with every batch.

Each query is a filter per batch, a join with the tables and a partial aggregate
per batch, then a reduce per shard that combines the partials and a global one that
combines the shards'. Joins and aggregates run
single-threaded (`use_threads=False`): a stage is one worker's core, and the
order of its output rows stays the same from run to run.
"""

from __future__ import annotations

import datetime

import pyarrow as pa
import pyarrow.compute as pc

# -- Q12: shipping modes and order priority -----------------------------------------

MODES = ["MAIL", "SHIP"]
YEAR = (datetime.date(1994, 1, 1), datetime.date(1995, 1, 1))
URGENT = ["1-URGENT", "2-HIGH"]


def late_lines(lineitem: pa.Table) -> pa.Table:
    """Lines shipped by MAIL or SHIP, received in 1994, late (committed before they
    were received, shipped before the commit date)."""
    keep = pc.and_(
        pc.and_(pc.is_in(lineitem["l_shipmode"], pa.array(MODES)),
                pc.less(lineitem["l_commitdate"], lineitem["l_receiptdate"])),
        pc.and_(pc.less(lineitem["l_shipdate"], lineitem["l_commitdate"]),
                pc.and_(pc.greater_equal(lineitem["l_receiptdate"], pa.scalar(YEAR[0])),
                        pc.less(lineitem["l_receiptdate"], pa.scalar(YEAR[1])))))
    return lineitem.filter(keep).select(["l_orderkey", "l_shipmode"])


def with_priority(lines: pa.Table, orders: pa.Table) -> pa.Table:
    """Each late line with its order's priority (orders is the table). The hash table
    is built on the right side: the batch's few late lines, not the 1.5 M orders of
    SF 1 again for every batch (0.007 s a batch instead of 0.19 s)."""
    return orders.join(lines, "o_orderkey", "l_orderkey", join_type="inner",
                       use_threads=False).select(["l_shipmode", "o_orderpriority"])


def count_lines(lines: pa.Table) -> pa.Table:
    """Per batch: lines of urgent or high-priority orders, and the others, per mode."""
    high = pc.is_in(lines["o_orderpriority"], pa.array(URGENT)).cast(pa.int64())
    counted = pa.table({"l_shipmode": lines["l_shipmode"], "high_line_count": high,
                        "low_line_count": pc.subtract(pa.scalar(1, pa.int64()), high)})
    return _sums(counted, ["l_shipmode"], ["high_line_count", "low_line_count"])


def q12_total(partials: pa.Table) -> pa.Table:
    return _sums(partials, ["l_shipmode"], ["high_line_count", "low_line_count"]).sort_by(
        "l_shipmode")


# -- Q3: shipping priority ----------------------------------------------------------

SEGMENT = "BUILDING"
DAY = datetime.date(1995, 3, 15)
Q3_KEYS = ["l_orderkey", "o_orderdate", "o_shippriority"]
_ONE = pa.scalar(1, pa.decimal128(15, 2))


def shipped(lineitem: pa.Table) -> pa.Table:
    """Lines shipped after the day, with their revenue."""
    after = lineitem.filter(pc.greater(lineitem["l_shipdate"], pa.scalar(DAY)))
    revenue = pc.multiply(after["l_extendedprice"], pc.subtract(_ONE, after["l_discount"]))
    return pa.table({"l_orderkey": after["l_orderkey"], "revenue": revenue})


def with_orders(lines: pa.Table, orders: pa.Table, customer: pa.Table) -> pa.Table:
    """Per batch: revenue of open orders of BUILDING customers (both tables)."""
    buyers = customer.filter(pc.equal(customer["c_mktsegment"], SEGMENT)).select(["c_custkey"])
    open_orders = orders.filter(pc.less(orders["o_orderdate"], pa.scalar(DAY)))
    open_orders = open_orders.join(buyers, "o_custkey", "c_custkey", join_type="left semi",
                                   use_threads=False)
    joined = lines.join(open_orders.select(["o_orderkey", "o_orderdate", "o_shippriority"]),
                        "l_orderkey", "o_orderkey", join_type="inner", use_threads=False)
    return _sums(joined, Q3_KEYS, ["revenue"])


def q3_merge(partials: pa.Table) -> pa.Table:
    """A shard's revenue per order (its batches' partials combined)."""
    return _sums(partials, Q3_KEYS, ["revenue"])


def q3_top(partials: pa.Table) -> pa.Table:
    """The ten orders of most revenue (ties: the earlier order date first)."""
    total = _sums(partials, Q3_KEYS, ["revenue"])
    top = total.sort_by([("revenue", "descending"), ("o_orderdate", "ascending"),
                         ("l_orderkey", "ascending")]).slice(0, 10)
    return top.select(["l_orderkey", "revenue", "o_orderdate", "o_shippriority"])


def _sums(table: pa.Table, keys: list[str], columns: list[str]) -> pa.Table:
    """`columns` summed per `keys`, named as they were."""
    summed = table.group_by(keys, use_threads=False).aggregate([(c, "sum") for c in columns])
    return summed.rename_columns({f"{c}_sum": c for c in columns}).select(keys + columns)
