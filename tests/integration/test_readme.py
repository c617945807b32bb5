"""The README's first pipeline, run exactly as written there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from tests.conftest import ROOT


def test_the_readmes_first_pipeline_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your first pipeline"):readme.index("## Where things go")]
    blocks = dict(re.findall(r"```(\w+)\n(.*?)```", section, re.S))
    (tmp_path / "stages.py").write_text(blocks["python"])
    (tmp_path / "pipeline.yaml").write_text(blocks["yaml"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "COLUMNS": "80"}
    done = subprocess.run(["bash", "-euc", blocks["sh"]], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "valid pipeline 'trips' with 3 stages and 2 sinks" in done.stdout
    assert "trips: wrote 1 file, 3 rows → out/trips/" in done.stdout  # as the README says
    cities = pq.read_table(tmp_path / "out" / "cities" / "part-000000.parquet")
    assert dict(zip(cities["city"].to_pylist(), cities["kmh_count"].to_pylist())) == {
        "Oslo": 2, "Lima": 1}
    assert (tmp_path / "out" / "trips" / "_SUCCESS.parquet").exists()
