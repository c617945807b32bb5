"""TPC-H Q1 as four stages: filter, price, partial aggregate per batch, final reduce.

Money stays in decimals end to end, so the sums match the official answer to the
last digit; the averages are doubles, as in the reference answers.
"""

from __future__ import annotations

import datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.compute as pc

# l_shipdate <= date '1998-12-01' - interval '90' day
CUTOFF = datetime.date(1998, 9, 2)
KEYS = ["l_returnflag", "l_linestatus"]
_ONE = pa.scalar(Decimal("1.00"), pa.decimal128(15, 2))


def filter_shipdate(lineitem: pa.Table) -> pa.Table:
    return lineitem.filter(pc.less_equal(lineitem["l_shipdate"],
                                         pa.scalar(CUTOFF, pa.date32())))


def prices(lineitem: pa.Table) -> pa.Table:
    disc_price = pc.multiply(lineitem["l_extendedprice"],
                             pc.subtract(_ONE, lineitem["l_discount"]))
    disc_price = disc_price.cast(pa.decimal128(20, 4))
    charge = pc.multiply(disc_price, pc.add(_ONE, lineitem["l_tax"]))
    return pa.table({
        "l_returnflag": lineitem["l_returnflag"], "l_linestatus": lineitem["l_linestatus"],
        "l_quantity": lineitem["l_quantity"], "l_extendedprice": lineitem["l_extendedprice"],
        "l_discount": lineitem["l_discount"], "disc_price": disc_price, "charge": charge,
    })


def partial_aggregate(priced: pa.Table) -> pa.Table:
    """Per-batch sums and counts: what the final reduce combines."""
    grouped = priced.group_by(KEYS).aggregate([
        ("l_quantity", "sum"), ("l_extendedprice", "sum"), ("disc_price", "sum"),
        ("charge", "sum"), ("l_discount", "sum"), ("l_quantity", "count"),
    ])
    return grouped.rename_columns({
        "l_quantity_sum": "sum_qty", "l_extendedprice_sum": "sum_base_price",
        "disc_price_sum": "sum_disc_price", "charge_sum": "sum_charge",
        "l_discount_sum": "sum_disc", "l_quantity_count": "count_order",
    })


SUMS = ["sum_qty", "sum_base_price", "sum_disc_price", "sum_charge", "sum_disc", "count_order"]


def merge(partials: pa.Table) -> pa.Table:
    """A shard's partial sums combined into one partial per group: what `total`
    combines across shards (same columns as `partial_aggregate`)."""
    merged = partials.group_by(KEYS, use_threads=False).aggregate(
        [(c, "sum") for c in SUMS]).sort_by([(k, "ascending") for k in KEYS])
    return merged.rename_columns({f"{c}_sum": c for c in SUMS})


def total(partials: pa.Table) -> pa.Table:
    """Combine every batch's partial sums into Q1's answer."""
    sums = partials.group_by(KEYS, use_threads=False).aggregate([
        ("sum_qty", "sum"), ("sum_base_price", "sum"), ("sum_disc_price", "sum"),
        ("sum_charge", "sum"), ("sum_disc", "sum"), ("count_order", "sum"),
    ]).sort_by([(k, "ascending") for k in KEYS])
    count = sums["count_order_sum"]

    def avg(column: str) -> pa.ChunkedArray:
        return pc.divide(sums[column].cast(pa.float64()), count.cast(pa.float64()))

    return pa.table({
        "l_returnflag": sums["l_returnflag"], "l_linestatus": sums["l_linestatus"],
        "sum_qty": sums["sum_qty_sum"], "sum_base_price": sums["sum_base_price_sum"],
        "sum_disc_price": sums["sum_disc_price_sum"], "sum_charge": sums["sum_charge_sum"],
        "avg_qty": avg("sum_qty_sum"), "avg_price": avg("sum_base_price_sum"),
        "avg_disc": avg("sum_disc_sum"), "count_order": count,
    })


ALL = [filter_shipdate, prices, partial_aggregate]


def in_one_process(batches: list[pa.Table]) -> pa.Table:
    """The floor: the same functions chained in one process on the same batches."""
    partials = []
    for batch in batches:
        for stage in ALL:
            batch = stage(batch)
        partials.append(batch)
    return total(pa.concat_tables(partials))
