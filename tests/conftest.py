"""Shared fixtures: specs on disk, the CLI as a real process, small datasets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
STAGES = ROOT / "tests" / "stages"


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(STAGES), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def podpipe(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in its own process."""
    return subprocess.run([sys.executable, "-m", "podpipe", *args], cwd=cwd, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def start_run(cwd: Path, **env: str) -> subprocess.Popen:
    """`podpipe run p.yaml --quiet --run-dir run` in `cwd`, left running (the test
    acts on it, then `communicate`s)."""
    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run"], cwd=cwd, env=cli_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Stages that sleep or hang to keep a run going while a test acts on it: one worker
# each, so that `workers: auto` (which gives a waiting stage a worker per batch) does
# not end the run before the test gets to it. Tests of workers set them explicitly.
TIME_BUYING = {"pystages:slow", "pystages:hang_once", "pystages:hang_on_batch_one",
               "pystages:q1_total_gated", "pystages:tag_v1_gated",
               "pystages:double_then_gated"}


def spec(stages: list[dict], sinks: list[dict], *, uri: str = "data/*.parquet",
         batch_rows: int = 1000, memory: str = "256MiB", name: str = "t", **extra) -> dict:
    stages = [{**stage, "workers": 1} if stage.get("run") in TIME_BUYING and
              "workers" not in stage and not stage.get("reduce") else stage
              for stage in stages]
    return {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": name},
            "spec": {"source": {"uri": uri, "batchRows": batch_rows}, "stages": stages,
                     "sinks": sinks, "memory": memory, **extra}}


def write_spec(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def wait_until(condition, what: str, timeout: float = 60) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def node_stage(name: str) -> Path:
    """A JavaScript stage of tests/stages/js, once node and apache-arrow are there."""
    import shutil

    if not shutil.which("node"):
        pytest.fail("node is not installed: .ci/run installs it")
    if not (STAGES / "js" / "node_modules" / "apache-arrow").exists():
        pytest.fail("run `npm ci --prefix tests/stages/js` first (.ci/run does)")
    return STAGES / "js" / name


def run_status(run_dir: Path) -> dict:
    """A run directory's status.json as it is now ({} before the first write)."""
    import json

    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def make_numbers(folder: Path, files: int = 2, rows: int = 5000, row_group: int = 1000) -> Path:
    """Parquet files with column x = 0, 1, 2, ... across files."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        start = i * rows
        table = pa.table({"x": pa.array(range(start, start + rows), pa.int64())})
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=row_group)
    return folder


def read_sink(folder: Path) -> pa.Table:
    files = sorted(folder.glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def pytest_collection_modifyitems(items) -> None:
    """Every integration test runs real pods: `-m "not slow"` is the fast loop."""
    for item in items:
        if "integration" in Path(str(item.fspath)).parts:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    make_numbers(tmp_path / "data")
    return tmp_path


@pytest.fixture(autouse=True)
def no_scratch_left():
    """Every test must leave no RAM scratch of its own behind."""
    before = set(Path("/dev/shm").glob("podpipe-*"))
    yield
    left = set(Path("/dev/shm").glob("podpipe-*")) - before
    assert not left, f"scratch left behind: {sorted(left)}"


SF = 0.01  # the TPC-H scale factor of the tests


@pytest.fixture(scope="session")
def lineitem(tmp_path_factory) -> Path:
    """TPC-H lineitem at SF 0.01 as Parquet, made once per session."""
    from examples.tpch import data

    return data.generate(SF, tmp_path_factory.mktemp("tpch") / "lineitem", rows_per_group=10_000)
