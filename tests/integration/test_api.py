"""The Python API as a user meets it: a plain script and a notebook executed headless."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import podpipe
from tests.conftest import ROOT, SF, make_numbers, spec


@pytest.fixture
def tpch(tmp_path: Path, lineitem: Path) -> Path:
    """A checkout's layout: the examples, and TPC-H lineitem where the example looks."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "data" / f"tpch-sf{SF}").mkdir(parents=True)
    (tmp_path / "data" / f"tpch-sf{SF}" / "lineitem").symlink_to(lineitem)
    return tmp_path


def test_the_api_example_runs_as_a_plain_script(tpch):
    done = subprocess.run([sys.executable, "-m", "examples.api.q1"], cwd=tpch, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "<podpipe.Run tpch-q1 succeeded at" in done.stdout
    assert "failed: stage 'prices', batch 0" in done.stdout
    assert 'examples/api/broken.py", line 7, in prices' in done.stdout
    assert done.stdout.rstrip().endswith("failed")  # podpipe.status("latest")


def test_the_api_notebook_runs_headless(tpch):
    notebook = nbformat.read(tpch / "examples" / "api" / "q1.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tpch)}}).execute()
    outputs = ["".join(o.get("text", "") or o.get("data", {}).get("text/plain", "")
                       for o in cell.get("outputs", [])) for cell in notebook.cells
               if cell.cell_type == "code"]
    assert "succeeded" in outputs[1]
    assert "'total': (1, 4)" in outputs[2]
    assert "count_order" in outputs[3] and "14876" in outputs[3]
    assert "stage 'prices', batch 0" in outputs[4] and "broken.py" in outputs[4]


def test_a_dict_spec_runs_and_reads_back(tmp_path, monkeypatch):
    make_numbers(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "stages"))
    document = spec([{"name": "double", "run": "pystages:double", "inputs": ["source"]}],
                    [{"name": "out", "input": "double", "uri": "out/"}])
    with subprocess.Popen(["sleep", "60"]) as mine:  # the caller's own child
        run = podpipe.run(document, overrides=["source.batchRows=5000"])
        assert mine.poll() is None, "podpipe ended a process of its caller"
        mine.kill()
    assert _is_subreaper() == 0  # the caller's process is left as it was
    assert run.state == "succeeded"
    assert run.stages["double"].batches_done == 2  # one per file
    assert [Path(f).name for f in run.sink_files("out")] == [
        f"part-{b:06d}.parquet" for b in range(2)]
    assert run.to_arrow("out")["x"].to_pylist() == [2 * x for x in range(10_000)]
    assert podpipe.status(run.run_dir).state == "succeeded"
    assert os.getcwd() == str(tmp_path)


def _is_subreaper() -> int:
    import ctypes

    value = ctypes.c_int(-1)
    ctypes.CDLL(None).prctl(37, ctypes.byref(value))  # PR_GET_CHILD_SUBREAPER
    return value.value


def test_an_invalid_spec_raises_spec_error_naming_the_field(tmp_path):
    document = spec([{"name": "Bad_Name", "run": "m:f", "inputs": ["source"]}],
                    [{"input": "x", "uri": "out/"}])
    with pytest.raises(podpipe.SpecError, match=r"spec.stages\[0\].name"):
        podpipe.run(document)
    with pytest.raises(podpipe.UsageError, match="expected a path, YAML text"):
        podpipe.validate(42)


def test_a_standing_line_from_python(tmp_path, monkeypatch):
    """`podpipe.up` as a context manager: jobs submitted, waited for and read back as
    tables; a failing job raises RunError naming its stage and batch; the line is down
    after the block, and a dict spec's temporary file is not needed by it."""
    make_numbers(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests" / "stages"))
    document = spec([{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]},
                     {"name": "double", "run": "pystages:double", "inputs": ["boom"]}],
                    [{"name": "out", "input": "double", "uri": "out/"}], name="line")
    with podpipe.up(document) as line:
        assert line.status().state == "up"
        first = line.submit(sinks={"out": "out/a/"},
                            overrides=["stages.boom.env.BOOM_AT='-1'"]).wait()
        assert first.state == "succeeded"
        doubled = first.to_arrow("out")
        assert doubled.num_rows == 10_000 and doubled["x"][3].as_py() == 6
        failing = line.submit(sinks={"out": "out/b/"})
        with pytest.raises(podpipe.RunError, match="stage 'boom', batch 2"):
            failing.wait()
        again = line.submit(sinks={"out": "out/c/"},
                            overrides=["stages.boom.env.BOOM_AT='-1'"]).wait()
        assert again.to_arrow("out").equals(doubled)
        assert isinstance(again, podpipe.Run) and repr(again).startswith("<podpipe.Job ")
    assert line.status().state == "down"
    with pytest.raises(podpipe.UsageError, match="line line is down"):
        line.submit(sinks={"out": "out/d/"})
