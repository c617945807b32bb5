"""Stations: class stages set up once per worker, called per batch and closed on a
clean end; params; versions per callable; validate importing run: targets; serving
command stages (JavaScript, Python); GPUs per worker; the model example. Real
processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (STAGES, make_numbers, node_stage, podpipe, read_sink, run_status, spec,
                      start_run, wait_until, write_spec)


def _spec(workdir: Path, scale: dict, *, batch_rows: int = 334, **extra) -> None:
    make_numbers(workdir / "data")
    (workdir / "setups").mkdir()
    stages = [{"name": "scale", "inputs": ["source"], "params": {"factor": 3},
               "env": {"SETUP_DIR": str(workdir / "setups")}, **scale},
              {"name": "shift", "run": "pystages:offset", "inputs": ["scale"],
               "params": {"by": 1}}]
    write_spec(workdir / "p.yaml", spec(stages, [{"input": "shift", "uri": "out/"}],
                                        batch_rows=batch_rows, **extra))


def _made(workdir: Path, what: str) -> set[int]:
    return {int(p.name.split("-")[1]) for p in (workdir / "setups").glob(f"{what}-*")}


def test_a_class_stage_is_set_up_once_per_worker_and_closed_at_the_end(tmp_path):
    _spec(tmp_path, {"run": "pystages:Scaled", "workers": 2})  # 30 batches
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == \
        [3 * x + 1 for x in range(10_000)]  # both params reached their stage
    status = run_status(tmp_path / "run")
    assert status["stages"]["scale"]["batches_done"] == 30
    setups = _made(tmp_path, "setup")
    assert len(setups) == 2  # one a worker, not one a batch
    assert _made(tmp_path, "closed") == setups
    assert status["stages"]["scale"]["setup_seconds"] > 0
    assert status["stages"]["shift"]["setup_seconds"] == 0  # a function: nothing set up
    log = (tmp_path / "run" / "logs" / "scale.log").read_text()
    assert "set up in" in log
    # The report's timeline: a setup bar in each of the class's workers' lanes.
    report = podpipe("report", "run", "-o", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert page.count('<rect class="setup" data-node="scale"') == 2
    assert page.count('<rect class="setup"') == 2 and "setting up" in page


def test_a_killed_class_stage_is_set_up_again_and_only_a_clean_end_closes(tmp_path):
    _spec(tmp_path, {"run": "pystages:ScaledDyingOnce", "workers": 1,
                     "env": {"SETUP_DIR": str(tmp_path / "setups"), "DIE_ON_CALL": "3",
                             "DIE_MARKER": str(tmp_path / "died")}})
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "died").exists()
    setups, closed = _made(tmp_path, "setup"), _made(tmp_path, "closed")
    assert len(setups) == 2 and len(closed) == 1  # the killed one never closed
    assert closed < setups
    assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == \
        [3 * x + 1 for x in range(10_000)]


def test_a_setup_that_raises_is_a_death_and_its_log_shows_the_users_line(tmp_path):
    _spec(tmp_path, {"run": "pystages:NoModel", "retries": 1, "params": {}})
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "stage 'scale': its setup raised (its log shows where)" in done.stderr
    assert "Traceback" not in done.stderr
    status = run_status(tmp_path / "run")
    assert status["state"] == "failed" and status["stages"]["scale"]["restarts"] == 1
    log = (tmp_path / "run" / "logs" / "scale.log").read_text()
    assert "the setup of 'pystages:NoModel' raised FileNotFoundError: no model file" in log
    source = Path(__file__).parents[1] / "stages" / "pystages.py"
    line = next(i for i, text in enumerate(source.read_text().splitlines(), 1)
                if "no model file at" in text)
    assert f'File "{source}", line {line}, in __init__' in log


def test_params_a_stage_cannot_take_are_refused_naming_the_field(tmp_path):
    _spec(tmp_path, {"run": "pystages:Scaled"})
    bad = podpipe("run", "p.yaml", "--quiet", "--set", "stages.scale.params.speed=2",
                  cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "spec.stages[0].params" in bad.stderr and "speed" in bad.stderr
    assert "Traceback" not in bad.stderr
    command = spec([{"name": "tool", "command": ["cat"], "inputs": ["source"],
                     "params": {"by": 1}}], [{"input": "tool", "uri": "out/"}])
    write_spec(tmp_path / "c.yaml", command)
    on_command = podpipe("validate", "c.yaml", cwd=tmp_path)
    assert on_command.returncode == 2
    assert "spec.stages[0].params" in on_command.stderr and "command" in on_command.stderr


def test_a_standing_line_sets_a_class_stage_up_once_for_all_its_jobs(tmp_path):
    """On a line, a class stage defined alike job after job keeps its instance: set up
    when the line comes up, closed when it goes down."""
    _spec(tmp_path, {"run": "pystages:Scaled", "workers": 1}, batch_rows=2000)
    up = podpipe("up", "p.yaml", "--name", "s", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    try:
        for n in range(3):
            done = podpipe("submit", "s", "--wait", "--set", f"sinks.0.uri=out{n}/",
                           cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            assert sorted(read_sink(tmp_path / f"out{n}")["x"].to_pylist()) == \
                [3 * x + 1 for x in range(10_000)]
        assert len(_made(tmp_path, "setup")) == 1 and not _made(tmp_path, "closed")
    finally:
        assert podpipe("down", "s", cwd=tmp_path).returncode == 0
    assert _made(tmp_path, "closed") == _made(tmp_path, "setup")  # closed as it went down


MYSTAGES = '''\
import pyarrow.compute as pc


def helper(column):
    return pc.multiply(column, 2)


def doubled(t):
    return t.set_column(0, "x", helper(t["x"]))


def kept(t):
    return t  # kept
'''


def _versions(workdir: Path, run: str) -> dict[str, str]:
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", run, cwd=workdir)
    assert done.returncode == 0, done.stderr
    status = run_status(workdir / run)
    return {name: stage["version"] for name, stage in status["stages"].items()
            if name in ("doubled", "kept")}


def test_a_stage_is_versioned_by_its_own_code_not_its_modules(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "doubled", "run": "mystages:doubled", "inputs": ["source"]},
         {"name": "kept", "run": "mystages:kept", "inputs": ["doubled"]}],
        [{"input": "kept", "uri": "out/", "mode": "overwrite"}], batch_rows=5000))
    (tmp_path / "mystages.py").write_text(MYSTAGES)
    first = _versions(tmp_path, "one")
    assert len(set(first.values())) == 2
    (tmp_path / "mystages.py").write_text(MYSTAGES.replace("t  # kept", "t.slice(0)"))
    second = _versions(tmp_path, "two")
    assert second["doubled"] == first["doubled"] and second["kept"] != first["kept"]
    (tmp_path / "mystages.py").write_text(MYSTAGES.replace("column, 2", "column, 3"))
    third = _versions(tmp_path, "three")
    assert third["doubled"] != first["doubled"] and third["kept"] == first["kept"]
    assert sorted(read_sink(tmp_path / "out")["x"].to_pylist()) == \
        [3 * x for x in range(10_000)]


def test_validate_imports_each_run_target_and_names_what_does_not_load(tmp_path):
    make_numbers(tmp_path / "data")
    (tmp_path / "mystages.py").write_text(MYSTAGES)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "doubled", "run": "mystages:doubeld", "inputs": ["source"]},
         {"name": "kept", "run": "mystages:kept", "inputs": ["doubled"],
          "params": {"speed": 2}}],
        [{"input": "kept", "uri": "out/"}]))
    bad = podpipe("validate", "p.yaml", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert ("spec.stages[0].run: cannot import 'mystages:doubeld': AttributeError: "
            "module 'mystages' has no attribute 'doubeld'") in bad.stderr
    assert "(and 1 more: spec.stages[1].params)" in bad.stderr
    assert podpipe("validate", "p.yaml", "--no-import", cwd=tmp_path).returncode == 0
    fixed = ["--set", "stages.doubled.run=mystages:doubled", "--set", "stages.kept.params={}"]
    good = podpipe("validate", "p.yaml", *fixed, cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "valid pipeline 't' with 2 stages" in good.stdout
    (tmp_path / "mystages.py").write_text("import time\ntime.sleep(600)\n" + MYSTAGES)
    slow = podpipe("validate", "p.yaml", *fixed, "--import-timeout", "1", cwd=tmp_path)
    assert slow.returncode == 2
    assert "importing the stages' modules took longer than 1 s" in slow.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_a_swap_of_a_class_stage_sets_the_new_class_up_in_a_new_process(tmp_path):
    make_numbers(tmp_path / "data")
    (tmp_path / "setups").mkdir()
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "gate", "run": "pystages:double_then_gated", "inputs": ["source"],
          "workers": 1},
         {"name": "scale", "run": "pystages:Scaled", "inputs": ["gate"], "workers": 1,
          "params": {"factor": 3}, "env": {"SETUP_DIR": str(tmp_path / "setups")}}],
        [{"input": "scale", "uri": "out/"}]))  # 10 batches, the last 5 gated
    run = start_run(tmp_path, GATE=str(tmp_path / "gate"))
    try:
        wait_until(lambda: run_status(tmp_path / "run").get("stages", {}).get("scale", {})
                   .get("batches_done", 0) >= 1, "a batch through the first class")
        swapped = podpipe("swap", "run", "scale", "--run", "pystages:ScaledPlusOne",
                          cwd=tmp_path)
        assert swapped.returncode == 0, swapped.stderr
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 0, stderr
    setups, closed = _made(tmp_path, "setup"), _made(tmp_path, "closed")
    assert len(setups) == 2 and closed == setups  # each class set up in its process, closed
    versions = run_status(tmp_path / "run")["stages"]["scale"]["versions"]
    assert len(versions) == 2 and sum(versions.values()) == 10
    plus_one = 0
    for path in sorted((tmp_path / "out").glob("part-*.parquet")):
        xs = pq.read_table(path)["x"].to_pylist()
        low = min(xs) // 6  # the batch's first source x
        offset = xs[0] - 6 * low
        assert offset in (0, 1) and xs == [6 * x + offset for x in range(low, low + 1000)]
        assert offset == 1 or low < 5000  # gated batches only reach the new version
        plus_one += offset
    assert plus_one == versions[run_status(tmp_path / "run")["stages"]["scale"]["version"]]


def test_a_serving_js_stage_takes_100_batches_in_one_process_per_worker(tmp_path):
    make_numbers(tmp_path / "data")
    starts = tmp_path / "starts"
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "js", "command": ["node", str(node_stage("serve_double.mjs"))],
          "serve": True, "inputs": ["source"], "workers": 2,
          "env": {"STARTS_FILE": str(starts)}}],
        [{"input": "js", "uri": "out/"}], batch_rows=100))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = read_sink(tmp_path / "out")
    assert out["x"].to_pylist() == [2.0 * x for x in range(10_000)]
    assert out["batch"].to_pylist() == [x // 100 for x in range(10_000)]
    status = run_status(tmp_path / "run")
    assert status["stages"]["js"]["batches_done"] == 100
    pids = starts.read_text().split()
    assert 1 <= len(pids) <= 2 and len(set(pids)) == len(pids)  # not one per batch
    for pid in pids:  # each ended with its worker (its stdin closed)
        assert not Path(f"/proc/{pid}").exists()


def test_a_serving_stage_that_answers_an_error_fails_the_run_naming_the_batch(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "js", "command": ["node", str(node_stage("serve_double.mjs"))],
          "serve": True, "inputs": ["source"], "workers": 1, "env": {"FAIL_BATCH": "4"}}],
        [{"input": "js", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 1
    assert ("stage 'js', batch 4: RuntimeError: command 'node' failed batch 4: "
            "Error: no x to double here") in done.stderr
    assert "Traceback" not in done.stderr


def test_a_serving_stage_that_exits_fails_the_batch_it_was_on(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "py", "command": [sys.executable, "-u", str(STAGES / "serve_double.py")],
          "serve": True, "inputs": ["source"], "workers": 1, "env": {"EXIT_BATCH": "6"}}],
        [{"input": "py", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 1
    assert (f"stage 'py', batch 6: RuntimeError: command {sys.executable!r} (serving) exited with "
            "code 5 on batch 6") in done.stderr
    log = (tmp_path / "run" / "logs" / "py.log").read_text()
    assert "a line for the log" in log  # its stdout lines that are not answers
    fixed = podpipe("resume", "run", "--quiet", cwd=tmp_path)
    assert fixed.returncode == 1  # still exits at batch 6: resumed, not trusted


def test_serve_is_refused_on_a_python_stage(tmp_path):
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "s", "run": "pystages:double", "serve": True, "inputs": ["source"]}],
        [{"input": "s", "uri": "out/"}]))
    done = podpipe("validate", "p.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "spec.stages[0].serve: serve is a command stage's" in done.stderr


def _devices_seen(workdir: Path) -> dict[int, str]:
    return {int(p.name.split("-")[1]): p.read_text()
            for p in (workdir / "setups").glob("devices-*")}


@pytest.mark.parametrize("workers", [4, "auto"])
def test_each_worker_of_a_gpu_stage_gets_its_own_devices_and_auto_is_capped(tmp_path,
                                                                             workers):
    """A pod with 2 GPUs (`spec.gpus`), a stage asking for one per worker: with 4 fixed
    workers, two get a device each and two none; `auto` gives it no more than 2
    workers however long its batches wait; other stages see no device."""
    make_numbers(tmp_path / "data")
    (tmp_path / "setups").mkdir()
    stages = [{"name": "score", "run": "pystages:SeesDevices", "inputs": ["source"],
               "resources": {"gpu": 1}, "workers": workers,
               "env": {"SETUP_DIR": str(tmp_path / "setups")}},
              {"name": "after", "run": "pystages:SeesDevices", "inputs": ["score"],
               "workers": 1, "env": {"SETUP_DIR": str(tmp_path / "setups" / "after")}}]
    (tmp_path / "setups" / "after").mkdir()
    write_spec(tmp_path / "p.yaml", spec(stages, [{"input": "after", "uri": "out/"}],
                                         batch_rows=200, gpus=2))  # 50 batches
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   CUDA_VISIBLE_DEVICES="")  # what this machine has: none
    assert done.returncode == 0, done.stderr
    seen = _devices_seen(tmp_path)
    if workers == 4:
        assert seen == {0: "0", 1: "1", 2: "", 3: ""}
    else:
        assert seen == {0: "0", 1: "1"}  # grown to its devices, no further
        assert run_status(tmp_path / "run")["stages"]["score"]["workers"] <= 2
    assert (tmp_path / "setups" / "after" / "devices-0").read_text() == ""
    assert read_sink(tmp_path / "out").num_rows == 10_000


def test_the_model_example_trains_on_its_data_and_scores_with_its_model_set_up_once(
        tmp_path, lineitem):
    """examples/model: a random forest trained on the example's own lineitem, then a
    class stage loading it once per worker; its predictions are calibrated."""
    from conftest import ROOT, SF

    (tmp_path / "data" / f"tpch-sf{SF}").mkdir(parents=True)
    (tmp_path / "data" / f"tpch-sf{SF}" / "lineitem").symlink_to(lineitem)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    trained = subprocess.run([sys.executable, "-m", "examples.model.train", "--sf", str(SF),
                              "--rows", "20000"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr
    model = tmp_path / "data" / f"tpch-sf{SF}" / "models" / "late.pkl"
    assert model.stat().st_size > 0 and "accuracy 0.9" in trained.stdout
    done = podpipe("run", str(ROOT / "examples" / "model" / "score.yaml"), "--quiet",
                   "--run-dir", "run", "--set", f"source.uri={lineitem}/*.parquet",
                   "--set", "source.batchRows=10000",
                   "--set", f"stages.score.params.model={model}",
                   "--set", "stages.score.workers=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    bands = pq.read_table(tmp_path / "out" / "late-lines").to_pylist()
    assert sum(b["lines"] for b in bands) == sum(pq.read_metadata(p).num_rows
                                                 for p in lineitem.glob("*.parquet"))
    for band in bands:  # calibrated: what it predicts is what happened, within a band
        if band["lines"] >= 500:
            assert abs(band["predicted"] - band["actual"]) < 0.1, band
    status = run_status(tmp_path / "run")
    assert status["stages"]["score"]["setup_seconds"] > 0
    assert status["stages"]["score"]["batches_done"] >= 6
    setups = (tmp_path / "run" / "logs").glob("score*.log")
    assert sum(log.read_text().count("set up in") for log in setups) <= 2  # per worker


def _indexed(workdir: Path) -> list[str]:
    """Each setup of `pystages:Labelled`: the rows of the table it indexed."""
    return [line for p in (workdir / "setups").glob("index-*")
            for line in p.read_text().splitlines()]


def test_a_table_handed_to_a_class_setup_is_indexed_once_per_worker(tmp_path):
    """`setupInputs: [codes]`: the table the pod loaded once, handed to the class's
    setup at each worker's first task (not to every call); a function, or a name
    that is not a table, is refused naming the field."""
    import pyarrow as pa

    make_numbers(tmp_path / "data")
    (tmp_path / "setups").mkdir()
    pq.write_table(pa.table({"k": range(10), "label": [f"L{k}" for k in range(10)]}),
                   tmp_path / "codes.parquet")
    document = spec([{"name": "labelled", "run": "pystages:Labelled", "inputs": ["source"],
                      "setupInputs": ["codes"], "workers": 2, "params": {"modulo": 10},
                      "env": {"SETUP_DIR": str(tmp_path / "setups")}}],
                    [{"input": "labelled", "uri": "out/"}], batch_rows=500)  # 20 batches
    document["spec"]["tables"] = [{"name": "codes", "uri": "codes.parquet"}]
    write_spec(tmp_path / "p.yaml", document)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = read_sink(tmp_path / "out")
    assert out["label"].to_pylist() == [f"L{x % 10}" for x in range(10_000)]
    indexed = _indexed(tmp_path)
    assert 1 <= len(indexed) <= 2 and set(indexed) == {"10"}  # once a worker, whole table
    status = run_status(tmp_path / "run")
    assert status["stages"]["labelled"]["setup_seconds"] > 0
    assert status["stages"]["codes"]["batches_done"] == 1  # loaded into the pod once
    report = podpipe("report", "run", "-o", "report.html", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert page.count('<rect class="setup" data-node="labelled"') == len(indexed)
    for bad, message in ((["--set", "stages.labelled.run=pystages:with_label",
                           "--set", "stages.labelled.params={}"],
                          "spec.stages[0].setupInputs: 'pystages:with_label' is not a class"),
                         (["--set", "stages.labelled.setupInputs=[source]"],
                          "spec.stages[0].setupInputs: 'source': setupInputs are tables")):
        refused = podpipe("run", "p.yaml", "--quiet", *bad, cwd=tmp_path)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_a_line_keeps_a_setup_built_from_a_table_until_the_table_changes(tmp_path):
    """On a standing line, a class stage set up with a table (`setupInputs`) keeps its
    index from job to job while the table's files are as they were; once they change,
    the next job reloads the table and sets the class up again with it."""
    import pyarrow as pa

    make_numbers(tmp_path / "data")
    (tmp_path / "setups").mkdir()

    def codes(labels: str) -> None:
        pq.write_table(pa.table({"k": range(10), "label": [f"{labels}{k}" for k in range(10)]}),
                       tmp_path / "codes.parquet")
    codes("L")
    document = spec([{"name": "labelled", "run": "pystages:Labelled", "inputs": ["source"],
                      "setupInputs": ["codes"], "workers": 1,
                      "env": {"SETUP_DIR": str(tmp_path / "setups")}}],
                    [{"input": "labelled", "uri": "out/"}], batch_rows=5000)
    document["spec"]["tables"] = [{"name": "codes", "uri": "codes.parquet"}]
    write_spec(tmp_path / "p.yaml", document)
    assert podpipe("up", "p.yaml", "--name", "t", cwd=tmp_path).returncode == 0
    try:
        def job(n: int) -> list[str]:
            done = podpipe("submit", "t", "--wait", "--set", f"sinks.0.uri=out{n}/",
                           cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            return sorted(set(read_sink(tmp_path / f"out{n}")["label"].to_pylist()))
        assert job(0) == job(1) == [f"L{k}" for k in range(10)]
        assert len(_indexed(tmp_path)) == 1  # set up once for both jobs
        codes("M")
        assert job(2) == [f"M{k}" for k in range(10)]  # the new table, indexed anew
        assert len(_indexed(tmp_path)) == 2
    finally:
        assert podpipe("down", "t", cwd=tmp_path).returncode == 0
