"""`podpipe report`: the page a person opens, looked at in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, make_numbers, podpipe, run_status, spec, write_spec

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp / 'chromium'}", *args,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


@pytest.fixture
def q1_run(tmp_path, lineitem) -> Path:
    done = podpipe("run", str(ROOT / "examples/tpch/q1.yaml"), "--quiet", "--run-dir", "run",
                   "--set", f"source.uri={lineitem}/*.parquet", "--set",
                   "source.batchRows=10000", "--set", f"sinks.0.uri={tmp_path}/out/",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / "run"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_report_of_the_example_shows_every_task_node_edge_and_the_peak(q1_run, tmp_path):
    done = podpipe("report", str(q1_run), "-o", "report.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    page = tmp_path / "report.html"
    assert "http://" not in page.read_text() and "https://" not in page.read_text()
    dom = _chromium(page, tmp_path, "--dump-dom").stdout
    final = run_status(q1_run)
    per_batch = [n for n, s in final["stages"].items() if s["kind"] != "reduce"]
    tasks = re.findall(r'<rect class="task" data-node="([^"]+)" data-batch="(\d+)"', dom)
    expected = sum(s["batches_done"] for s in final["stages"].values())
    assert len(tasks) == expected  # one bar per task: nodes × batches, and the reduce's
    assert len(set(tasks)) == expected
    assert {n for n, _ in tasks} == set(final["stages"]) and per_batch
    nodes = set(re.findall(r'<g class="node" data-node="([^"]+)"', dom))
    assert nodes == set(final["stages"])
    edges = set(re.findall(r'class="edge" data-from="([^"]+)" data-to="([^"]+)"', dom))
    assert edges == {("source", "filter"), ("filter", "prices"), ("prices", "partial"),
                     ("partial", "total"), ("total", "sink-0")}
    peak = int(re.search(r'<svg class="memory" data-max="(\d+)"', dom).group(1))
    assert peak == final["peak_scratch_bytes"]
    assert "was busy" in dom or "No node was busy" in dom
    shot = tmp_path / "report.png"
    taken = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1100,1400")
    assert shot.exists() and shot.stat().st_size > 10_000, taken.stderr


def test_a_failed_runs_report_shows_the_error_and_the_stages_log(tmp_path):
    make_numbers(tmp_path / "data", files=1, rows=3000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path).returncode == 1
    assert podpipe("report", "run", cwd=tmp_path).returncode == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "stage &#x27;boom&#x27;, batch 2: ValueError: boom on purpose" in page
    assert "raise ValueError(&quot;boom on purpose&quot;)" in page  # the log's tail
    assert 'data-state="failed"' in page


def test_the_chrome_trace_has_an_event_per_task(q1_run, tmp_path):
    done = podpipe("report", str(q1_run), "--format", "chrome-trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = json.loads((q1_run / "trace.json").read_text())
    tasks = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] != "ram"]
    final = run_status(q1_run)
    assert len(tasks) == sum(s["batches_done"] for s in final["stages"].values())
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in tasks)


def test_the_conductor_serves_prometheus_metrics_while_the_run_goes(tmp_path):
    import socket
    import sys
    import urllib.request

    from conftest import cli_env, wait_until

    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=500)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "once", "run": "pystages:hang_once", "inputs": ["source"]}],
        [{"input": "once", "uri": "out/"}], batch_rows=500))
    marker = tmp_path / "hung"
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run", "--metrics-port", str(port)], cwd=tmp_path,
                           env=cli_env(HANG_MARKER=str(marker)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_until(marker.exists, "the stage to hang")

        def scraped() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""
        busy = 'podpipe_tasks_in_flight{node="once",pipeline="t",pod="0"} 1.0'
        wait_until(lambda: busy in scraped(), "the metrics of the hung task")  # (flushed
        text = scraped()                                                        # 4× a second)
    finally:
        podpipe("stop", "run", cwd=tmp_path)
        run.communicate(timeout=60)
    assert 'podpipe_batches{node="once",pipeline="t",pod="0"} 4.0' in text
    assert 'podpipe_running{pipeline="t",pod="0"} 1.0' in text
    assert re.search(r'podpipe_scratch_budget_bytes\{pipeline="t",pod="0"\} 2\.68435456e\+08',
                     text)
    assert "podpipe_rows_out_total" in text
    bad = podpipe("run", "p.yaml", "--metrics-port", "http", cwd=tmp_path)
    assert bad.returncode == 2 and "expected PORT or ADDR:PORT" in bad.stderr


def test_a_run_of_several_replicas_has_a_section_per_pod(tmp_path):
    make_numbers(tmp_path / "data", files=2, rows=2000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "double", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "double", "uri": "out/"}], shards=2))
    done = podpipe("run", "p.yaml", "--quiet", "--replicas", "2", "--run-dir", "run",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert podpipe("report", "run", cwd=tmp_path).returncode == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert re.findall(r'<section class="pod" data-pod="([^"]+)"', page) == ["pod 0", "pod 1"]
    tasks = re.findall(r'<rect class="task" data-node="source" data-batch="(\d+)"', page)
    assert sorted(map(int, tasks)) == list(range(4))  # each pod its own shard's batches
