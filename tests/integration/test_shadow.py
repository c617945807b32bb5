"""A stage's candidate run beside it: `podpipe shadow` and `promote`, real processes.

The pipeline: source -> double -> sink, ten batches of 1,000 rows. `double` waits for
the GATE file, and its batches from x = 5,000 on for GATE2 too: the test starts a
candidate before any batch is done, opens the first half, waits until the candidate
has settled every batch it was offered (a condition the run cannot skip: the second
half is held), looks, then lets the run finish.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (cli_env, make_numbers, podpipe as cli, read_sink, run_status, spec,
                      start_run, wait_until, write_spec)

BATCHES = 10


def _spec(workdir: Path, run: str = "candidates:double_in_halves", **stage) -> None:
    make_numbers(workdir / "data")
    pipeline = stage.pop("pipeline", {})
    write_spec(workdir / "p.yaml", spec(
        [{"name": "double", "run": run, "inputs": ["source"], "workers": 1, **stage}],
        [{"input": "double", "uri": "out/"}], **pipeline))


def _shadow(workdir: Path) -> dict:
    return run_status(workdir / "run").get("stages", {}).get("double", {}).get("shadow") or {}


def _settled(run_dir: Path) -> bool:
    """The first half is through `double`, and the candidate has answered for every
    batch it was offered (or skipped it)."""
    status = run_status(run_dir)
    shadow = status.get("stages", {}).get("double", {}).get("shadow") or {}
    return (status["stages"]["double"]["batches_done"] == BATCHES // 2
            and shadow.get("offered", -1) == shadow.get("compared", 0)
            + shadow.get("skipped", 0) + shadow.get("failed", 0))


def _with_candidate(workdir: Path, candidate: str, *extra: str, **stage):
    """The run started, the candidate up, the first half through and settled."""
    _spec(workdir, **stage)
    run = start_run(workdir, GATE=str(workdir / "gate"), GATE2=str(workdir / "gate2"))
    wait_until(lambda: run_status(workdir / "run").get("state") == "running", "the run up")
    started = cli("shadow", "run", "double", "--run", candidate, *extra, cwd=workdir)
    assert started.returncode == 0, started.stderr
    assert "runs beside it" in started.stdout
    (workdir / "gate").touch()
    wait_until(lambda: _settled(workdir / "run"), "the first half compared", timeout=120)
    return run


def _finish(workdir: Path, run: subprocess.Popen) -> None:
    (workdir / "gate2").touch()
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr


def test_a_candidate_that_matches_reports_every_batch_it_compared_equal(tmp_path):
    run = _with_candidate(tmp_path, "candidates:double")
    try:
        shadow = _shadow(tmp_path)
        assert shadow["state"] == "running" and shadow["version"].startswith("src-")
        assert shadow["compared"] >= 1 and shadow["equal"] == shadow["compared"]
        assert shadow["differing"] == 0 and shadow["failed"] == 0
        shown = cli("shadow", "run", "double", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert f"compared {shadow['compared']} of the stage's 5 batches" in shown.stdout
        assert f"{shadow['equal']} equal, 0 differing" in shown.stdout
        _finish(tmp_path, run)
    finally:
        run.kill()
    assert read_sink(tmp_path / "out")["x"].to_pylist() == [2 * x for x in range(10_000)]
    final = _shadow(tmp_path)
    assert final["state"] == "stopped" and final["differing"] == 0
    log = (tmp_path / "run" / "logs" / "double@shadow.log").read_text()
    assert "batch" in log and "equal" in log


def test_a_candidate_that_differs_names_the_columns_rows_and_differences(tmp_path):
    run = _with_candidate(tmp_path, "candidates:double_off")
    try:
        shadow = _shadow(tmp_path)
        assert shadow["compared"] >= 1 and shadow["differing"] == shadow["compared"]
        first = shadow["differences"][0]
        batch, comparison = first["batch"], first["comparison"]
        assert comparison["equal"] is False and comparison["schema"] == ""
        assert comparison["rows_differing"] == 10  # x ending in 07: ten a batch
        [column] = comparison["columns"]
        assert (column["name"], column["rows"], column["max_abs"]) == ("x", 10, 1.0)
        x = 1000 * batch + 7  # the first differing row: live 2x, candidate 2x + 1
        assert comparison["examples"][0] == {"row": 7, "x": [2 * x, 2 * x + 1]}
        assert column["max_rel"] == pytest.approx(1 / (2 * x + 1))
        shown = cli("shadow", "run", "double", cwd=tmp_path)
        assert f"batch {batch}: 10 of 1,000 rows differ, in x (10 rows, max abs 1" \
            in shown.stdout
        assert f"row 7: x {2 * x} live, {2 * x + 1} candidate" in shown.stdout
        as_json = json.loads(cli("shadow", "run", "double", "--json", cwd=tmp_path).stdout)
        assert as_json["differences"][0] == first
        _finish(tmp_path, run)
    finally:
        run.kill()
    # the live version's output, not the candidate's, went down the line
    assert read_sink(tmp_path / "out")["x"].to_pylist() == [2 * x for x in range(10_000)]
    conductor = (tmp_path / "run" / "logs" / "conductor.log").read_text()
    assert f"batch {batch} differs: 10 of 1,000 rows differ, in x (10 rows" in conductor
    from test_loop import _in_tmux

    screen = _in_tmux(tmp_path, "podpipe shadow run double", rows=30).splitlines()
    assert all(len(line) <= 80 for line in screen)  # wrapped by words at 80 columns:
    assert '(stages.double.run="candidates:double_off"), stopped' in screen
    assert f"batch {batch}: 10 of 1,000 rows differ, in x (10 rows, max abs 1, max rel " \
        f"{1 / (2 * x + 1):.3g})" in screen
    assert f"  row 7: x {2 * x} live, {2 * x + 1} candidate" in screen
    report = cli("report", "run", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "run" / "report.html").read_text()
    section = page[page.index('<section class="shadow" data-node="double">'):]
    assert f"<tr><td>{batch}</td><td>10 of 1,000 rows differ, in x (10 rows" in section


def _clean_run(workdir: Path, **stage) -> Path:
    """The same pipeline without a candidate: its sink."""
    _spec(workdir, **stage)
    for gate in ("gate", "gate2"):
        (workdir / gate).touch()
    run = start_run(workdir, GATE=str(workdir / "gate"), GATE2=str(workdir / "gate2"))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    return workdir / "out"


def _same_files(one: Path, other: Path) -> bool:
    names = sorted(p.name for p in one.glob("part-*"))
    return names == sorted(p.name for p in other.glob("part-*")) and len(names) == BATCHES \
        and all((one / n).read_bytes() == (other / n).read_bytes() for n in names)


@pytest.mark.parametrize("candidate, failure", [
    ("candidates:raises", "ValueError: this candidate is broken on purpose"),
    ("candidates:hangs", "timed out after 3 s (the stage's timeout)"),
    ("candidates:dies", "its process exited with code -9")])
def test_a_candidate_that_fails_leaves_the_run_as_it_was(tmp_path, candidate, failure):
    # 0.6 s a batch, a timeout of 3 s: the candidate hangs past it while the run goes
    stage = {"run": "candidates:double_slowly", "timeout": 3}
    clean = _clean_run(tmp_path / "clean", **stage)
    _spec(tmp_path, **stage)
    run = start_run(tmp_path, GATE=str(tmp_path / "gate"))
    try:
        wait_until(lambda: run_status(tmp_path / "run").get("state") == "running", "the run")
        started = cli("shadow", "run", "double", "--run", candidate, cwd=tmp_path)
        assert started.returncode == 0, started.stderr
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
    finally:
        run.kill()
    assert _same_files(tmp_path / "out", clean)  # byte for byte
    final = run_status(tmp_path / "run")["stages"]["double"]
    assert final["restarts"] == 0  # the live stage never noticed
    shadow = final["shadow"]
    assert shadow["failed"] >= 1 and shadow["compared"] == 0
    assert any(failure in f for f in shadow["failures"]), shadow["failures"]
    pids = subprocess.run(["pgrep", "-f", "double@shadow"], capture_output=True, text=True)
    assert pids.stdout == ""  # (nothing left of it)


def test_under_a_tight_budget_the_candidate_skips_and_the_run_goes_on(tmp_path):
    # 48 KiB: room for the line's batch and its output, not for the files a candidate
    # would hold open beside them and its output
    run = _with_candidate(tmp_path, "candidates:double", pipeline={"memory": "48KiB"})
    try:
        shadow = _shadow(tmp_path)
        assert shadow["skipped"] >= 1 and shadow["skipped"] == shadow["offered"]
        _finish(tmp_path, run)
    finally:
        run.kill()
    assert read_sink(tmp_path / "out")["x"].to_pylist() == [2 * x for x in range(10_000)]


def test_promote_makes_the_candidate_live_from_the_next_batch(tmp_path):
    clean = _clean_run(tmp_path / "clean", run="candidates:double_off", version="v2")
    run = _with_candidate(tmp_path, "candidates:double_off", "--version", "v2")
    try:
        old = run_status(tmp_path / "run")["stages"]["double"]["version"]
        promote = subprocess.Popen([sys.executable, "-m", "podpipe", "promote", "run",
                                    "double"], cwd=tmp_path, env=cli_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: "promote of stage 'double'" in
                   (tmp_path / "run" / "logs" / "conductor.log").read_text(), "the promote")
        _finish(tmp_path, run)  # (the live version's batch in flight ends: then the swap)
        out, err = promote.communicate(timeout=60)
        assert promote.returncode == 0, err
        assert "now runs its candidate, version v2" in out
    finally:
        run.kill()
    written = []
    for path in sorted((tmp_path / "out").glob("part-*.parquet")):
        metadata = pq.read_schema(path).metadata
        written.append(json.loads(metadata[b"podpipe.versions"])["double"])
    switch = written.index(["v2"])
    assert switch >= BATCHES // 2 and written == [[old]] * switch + [["v2"]] * (BATCHES - switch)
    for batch in range(switch, BATCHES):  # what v2 made: a clean run of v2's bytes
        name = f"part-{batch:06d}.parquet"
        assert (tmp_path / "out" / name).read_bytes() == (clean / name).read_bytes()
    final = run_status(tmp_path / "run")
    assert final["stages"]["double"]["shadow"]["state"] == "promoted"
    log = (tmp_path / "run" / "logs" / "conductor.log").read_text()
    assert "promote of stage 'double' to its candidate, version v2: " in log


def test_shadow_refuses_what_it_cannot_do(tmp_path):
    run = _with_candidate(tmp_path, "candidates:double")
    try:
        for args, message in (
                (["nope", "--run", "candidates:double"], "no stage 'nope' in this run"),
                (["double", "--run", "candidates:double"], "has a candidate already"),
                (["double", "--run", "candidates:double", "--every", "0"],
                 "--every: expected 1 or more")):
            refused = cli("shadow", "run", *args, cwd=tmp_path)
            assert refused.returncode == 2 and message in refused.stderr, refused.stderr
            assert "Traceback" not in refused.stderr
        stopped = cli("shadow", "run", "double", "--stop", cwd=tmp_path)
        assert stopped.returncode == 0 and "is stopped" in stopped.stdout
        wait_until(lambda: _shadow(tmp_path)["state"] == "stopped", "the stop shown")
        missing = cli("shadow", "run", "double", "--run", "candidates:missing", cwd=tmp_path)
        assert missing.returncode == 2 and "cannot import 'candidates:missing'" in missing.stderr
        again = cli("promote", "run", "double", cwd=tmp_path)
        assert again.returncode == 2 and "has no candidate running" in again.stderr
        _finish(tmp_path, run)
    finally:
        run.kill()
    never = cli("shadow", "run", "double", "--run", "candidates:double", cwd=tmp_path)
    assert never.returncode == 2 and "not running" in never.stderr


def test_a_line_runs_a_candidate_beside_its_jobs_until_it_is_stopped(tmp_path):
    _spec(tmp_path)
    gates = {"GATE": tmp_path / "gate", "GATE2": tmp_path / "gate2"}
    up = cli("up", "p.yaml", "--name", "t", cwd=tmp_path,
             **{k: str(v) for k, v in gates.items()})
    assert up.returncode == 0, up.stderr

    def job(out: str) -> Path:
        """A job submitted, held at its gates until its first half is compared."""
        for gate in gates.values():
            gate.unlink(missing_ok=True)
        submitted = cli("submit", "t", "--set", f"sinks.0.uri={out}/", cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stderr
        return Path(submitted.stdout.split("run directory: ")[1].strip())

    def through(run_dir: Path, compared: bool) -> dict | None:
        """The job let through; its candidate's figures."""
        wait_until(lambda: run_status(run_dir).get("state") == "running", "the job")
        gates["GATE"].touch()
        if compared:
            wait_until(lambda: _settled(run_dir), "the job's first half compared", 120)
        gates["GATE2"].touch()
        wait_until(lambda: run_status(run_dir).get("state") == "succeeded", "the job done")
        return run_status(run_dir)["stages"]["double"].get("shadow")

    try:
        between = cli("shadow", "t", "double", "--run", "candidates:double", cwd=tmp_path)
        assert between.returncode == 2 and "no job is running on the line" in between.stderr
        first = job("one")
        wait_until(lambda: run_status(first).get("state") == "running", "the job running")
        started = cli("shadow", "t", "double", "--run", "candidates:double_off", cwd=tmp_path)
        assert started.returncode == 0 and "runs beside it" in started.stdout, started.stderr
        shadow = through(first, compared=True)
        assert shadow["state"] == "stopped" and shadow["differing"] == shadow["compared"] >= 1
        second = through(job("two"), compared=True)  # the line started it again
        assert second["overrides"] == ['stages.double.run="candidates:double_off"']
        assert second["differing"] == second["compared"] >= 1
        dropped = cli("shadow", "t", "double", "--stop", cwd=tmp_path)
        assert dropped.returncode == 0 and "is stopped" in dropped.stdout, dropped.stderr
        again = cli("shadow", "t", "double", "--stop", cwd=tmp_path)
        assert again.returncode == 2 and "runs no candidate of 'double'" in again.stderr
        assert through(job("three"), compared=False) is None
        for out in ("one", "two", "three"):  # the live version's output, every job
            assert read_sink(tmp_path / out)["x"].to_pylist() == \
                [2 * x for x in range(10_000)]
        wait_until(lambda: subprocess.run(["pgrep", "-f", "double@shadow"],
                                          capture_output=True).returncode == 1,
                   "no candidate left")
    finally:
        cli("down", "t", cwd=tmp_path)
