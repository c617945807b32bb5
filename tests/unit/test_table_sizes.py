"""Tables before anything runs: their identity, their size, whether they fit."""

from __future__ import annotations

import os
from collections import namedtuple

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from podpipe.errors import UsageError
from podpipe.model import spec as specs
from podpipe.runtime.data import arrowfile, tables


def _pipeline(tmp_path, memory: str = "64MiB", columns=None):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": str(tmp_path / "x.parquet")}, "memory": memory,
                    "tables": [{"name": "dim", "uri": str(tmp_path / "dim"),
                                **({"columns": columns} if columns else {})}],
                    "stages": [{"name": "a", "run": "m:f", "inputs": ["source", "dim"]}],
                    "sinks": [{"input": "a", "uri": str(tmp_path / "out")}]}}
    return specs.parse(yaml.safe_dump(doc))


@pytest.fixture
def dim(tmp_path):
    (tmp_path / "dim").mkdir()
    for i in range(2):
        pq.write_table(pa.table({"k": pa.array(range(i * 50_000, (i + 1) * 50_000)),
                                 "name": pa.array([f"name-{j}" for j in range(50_000)])}),
                       tmp_path / "dim" / f"part-{i}.parquet")
    return tmp_path / "dim"


def test_a_table_loads_whole_from_every_file_and_its_size_is_estimated_from_footers(
        tmp_path, dim):
    pipeline = _pipeline(tmp_path, columns=["k"])
    table = tables.load(pipeline.tables[0])
    assert table.column_names == ["k"] and table.num_rows == 100_000
    assert table["k"].to_pylist() == list(range(100_000))  # files in order
    estimate, real = tables.estimate(pipeline.tables[0]), arrowfile.ipc_size(table)
    assert real / 2 < estimate < real * 2
    both = tables.estimate(_pipeline(tmp_path).tables[0])
    assert both > estimate * 2  # the names count only when read


def test_its_version_follows_its_files(tmp_path, dim):
    table = _pipeline(tmp_path).tables[0]
    first = tables.version(table)
    assert tables.version(table) == first and first.startswith("tbl-")
    part = dim / "part-1.parquet"
    os.utime(part, (1, 1))  # a file rewritten since
    assert tables.version(table) != first
    recorded = {("dim", 0): first}
    with pytest.raises(UsageError, match=r"spec.tables\[0\] \('dim'\): its files changed"):
        tables.changed(_pipeline(tmp_path), recorded, {"dim": tables.version(table)})


def test_tables_neither_ram_nor_the_node_tier_can_hold_are_refused_before_anything_runs(
        tmp_path, dim, monkeypatch):
    pipeline = _pipeline(tmp_path, memory="1Mi")
    size = tables.estimate(pipeline.tables[0])
    assert size > 512 << 10  # more than half the budget: the node tier would hold it
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(tables.shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1 << 30))
    assert set(tables.check(pipeline, tmp_path / ".podpipe")) == {"dim"}
    monkeypatch.setattr(tables.shutil, "disk_usage", lambda path: usage(1 << 40, 0, 1000))
    with pytest.raises(UsageError, match=r"spec.tables\[0\] \('dim'\): the tables take about"):
        tables.check(pipeline, tmp_path / ".podpipe")
