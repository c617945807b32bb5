"""A stage with a mistake in it, for the API example."""

import pyarrow as pa


def prices(t: pa.Table) -> pa.Table:
    return t.append_column("charge", t["l_extendedprice_typo"])
