"""The loop a user lives in: see why a stage failed, find runs, wait for one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import STAGES, cli_env, make_numbers, podpipe, spec, wait_until, write_spec

MISTAKE = f'File "{STAGES / "mystage.py"}", line 7, in helper'


def _failing(workdir: Path) -> None:
    make_numbers(workdir / "data", files=1, rows=100)
    write_spec(workdir / "p.yaml", spec([{"name": "enrich", "run": "mystage:enrich",
                                          "inputs": ["source"]}],
                                        [{"input": "enrich", "uri": "out/"}]))


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_a_failing_stage_shows_the_users_file_and_line_in_the_terminal(tmp_path):
    _failing(tmp_path)
    screen = _in_tmux(tmp_path, "podpipe run p.yaml", rows=24)
    assert "EXIT=1" in screen
    assert "stage 'enrich', batch 0: KeyError" in screen
    assert MISTAKE in screen, screen
    assert 'return t["missing_column"]' in screen
    assert "logs/enrich.log" in screen


def test_logs_of_the_latest_run_show_the_same_traceback(tmp_path):
    _failing(tmp_path)
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 1 and MISTAKE in done.stderr
    shown = podpipe("logs", "latest", "enrich", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert f"[enrich]   {MISTAKE}" in shown.stdout
    everything = podpipe("logs", "latest", cwd=tmp_path).stdout
    assert f"[enrich]   {MISTAKE}" in everything
    unknown = podpipe("logs", "latest", "nope", cwd=tmp_path)
    assert unknown.returncode == 2 and "no log of 'nope'" in unknown.stderr


def test_quiet_still_says_how_the_run_ended_and_where_it_is(workdir):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", cwd=workdir)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("t: succeeded in ") and "run directory .podpipe/runs/t-" in line


def test_runs_are_listed_newest_first_and_latest_is_the_newest(workdir):
    write_spec(workdir / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                          "inputs": ["source"]}],
                                        [{"input": "s", "uri": "out/"}]))
    assert podpipe("runs", cwd=workdir).returncode == 0  # none yet: an empty list
    for _ in range(2):
        assert podpipe("run", "p.yaml", "--quiet", cwd=workdir).returncode == 0
    found = json.loads(podpipe("runs", "--json", cwd=workdir).stdout)
    assert [r["state"] for r in found] == ["succeeded", "succeeded"]
    assert found[0]["started"] > found[1]["started"]
    latest = json.loads(podpipe("status", "latest", "--json", cwd=workdir).stdout)
    assert latest["run_id"] == found[0]["run_id"]


@pytest.mark.parametrize("stage, code", [("pystages:slow", 0), ("pystages:fail_on_third", 1)],
                         ids=["succeeds", "fails"])
def test_wait_returns_the_runs_own_exit_code(tmp_path, stage, code):
    make_numbers(tmp_path / "data", files=3, rows=1000, row_group=1000)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": stage, "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run"], cwd=tmp_path,
                           env=cli_env(SLOW_SECONDS="0.5", BOOM_AT="2500"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (tmp_path / "run" / "status.json").exists(), "the run to start")
    waited = podpipe("wait", "run", cwd=tmp_path)
    run.communicate(timeout=60)
    assert waited.returncode == code == run.returncode, waited.stdout + waited.stderr
    assert ("succeeded" if code == 0 else "failed") in waited.stdout


def test_wait_gives_up_after_its_timeout_on_a_run_still_going(tmp_path):
    make_numbers(tmp_path / "data", files=3, rows=1000, row_group=1000)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:slow",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run"], cwd=tmp_path, env=cli_env(SLOW_SECONDS="5"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (tmp_path / "run" / "status.json").exists(), "the run to start")
        started = time.monotonic()
        waited = podpipe("wait", "run", "--timeout", "0.5", cwd=tmp_path)
        assert waited.returncode == 124 and "running" in waited.stdout
        assert time.monotonic() - started < 30
    finally:
        run.send_signal(2)
        run.communicate(timeout=60)


def _in_tmux(workdir: Path, commands: str, rows: int) -> str:
    """The screen of a tmux pane 80 columns wide once `commands` (podpipe's, `;`
    between them) have run in `workdir` and printed `EXIT=<the last one's code>`."""
    session = f"podpipe-test-{workdir.name}"[:40]
    env = cli_env()
    podpipe_ = f"{sys.executable} -m podpipe"
    command = (f"cd {workdir} && export PYTHONPATH={env['PYTHONPATH']}; "
               f"{commands.replace('podpipe', podpipe_)}; echo EXIT=$?; sleep 600")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", str(rows),
                    command], check=True)  # (the pane stays, to be read)
    screen = ""
    try:
        def finished() -> bool:
            nonlocal screen
            screen = _tmux_screen(session)
            return "EXIT=" in screen
        wait_until(finished, f"{commands!r} to end in the terminal")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    return screen


def _tmux_screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-J", "-t", session],
                          capture_output=True, text=True).stdout


def _hung_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A run whose stage hangs on its first call (until stopped); resumed, it works."""
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=500)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:hang_once",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}], batch_rows=500))
    marker = tmp_path / "hung"
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run"], cwd=tmp_path,
                           env=cli_env(HANG_MARKER=str(marker)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(marker.exists, "the stage to hang")
    return run, marker


def test_stop_ends_a_run_as_ctrl_c_does_and_resume_finishes_it(tmp_path):
    run, marker = _hung_run(tmp_path)
    try:
        stopped = podpipe("stop", "run", cwd=tmp_path)
    finally:
        out, err = run.communicate(timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert "interrupted; finish it with 'podpipe resume" in stopped.stdout
    assert run.returncode == 130, err
    assert "podpipe resume" in err  # what the interrupted run itself said
    again = podpipe("stop", "run", cwd=tmp_path)
    assert again.returncode == 2 and "not running" in again.stderr
    resumed = podpipe("resume", "run", "--quiet", cwd=tmp_path, HANG_MARKER=str(marker))
    assert resumed.returncode == 0, resumed.stderr
    assert podpipe("status", "run", cwd=tmp_path).returncode == 0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_status_watch_follows_a_run_started_elsewhere_until_it_ends(tmp_path):
    run, _ = _hung_run(tmp_path)
    session = f"podpipe-watch-{tmp_path.name}"[:40]
    env = cli_env()
    command = (f"cd {tmp_path} && PYTHONPATH={env['PYTHONPATH']} {sys.executable} -m "
               "podpipe status run --watch; echo EXIT=$?; sleep 600")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "40",
                    command], check=True)
    try:
        wait_until(lambda: "state running" in _tmux_screen(session), "the live view")
        assert "EXIT=" not in _tmux_screen(session)
        assert podpipe("stop", "run", cwd=tmp_path).returncode == 0
        wait_until(lambda: "EXIT=" in _tmux_screen(session), "the view to end with the run")
        screen = _tmux_screen(session)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        run.communicate(timeout=60)
    assert "state interrupted" in screen and "EXIT=130" in screen, screen


def test_logs_are_merged_in_time_order_and_one_batch_can_be_picked(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "chatty", "run": "pystages:chatty", "inputs": ["source"]},
         {"name": "double", "run": "pystages:double", "inputs": ["chatty"]}],
        [{"input": "double", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", cwd=workdir).returncode == 0
    lines = podpipe("logs", "latest", cwd=workdir).stdout.splitlines()
    stamps = [line.split(" ", 1)[1][:23] for line in lines if " batch " in line]
    assert len(stamps) == 2 * 4 * 10 and stamps == sorted(stamps)  # started, done; 4 nodes
    one = podpipe("logs", "latest", "--batch", "3", cwd=workdir).stdout.splitlines()
    tasks = [line for line in one if " batch " in line]
    assert {line.split("]")[0] + "]" for line in tasks} == {
        "[source]", "[chatty]", "[double]", "[sink-0]"}
    assert all(" batch 3: " in line for line in tasks), one
    assert "[chatty] chatty sees x from 3000" in one  # the stage's own print, in its task
    assert not any("sees x from 4000" in line for line in one)


def test_logs_follow_prints_until_the_run_ends(tmp_path):
    run, _ = _hung_run(tmp_path)
    with subprocess.Popen([sys.executable, "-m", "podpipe", "logs", "run", "--follow"],
                          cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as follow:
        try:
            first = follow.stdout.readline()  # it is following: the lines so far came out
            assert first.startswith("["), first
            assert follow.poll() is None
            assert podpipe("stop", "run", cwd=tmp_path).returncode == 0
            out = follow.stdout.read()  # to its end: it ends by itself with the run
            err = follow.stderr.read()
            follow.wait(timeout=60)
        finally:
            run.communicate(timeout=60)
            if follow.poll() is None:
                follow.kill()
    assert follow.returncode == 0, err
    assert "[conductor]" in out and "the run interrupted" in out, out


def test_cli_polish_plurals_no_blank_lines_no_broken_pipe(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=100)
    write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                           "inputs": ["source"]}],
                                         [{"input": "s", "uri": "out/"}]))
    valid = podpipe("validate", "p.yaml", cwd=tmp_path)
    assert "with 1 stage and 1 sink" in valid.stdout, valid.stdout

    refused = podpipe("run", "p.yaml", "--set", "source.uri=nowhere/*.parquet", cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: ") and refused.stdout == "", refused

    # `plan --json | head -1` with more output than a pipe holds: the reader stops early
    with subprocess.Popen([sys.executable, "-m", "podpipe", "plan", "p.yaml", "--json",
                           "--replicas", "5000"], cwd=tmp_path, env=cli_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as plan:
        assert plan.stdout.readline() == b"{\n"
        plan.stdout.close()
        err = plan.stderr.read().decode()
        plan.wait(timeout=60)
    assert plan.returncode == 0 and "Traceback" not in err, err


def test_log_lines_have_levels_json_for_collectors_and_the_stages_own_output_raw(workdir):
    write_spec(workdir / "p.yaml", spec(
        [{"name": "chatty", "run": "pystages:chatty", "inputs": ["source"]}],
        [{"input": "chatty", "uri": "out/"}]))
    text = podpipe("run", "p.yaml", "--quiet", "--run-dir", "text", cwd=workdir)
    assert text.returncode == 0, text.stderr
    chatty = (workdir / "text" / "logs" / "chatty.log").read_text().splitlines()
    assert any(re.match(r"^\S+ \S+ INFO batch 3: started$", line) for line in chatty), chatty
    assert "chatty sees x from 3000" in chatty  # the stage's own, as it printed it

    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "json", "--log-format", "json",
                   cwd=workdir)
    assert done.returncode == 0, done.stderr
    logs = workdir / "json" / "logs"
    lines = (logs / "chatty.log").read_text().splitlines()
    assert "chatty sees x from 3000" in lines  # raw still
    records = [json.loads(line) for line in lines if line.startswith("{")]
    started = next(r for r in records if r["message"] == "batch 3: started")
    assert started["level"] == "info" and started["stage"] == "chatty"
    assert started["worker"] == 0 and started["batch"] == 3 and started["run"] == "json"
    assert len(records) == len(lines) - 10  # every other line is podpipe's, and JSON
    ended = [json.loads(line) for line in (logs / "conductor.log").read_text().splitlines()]
    assert ended[-1]["message"] == "the run succeeded" and ended[-1]["level"] == "info"
    assert ended[-1]["run"].startswith("t-")
    one = podpipe("logs", "json", "--batch", "3", cwd=workdir).stdout  # read back as text
    assert "[chatty] " in one and "chatty sees x from 3000" in one
    assert "chatty sees x from 4000" not in one

    quiet = podpipe("run", "p.yaml", "--quiet", "--run-dir", "warn", "--log-level",
                    "warning", cwd=workdir)
    assert quiet.returncode == 0, quiet.stderr
    kept = (workdir / "warn" / "logs" / "chatty.log").read_text().splitlines()
    assert sorted(kept) == sorted(f"chatty sees x from {b * 1000}" for b in range(10))
    bad = podpipe("run", "p.yaml", "--log-level", "loud", cwd=workdir)
    assert bad.returncode == 2 and "--log-level" in bad.stderr
    assert "DEBUG" not in (workdir / "text" / "logs" / "conductor.log").read_text()
    verbose = podpipe("run", "p.yaml", "--quiet", "--run-dir", "verbose", "-v", cwd=workdir)
    assert verbose.returncode == 0, verbose.stderr
    conductor = (workdir / "verbose" / "logs" / "conductor.log").read_text()
    assert re.search(r" DEBUG chatty connected: pid \d+, version ", conductor), conductor


def test_a_resume_says_in_one_line_what_it_found_and_keeps_the_details_in_the_log(tmp_path):
    """A resume after a failed batch printed a warning per batch ('the journal names
    /dev/shm/…, outside the run's tiers') for the normal case: the failed run's RAM
    scratch is gone."""
    make_numbers(tmp_path / "data")
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]},
         {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["boom"]}],
        [{"input": "total", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   BOOM_AT="7500").returncode == 1
    done = podpipe("resume", "run", cwd=tmp_path, BOOM_AT="-1")
    assert done.returncode == 0, done.stderr
    said = [line for line in done.stdout.splitlines() if "resumed:" in line or
            "restored:" in line]
    assert len(said) == 1 and said[0].startswith("resumed: "), done.stdout
    assert "tasks were done before" in said[0] and "done now" in said[0]
    assert "/dev/shm" not in done.stdout and "outside the run's tiers" not in done.stdout


def test_an_old_api_version_is_one_warning_line(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=100)
    path = write_spec(tmp_path / "p.yaml", spec([{"name": "s", "run": "pystages:double",
                                                  "inputs": ["source"]}],
                                                [{"input": "s", "uri": "out/"}]))
    path.write_text(path.read_text().replace("podpipe.dev/v1alpha1", "podpipe/v1alpha1"))
    done = podpipe("validate", "p.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ("warning: p.yaml: apiVersion 'podpipe/v1alpha1' is now "
                                   "'podpipe.dev/v1alpha1'; the old one is read for now")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_runs_and_status_fit_80_columns_without_cutting_a_word(tmp_path):
    """`runs` at 80 columns cut states to `succeed…`; `status` cut its process table
    with `...` and titled a live run 'running in 5.35 s'."""
    make_numbers(tmp_path / "data", files=1, rows=100)
    write_spec(tmp_path / "long.yaml", spec(
        [{"name": "s", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "s", "uri": "out/"}], name="borough-hour-trips-by-zone-and-weekday"))
    for _ in range(2):
        assert podpipe("run", "long.yaml", "--quiet", cwd=tmp_path).returncode == 0
    run, marker = _hung_run(tmp_path)
    try:
        screen = _in_tmux(tmp_path, "podpipe runs; podpipe status run", rows=60)
    finally:
        podpipe("stop", "run", cwd=tmp_path)
        run.communicate(timeout=60)
    assert "EXIT=0" in screen, screen
    lines = screen.splitlines()
    assert sum(1 for line in lines if re.search(r"\bsucceeded\b", line)) == 2, screen
    assert "…" not in screen and "..." not in screen, screen
    assert re.search(r"t: running for \d+\.\d\d s", screen), screen
    assert re.search(r"^ *stage +s +0 +\S+ +\d+ +yes *$", screen, re.M), screen
    assert re.search(r"^ *conductor +\S+ +\d+ +yes *$", screen, re.M), screen
