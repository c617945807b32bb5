"""Workers: several processes per node, fixed or `auto`; outputs never change."""

from __future__ import annotations

import json
import os
import signal


from conftest import (make_numbers, podpipe, run_status, spec, start_run, wait_until,
                      write_spec)


def _line(tmp_path, workers, stage="pystages:double", **extra):
    """source -> double -> plus-one -> sink, every per-batch node with `workers`."""
    make_numbers(tmp_path / "data", files=4, rows=3000, row_group=500)
    nodes = [{"name": "double", "run": stage, "inputs": ["source"]},
             {"name": "plus-one", "run": "pystages:plus_one", "inputs": ["double"]}]
    sink = {"name": "out", "input": "plus-one", "uri": "out/"}
    document = spec(nodes, [sink], batch_rows=500, **extra)
    for node in [document["spec"]["source"], *document["spec"]["stages"],
                 *document["spec"]["sinks"]]:
        node["workers"] = workers
    return write_spec(tmp_path / "p.yaml", document)


def _outputs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("part-*.parquet"))}


def test_sinks_are_byte_identical_for_every_worker_count(tmp_path):
    outputs = {}
    for workers in (1, 2, 4, "auto"):
        _line(tmp_path, workers)
        done = podpipe("run", "p.yaml", "--quiet", "--run-dir", f"run-{workers}",
                       cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs[workers] = _outputs(tmp_path / "out")
        final = run_status(tmp_path / f"run-{workers}")
        if workers != "auto":
            assert final["stages"]["double"]["workers"] == workers
            assert sorted(p["worker"] for p in final["processes"]
                          if p["stage"] == "double") == list(range(workers))
        (tmp_path / "out" / "_SUCCESS.parquet").unlink()
    assert len(outputs[1]) == 24
    assert outputs[1] == outputs[2] == outputs[4] == outputs["auto"]


def test_a_killed_worker_is_restarted_and_only_its_batch_is_redone(tmp_path):
    _line(tmp_path, 3, stage="pystages:slow")
    run = start_run(tmp_path, SLOW_SECONDS="0.2")
    try:
        def busy_worker():
            current = run_status(tmp_path / "run")
            return current.get("stages", {}).get("double", {}).get("batches_done", 0) > 0
        wait_until(busy_worker, "the first batch done by a worker")
        victim = next(p["pid"] for p in run_status(tmp_path / "run")["processes"]
                      if p["stage"] == "double" and p["worker"] == 1)
        os.kill(victim, signal.SIGKILL)
    finally:
        _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    final = run_status(tmp_path / "run")
    assert final["stages"]["double"]["restarts"] == 1
    started = [line for line in podpipe("logs", "run", "double", cwd=tmp_path).stdout
               .splitlines() if ": started" in line]
    assert len(started) in (24, 25)  # every batch once, and the killed one again
    assert final["stages"]["double"]["batches_done"] == 24
    assert len(_outputs(tmp_path / "out")) == 24


def test_peak_scratch_stays_within_a_tight_budget_with_four_workers_per_node(tmp_path):
    _line(tmp_path, 4, memory="200KiB")
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    final = run_status(tmp_path / "run")
    assert final["peak_scratch_bytes"] <= final["budget_bytes"]
    assert len(_outputs(tmp_path / "out")) == 24


def test_a_swap_replaces_every_worker_of_the_stage(tmp_path):
    make_numbers(tmp_path / "data", files=4, rows=3000, row_group=500)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "tag", "run": "pystages:tag_v1_gated", "inputs": ["source"],
          "workers": 3}], [{"input": "tag", "uri": "out/"}], batch_rows=500))
    # (v1 waits for GATE before each batch: the swap lands before any is done)
    gate = tmp_path / "gate"
    run = start_run(tmp_path, GATE=str(gate))
    try:
        wait_until(lambda: sum(1 for p in run_status(tmp_path / "run").get("processes", [])
                               if p["stage"] == "tag") == 3, "three workers")
        swapped = podpipe("swap", "run", "tag", "--run", "pystages:tag_v2", "--now",
                          cwd=tmp_path)
        assert swapped.returncode == 0, swapped.stderr
    finally:
        gate.touch()
        _, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    final = run_status(tmp_path / "run")
    tag = final["stages"]["tag"]
    assert tag["workers"] == 3 and list(tag["versions"]) != [] and tag["batches_done"] == 24
    versions = {p["worker"]: p for p in final["processes"] if p["stage"] == "tag"}
    assert sorted(versions) == [0, 1, 2]
    assert set(tag["versions"]) == {tag["version"]}  # every batch by the new version


def test_plan_splits_cores_from_a_finished_runs_figures(tmp_path):
    _line(tmp_path, 1)
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path).returncode == 0
    planned = podpipe("plan", "p.yaml", "--cpus", "8", "--from", "run", "--json",
                      cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    cores = json.loads(planned.stdout)["cores"]
    assert [n["node"] for n in cores["nodes"]] == ["source", "double", "plus-one", "out"]
    assert all(n["workers"] >= 1 for n in cores["nodes"])
    assert cores["batches"] == 24 and cores["predicted_seconds"] > 0
    refused = podpipe("plan", "p.yaml", "--cpus", "8", cwd=tmp_path)
    assert refused.returncode == 2 and "needs --from RUN_DIR" in refused.stderr


def test_a_worker_still_starting_when_the_run_ends_is_stopped_not_waited_out(tmp_path):
    import yaml

    _line(tmp_path, 1, stage="latestart:double")
    document = yaml.safe_load((tmp_path / "p.yaml").read_text())
    document["spec"]["stages"][0].update(workers=2, env={"LATE_MARK": str(tmp_path / "mark")})
    write_spec(tmp_path / "p.yaml", document)
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # its second worker never said hello: told to end (SIGTERM) when the run ended,
    # not killed after the grace period (then it would have noted nothing)
    mark = (tmp_path / "mark").read_text()
    assert mark.startswith("terminated ")
    assert not os.path.exists(f"/proc/{mark.split()[1]}")
