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
    assert 'data-layout="across"' in dom  # six depths fit the page left to right
    shot = tmp_path / "report.png"
    taken = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1100,1400")
    assert shot.exists() and shot.stat().st_size > 10_000, taken.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_every_chart_has_labelled_axes_and_cores_memory_and_queues_are_drawn(tmp_path):
    """The RAM chart had no values on its axis and no time axis; there was no chart of
    cores, resident memory or queues, though the samples recorded queues."""
    make_numbers(tmp_path / "data", files=1, rows=8000)
    write_spec(tmp_path / "p.yaml", spec(  # (busy on a core, not asleep: its cores show)
        [{"name": "slow", "run": "pystages:spin", "inputs": ["source"], "workers": 1}],
        [{"input": "slow", "uri": "out/"}]))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   SLOW_SECONDS="0.2")  # 8 batches, one at a time: 1.6 s at least
    assert done.returncode == 0, done.stderr
    assert podpipe("report", "run", cwd=tmp_path).returncode == 0
    page = tmp_path / "run" / "report.html"
    dom = _chromium(page, tmp_path, "--dump-dom").stdout
    for label in ("RAM scratch in use", "cores it ran on",
                  "resident bytes of the process", "batches ready, not yet taken"):
        assert f">{label}</text>" in dom, label
    for kind in ("timeline", "memory", "cpu", "rss", "queues"):
        svg = re.search(rf'<svg class="{kind}"[^>]*>.*?</svg>', dom, re.S)
        assert svg and ">seconds since the attempt started</text>" in svg.group(0), kind
        assert re.search(r'>\d+\.\d s</text>', svg.group(0)), kind  # time ticks
    assert re.search(r'class="axis"[^>]*>256\.0 MiB</text>', dom)  # the budget, in bytes
    cpu = re.search(r'<svg class="cpu".*?</svg>', dom, re.S).group(0)
    assert 'data-series="slow"' in cpu  # the busy stage's line
    queues = re.search(r'<svg class="queues".*?</svg>', dom, re.S).group(0)
    assert 'data-series="slow"' in queues  # batches waited for the slow stage
    assert "slow</code> was busy" in dom  # 8 batches: long enough to name it
    shot = tmp_path / "charts.png"
    taken = _chromium(page, tmp_path, f"--screenshot={shot}", "--window-size=1000,2400")
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
    # it died on its third batch: no bottleneck to name (it blamed the source, 99%)
    assert "Too short to name a bottleneck: 3 source batches" in page
    assert "was busy" not in page


def test_a_resumed_runs_report_keeps_its_attempts_apart(tmp_path):
    """A resumed run's records were drawn on one axis, its RAM curves over each other,
    and its title's peak was the resume's alone."""
    make_numbers(tmp_path / "data", files=2, rows=5000)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "boom", "run": "pystages:fail_on_third", "inputs": ["source"]}],
        [{"input": "boom", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   BOOM_AT="7500").returncode == 1
    resumed = podpipe("resume", "run", cwd=tmp_path, BOOM_AT="-1")
    assert resumed.returncode == 0, resumed.stderr
    assert podpipe("report", "run", cwd=tmp_path).returncode == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert re.findall(r'data-attempt="(\d)"', page) == ["1", "2"]
    assert "(attempt 2, resumed)" in page
    charts = re.findall(r'<svg class="memory" data-max="(\d+)"', page)
    assert len(charts) == 2
    title = re.search(r"<h1>.*peak RAM scratch ([^<]+?) of", page).group(1)
    from podpipe.model.sizes import format_size
    assert title == format_size(max(map(int, charts)))  # the header agrees with a chart
    done = podpipe("report", "run", "--format", "chrome-trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = json.loads((tmp_path / "run" / "trace.json").read_text())["traceEvents"]
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"RAM scratch (bytes)", "cores"} <= counters
    first = [e for e in events if e["ph"] == "X" and e.get("args", {}).get("attempt") == 1]
    second = [e for e in events if e["ph"] == "X" and e.get("args", {}).get("attempt") == 2]
    assert first and second
    assert min(e["ts"] for e in second) >= max(e["ts"] for e in first)  # one after the other


def test_a_long_line_is_drawn_top_to_bottom_within_the_page(tmp_path):
    """A 9-node graph needed horizontal scrolling at 1000 px."""
    make_numbers(tmp_path / "data", files=1, rows=2000)
    stages = [{"name": f"s{i}", "run": "pystages:plus_one",
               "inputs": [f"s{i - 1}" if i else "source"]} for i in range(12)]
    write_spec(tmp_path / "p.yaml", spec(stages, [{"input": "s11", "uri": "out/"}]))
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path).returncode == 0
    assert podpipe("report", "run", cwd=tmp_path).returncode == 0
    page = (tmp_path / "run" / "report.html").read_text()
    graph = re.search(r'<svg class="graph" data-layout="(\w+)" width="(\d+)"', page)
    assert graph.group(1) == "down" and int(graph.group(2)) <= 900
    assert len(re.findall(r'<g class="node"', page)) == 14


def test_the_chrome_trace_has_an_event_per_task(q1_run, tmp_path):
    done = podpipe("report", str(q1_run), "--format", "chrome-trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = json.loads((q1_run / "trace.json").read_text())
    tasks = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] != "ram"]
    final = run_status(q1_run)
    assert len(tasks) == sum(s["batches_done"] for s in final["stages"].values())
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in tasks)


TARGET_LABELS = {"pod", "job", "instance", "namespace", "container", "service", "endpoint"}


def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # a port free now
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _scrape(port: int) -> str:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    except OSError:
        return ""


def _samples(text: str) -> dict[tuple, float]:
    """(name, labels without the run's id) -> value, checked against Prometheus's
    naming rules on the way (what `promtool check metrics` checks of them)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("podpipe_"):
            continue
        assert family.documentation, family.name
        assert family.type in ("counter", "gauge", "histogram"), family
        if family.type == "counter":
            assert not family.name.endswith("_total")  # (the parser strips it)
            assert all(s.name == family.name + "_total" for s in family.samples), family
        if family.type == "histogram":
            assert family.name.endswith("_seconds")
        for sample in family.samples:
            assert not TARGET_LABELS & set(sample.labels), sample  # ours, not the target's
            assert sample.labels.pop("podpipe_job", None), sample
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_the_conductor_serves_prometheus_metrics_while_the_run_goes(tmp_path):
    import sys

    from conftest import cli_env, wait_until

    port = _free_port()
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=500)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "once", "run": "pystages:hang_once", "inputs": ["source"]}],
        [{"input": "once", "uri": "out/"}], batch_rows=500))
    marker = tmp_path / "hung"
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run", "--metrics-port", str(port)], cwd=tmp_path,
                           env=cli_env(HANG_MARKER=str(marker)), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    node = (("node", "once"), ("pipeline", "t"), ("replica", "0"))
    run_labels = (("pipeline", "t"), ("replica", "0"))
    try:
        wait_until(marker.exists, "the stage to hang")
        wait_until(lambda: _samples(_scrape(port)).get(("podpipe_tasks_in_flight", node)) == 1,
                   "the metrics of the hung task")  # (flushed 4× a second)
        found = _samples(_scrape(port))
    finally:
        podpipe("stop", "run", cwd=tmp_path)
        run.communicate(timeout=60)
    assert found[("podpipe_batches", node)] == 4
    assert found[("podpipe_running", run_labels)] == 1
    assert found[("podpipe_scratch_budget_bytes", run_labels)] == 256 * 2**20
    assert ("podpipe_rows_out_total", node) in found
    assert ("podpipe_batches_done_total", node) in found
    bad = podpipe("run", "p.yaml", "--metrics-port", "http", cwd=tmp_path)
    assert bad.returncode == 2 and "expected PORT or ADDR:PORT" in bad.stderr
    bad = podpipe("run", "p.yaml", "--metrics-port", str(port), "--metrics-linger", "-1",
                  cwd=tmp_path)
    assert bad.returncode == 2 and "expected seconds from 0 to 3600" in bad.stderr


def test_the_final_metrics_are_served_while_the_run_lingers_with_task_durations(tmp_path):
    """The endpoint closed with the run: a scrape every 15 s missed a short run's end.
    `--metrics-linger` serves the final values a while; each node's task durations
    are a histogram."""
    import sys

    from conftest import cli_env, wait_until

    port = _free_port()
    make_numbers(tmp_path / "data", files=2, rows=1000, row_group=500)
    write_spec(tmp_path / "p.yaml", spec(
        [{"name": "a", "run": "pystages:double", "inputs": ["source"]}],
        [{"input": "a", "uri": "out/"}], batch_rows=500))
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run", "--metrics-port", str(port),
                            "--metrics-linger", "30"], cwd=tmp_path, env=cli_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_labels = (("pipeline", "t"), ("replica", "0"))
    try:
        wait_until(lambda: _samples(_scrape(port)).get(("podpipe_running", run_labels)) == 0,
                   "the run to end and its endpoint still to serve")
        found = _samples(_scrape(port))
    finally:
        run.terminate()
        run.communicate(timeout=60)
    node = (("node", "a"), ("pipeline", "t"), ("replica", "0"))
    assert found[("podpipe_batches_done_total", node)] == 4
    assert found[("podpipe_task_duration_seconds_count", node)] == 4
    assert found[("podpipe_task_duration_seconds_bucket",
                  tuple(sorted(dict(node, le="+Inf").items())))] == 4
    assert found[("podpipe_task_duration_seconds_sum", node)] > 0


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
