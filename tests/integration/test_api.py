"""The Python API as a user meets it: a plain script and a notebook executed headless."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pyarrow.parquet as pq
import pytest
import yaml
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


def test_the_notebook_with_stages_in_its_cells_runs_headless(tmp_path):
    """examples/api/stages.ipynb: a function and a class defined in cells, run from a
    dict and from YAML naming `__main__:NAME`, shipped to the stage processes; the
    progress and the summary as HTML (no ipywidgets here); pandas and polars."""
    import importlib.util

    assert importlib.util.find_spec("ipywidgets") is None  # the plain HTML output's case
    notebook = nbformat.read(ROOT / "examples" / "api" / "stages.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [o for o in code[2].outputs if o.output_type == "display_data"]
    assert len(shown) == 1 and "<progress value='4' max='4'>" in shown[0].data["text/html"]
    assert "podpipe run trips: succeeded" in shown[0].data["text/plain"]
    summary = next(o for o in code[2].outputs if o.output_type == "execute_result")
    assert "succeeded" in summary.data["text/html"] and "fares" in summary.data["text/html"]
    trips = [((i % 97) / 4, 5 + i % 41) for i in range(10_000)]
    short = [(km, minutes) for km, minutes in trips if km <= 4.0]
    assert f"count  {len(short)}.0" in code[3].outputs[0].data["text/plain"]
    fare = max(km * 1.5 + 2.5 for km, _ in short)  # params reached the class
    assert f"│ {fare}" in code[4].outputs[0].data["text/plain"]
    again = code[5].outputs[0].text.split()
    assert again[:2] == ["succeeded", str(sum(km <= 5.0 for km, _ in trips))]
    assert again[2].startswith("src-")
    assert ("spec.stages[0].run: cannot ship 'locked' to its stage process: TypeError: "
            "cannot pickle '_thread.lock' object") in code[6].outputs[0].text
    runs = [r for r in (tmp_path / ".podpipe" / "runs").iterdir() if not r.is_symlink()]
    assert len(runs) == 2  # what could not be shipped started no run
    for run in runs:  # each kept its code, this user's alone
        shipped = list((run / "podpipe-shipped").iterdir())
        assert shipped and all(p.stat().st_mode & 0o077 == 0 for p in shipped)


SCRIPT = '''\
import os
import sys

import pyarrow.compute as pc

import podpipe

OFFSET = int(os.environ.get("OFFSET", "1"))


def shifted(t):
    if os.environ.get("FAIL_AT") == str(pc.min(t["x"]).as_py()):
        raise ValueError("not yet")
    return t.set_column(0, "x", pc.add(t["x"], OFFSET))


if __name__ == "__main__":
    try:
        run = podpipe.run("p.yaml", run_dir="run")
    except podpipe.RunError as error:
        print("failed at", error.batch)
        sys.exit(1)
    print(run.state, run.to_arrow("out")["x"].to_pylist()[:2])
'''


def test_a_scripts_own_function_is_shipped_kept_with_the_run_and_resumed(tmp_path):
    make_numbers(tmp_path / "data")
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec(
        [{"name": "shift", "run": "__main__:shifted", "inputs": ["source"], "workers": 1}],
        [{"name": "out", "input": "shift", "uri": "out/"}])))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "FAIL_AT": "5000"}
    failed = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "failed at 5" in failed.stdout, failed.stderr
    shipped = tmp_path / "run" / "podpipe-shipped" / "shift.pkl"
    assert shipped.stat().st_mode & 0o077 == 0
    # The command line resumes it with the code the run kept, not the script.
    (tmp_path / "script.py").unlink()
    del env["FAIL_AT"]
    resumed = subprocess.run([sys.executable, "-m", "podpipe", "resume", "run", "--quiet"],
                             cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    out = pq.read_table(tmp_path / "out")
    assert sorted(out["x"].to_pylist()) == [x + 1 for x in range(10_000)]
    # Run from the command line, nothing is shipped: said, not a temp file's name.
    cli = subprocess.run([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2
    assert ("spec.stages[0].run: '__main__:shifted' names a function of the notebook or "
            "script that runs the pipeline, and none was shipped") in cli.stderr
    assert "Traceback" not in cli.stderr


LINE_SCRIPT = '''\
import pyarrow.compute as pc

import podpipe


def tripled(t):
    return t.set_column(0, "x", pc.multiply(t["x"], 3))


document = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline",
            "metadata": {"name": "shipped-line"},
            "spec": {"source": {"uri": "data/*.parquet", "batchRows": 5000},
                     "stages": [{"name": "t", "run": tripled, "inputs": ["source"]}],
                     "sinks": [{"name": "out", "input": "t", "uri": "out/"}]}}
with podpipe.up(document) as line:
    for day in ("a", "b"):
        job = line.submit(sinks={"out": f"out/{day}/"}).wait()
        print(day, job.state, job.to_arrow("out")["x"].to_pylist()[:3])
'''


def test_a_standing_line_takes_a_stage_defined_in_the_script_that_starts_it(tmp_path):
    make_numbers(tmp_path / "data")
    (tmp_path / "line.py").write_text(LINE_SCRIPT)
    done = subprocess.run([sys.executable, "line.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["a succeeded [0, 3, 6]", "b succeeded [0, 3, 6]"]
    line = next((tmp_path / ".podpipe" / "lines").iterdir())
    assert (line / "podpipe-shipped" / "t.pkl").stat().st_mode & 0o077 == 0
