"""A user's stage module with a mistake in it, for the tests of what a failure shows."""

import pyarrow as pa


def helper(t: pa.Table):
    return t["missing_column"]  # the user's mistake: line 7


def enrich(t: pa.Table) -> pa.Table:
    helper(t)
    return t
