"""Candidates for `benchmarks/shadow.py`: a version of Q1's prices stage that fails
every batch (what a broken candidate costs the live run)."""

from __future__ import annotations

import pyarrow as pa


def prices_broken(t: pa.Table) -> pa.Table:
    raise ValueError("a bug in this candidate of prices")
