"""A stage with a model: will a line arrive after the date committed to?

`LateScorer` is a class stage: its setup loads the model (a scikit-learn random
forest trained by `examples.model.train` on the example's own TPC-H lineitem) once
per worker; each batch is only scored. `late_loading_each_batch` is the same
model loaded on every call, as a stage without a setup has to (the benchmark's
contrast). `calibration` is a reduce: per band of predicted probability, how many
lines and how many of them really were late."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

COLUMNS = ["l_shipdate", "l_commitdate", "l_receiptdate", "l_quantity", "l_discount",
           "l_shipmode", "l_shipinstruct"]
MODES = ["AIR", "FOB", "MAIL", "RAIL", "REG AIR", "SHIP", "TRUCK"]
INSTRUCTIONS = ["COLLECT COD", "DELIVER IN PERSON", "NONE", "TAKE BACK RETURN"]


def features(t: pa.Table) -> np.ndarray:
    """Days from shipping to the committed date, quantity, discount, ship mode and
    instruction (as codes): what is known when a line ships."""
    gap = pc.days_between(t["l_shipdate"], t["l_commitdate"])
    return np.column_stack([
        gap.to_numpy(), pc.cast(t["l_quantity"], pa.float64()).to_numpy(),
        pc.cast(t["l_discount"], pa.float64()).to_numpy(),
        pc.index_in(t["l_shipmode"], pa.array(MODES)).to_numpy(zero_copy_only=False),
        pc.index_in(t["l_shipinstruct"], pa.array(INSTRUCTIONS)).to_numpy(
            zero_copy_only=False)]).astype(np.float32)


def was_late(t: pa.Table) -> pa.ChunkedArray:
    return pc.greater(t["l_receiptdate"], t["l_commitdate"])


def _scored(t: pa.Table, model) -> pa.Table:
    probability = model.predict_proba(features(t))[:, 1]
    return pa.table({"p_late": pa.array(probability), "late": was_late(t)})


def _load(path: str):
    with open(path, "rb") as f:  # the example's own model file, written by train.py
        return pickle.load(f)


class LateScorer:
    """Set up once per worker: the model read from `model` (a path)."""

    def __init__(self, model: str) -> None:
        self.model = _load(model)

    def __call__(self, t: pa.Table) -> pa.Table:
        return _scored(t, self.model)


def late_loading_each_batch(t: pa.Table, model: str) -> pa.Table:
    """The same model, loaded on every batch (what a function stage must do)."""
    return _scored(t, _load(model))


def calibration(t: pa.Table) -> pa.Table:
    """Per tenth of predicted probability: lines, mean prediction, share late."""
    band = pc.min_element_wise(pc.floor(pc.multiply(t["p_late"], 10)), 9)
    banded = pa.table({"band": pc.divide(band, 10), "p_late": t["p_late"],
                       "late": pc.cast(t["late"], pa.float64())})
    out = banded.group_by("band", use_threads=False).aggregate(  # the same sums each run
        [("p_late", "count"), ("p_late", "mean"), ("late", "mean")])
    return out.rename_columns(["band", "lines", "predicted", "actual"]).sort_by("band")
