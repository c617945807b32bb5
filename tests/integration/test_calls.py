"""Call stages against a real service process on loopback (tests/stages/stub_service.py).

The pipeline: 10 batches of 1,000 rows; `ask` sends each batch in 10 requests of
100 rows (100 distinct requests in all) and its answers (y = 2x) go to a sink. A
request is sent at most once: after each kind of failure, the requests the stub
answered exceed the distinct requests by at most those in flight at the kill.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (ROOT, cli_env, make_numbers, podpipe, read_sink, run_status, spec,
                      wait_until, write_spec)

REQUESTS, CONCURRENCY = 100, 4


class Stub:
    def __init__(self, *flags: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "stages" / "stub_service.py"), *flags],
            stdout=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{int(self.process.stdout.readline())}/"

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "stats", timeout=10) as reply:
            return json.loads(reply.read())

    def mode(self, **settings) -> None:
        """Change its latency and faults; its counts start afresh."""
        request = urllib.request.Request(self.url + "mode", data=json.dumps(settings).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


@pytest.fixture
def stub(request):
    made = []

    def start(*flags: str) -> Stub:
        made.append(Stub(*flags))
        return made[-1]
    yield start
    for one in made:
        one.close()


def _spec(workdir: Path, url: str, *, call: dict | None = None, after: str | None = None,
          **extra) -> Path:
    make_numbers(workdir / "data")
    stages = [{"name": "ask", "inputs": ["source"],
               "call": {"url": url, "rowsPerRequest": 100, "concurrency": CONCURRENCY,
                        "retries": 8, "timeout": 30, **(call or {})}}]
    sinks = [{"input": "ask", "uri": "out/"}]
    if after:
        stages.append({"name": "after", "run": after, "inputs": ["ask"], "workers": 1})
        sinks.append({"name": "tagged", "input": "after", "uri": "tagged/"})
    return write_spec(workdir / "p.yaml", spec(stages, sinks, **extra))


def _start(workdir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                             "--run-dir", "run", *args], cwd=workdir, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answered_at_least(stub: Stub, run: subprocess.Popen, count: int) -> None:
    def enough() -> bool:
        assert run.poll() is None, run.communicate()
        return stub.stats()["answered"] >= count
    wait_until(enough, f"{count} answers")


def _expected(workdir: Path) -> list[int]:
    assert sorted(read_sink(workdir / "out")["y"].to_pylist()) == [2 * x for x in range(10_000)]
    return read_sink(workdir / "out")["y"].to_pylist()


def _kill(pid: int) -> None:
    import os

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def _pid(workdir: Path, node: str) -> int:
    return next(p["pid"] for p in run_status(workdir / "run")["processes"]
                if p["stage"] == node)


def test_requests_overlap_within_concurrency_ride_out_503_and_429_and_match_a_clean_run(
        tmp_path, stub):
    clean, faulty = tmp_path / "clean", tmp_path / "faulty"
    service = stub()
    for workdir in (clean, faulty):
        _spec(workdir, service.url)
    done = podpipe("run", "p.yaml", "--quiet", cwd=clean)
    assert done.returncode == 0, done.stderr
    assert service.stats()["answered"] == REQUESTS
    service.mode(latency=0.02, errors=0.05, throttle=9)  # the same URL: the same version
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=faulty)
    assert done.returncode == 0, done.stderr
    seen = service.stats()
    assert 1 < seen["max_in_flight"] <= CONCURRENCY  # they overlap, never beyond the limit
    assert seen["answered"] == seen["distinct"] == REQUESTS
    assert seen["received"] > REQUESTS  # the 503s and 429s were sent again
    calls = run_status(faulty / "run")["stages"]["ask"]["calls"]
    assert calls["requests"] == seen["received"] and calls["memo_hits"] == 0
    assert calls["retries"] == seen["received"] - REQUESTS and calls["failures"] == 0
    assert 0.02 <= calls["latency_p50"] <= calls["latency_p99"]
    assert calls["in_flight"] == 0 and 1 < calls["in_flight_max"] <= CONCURRENCY
    files = sorted((clean / "out").glob("*.parquet"))
    assert [f.name for f in files] == [f.name for f in sorted((faulty / "out").glob("*.parquet"))]
    for a in files:
        assert a.read_bytes() == (faulty / "out" / a.name).read_bytes()  # byte for byte


def test_json_requests_answer_the_same_rows(tmp_path, stub):
    service = stub()
    _spec(tmp_path, service.url, call={"format": "json"})
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _expected(tmp_path)


def test_the_rate_limit_holds_over_every_second_and_memo_false_keeps_nothing(tmp_path, stub):
    service = stub()
    _spec(tmp_path, service.url, call={"rateLimit": 40, "memo": False})
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = service.stats()
    assert seen["answered"] == REQUESTS
    # 40 a second over its two workers, 20 each, evenly spaced: the first of each at
    # once, the other 98 over at least 98 / 40 s; a second holds a few more at most
    # when the network bunches arrivals
    assert seen["span"] >= (REQUESTS - 2) / 40 - 0.05
    assert seen["max_per_second"] <= 40 + 4
    assert not (tmp_path / "run" / "answers").exists()
    _expected(tmp_path)


def test_a_killed_stage_process_sends_again_at_most_what_was_in_flight(tmp_path, stub):
    service = stub("--latency", "0.2")
    _spec(tmp_path, service.url)
    run = _start(tmp_path)
    _answered_at_least(service, run, 35)  # the middle of a batch (10 requests each)
    _kill(_pid(tmp_path, "ask"))
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    seen = service.stats()
    assert seen["distinct"] == REQUESTS
    # only what the killed worker had in flight, its share of the concurrency (its
    # batch's answers kept before the kill are not asked again)
    assert seen["answered"] <= REQUESTS + CONCURRENCY // 2
    assert run_status(tmp_path / "run")["stages"]["ask"]["restarts"] == 1
    _expected(tmp_path)


def test_a_killed_conductor_resumes_without_sending_again(tmp_path, stub):
    service = stub("--latency", "0.05")
    _spec(tmp_path, service.url)
    run = _start(tmp_path)
    _answered_at_least(service, run, 30)
    pids = [p["pid"] for p in run_status(tmp_path / "run")["processes"]]
    run.kill()
    run.communicate()
    for pid in pids:
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), f"process {pid} to end")
    done = podpipe("resume", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = service.stats()
    assert seen["distinct"] == REQUESTS and seen["answered"] <= REQUESTS + CONCURRENCY
    _expected(tmp_path)


def test_a_lost_node_finds_the_answers_on_the_durable_tier(tmp_path, stub):
    service = stub("--latency", "0.05")
    durable = tmp_path / "durable"
    _spec(tmp_path, service.url, checkpoints={"durable": f"file://{durable}"})
    run = _start(tmp_path)
    _answered_at_least(service, run, 30)
    status = run_status(tmp_path / "run")
    run.kill()
    run.communicate()
    for process in status["processes"]:
        wait_until(lambda: not Path(f"/proc/{process['pid']}").exists(), "the pod to end")
    shutil.rmtree(tmp_path / "run")  # the node is lost: its disk and its RAM
    shutil.rmtree(status["scratch"], ignore_errors=True)
    shutil.rmtree(tmp_path / "out")
    before = service.stats()["answered"]
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    seen = service.stats()
    assert seen["distinct"] == REQUESTS and seen["answered"] <= REQUESTS + CONCURRENCY
    assert run_status(tmp_path / "run")["stages"]["ask"]["calls"]["memo_hits"] >= before - \
        CONCURRENCY
    _expected(tmp_path)


def test_a_recompute_downstream_sends_nothing_again(tmp_path, stub):
    service = stub("--latency", "0.01")
    _spec(tmp_path, service.url, after="pystages:tag_v1_then_gated")
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "run"], cwd=tmp_path,
                           env=cli_env(GATE=str(tmp_path / "gate")),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: run_status(tmp_path / "run").get("stages", {}).get("after", {})
                   .get("batches_done", 0) >= 3, "three batches through after")
        done = podpipe("swap", "run", "after", "--run", "pystages:tag_v2", "--recompute",
                       "--now", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    finally:
        (tmp_path / "gate").touch()
        _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    seen = service.stats()
    assert seen["answered"] == seen["distinct"] == REQUESTS  # none at all sent twice
    calls = run_status(tmp_path / "run")["stages"]["ask"]["calls"]
    assert calls["memo_hits"] >= 30  # the batches redone, answered from what was kept
    assert set(read_sink(tmp_path / "tagged")["version"].to_pylist()) == {"v2"}


def test_a_batch_given_up_for_ram_is_answered_again_from_what_was_kept(tmp_path, stub):
    service = stub("--latency", "0.005")
    make_numbers(tmp_path / "data", files=4, rows=10_000, row_group=2000)
    write_spec(tmp_path / "p.yaml", spec(  # a slow stage after one that grows midway
        [{"name": "ask", "inputs": ["source"],
          "call": {"url": service.url, "rowsPerRequest": 200, "concurrency": CONCURRENCY}},
         {"name": "wide", "run": "pystages:widen_later", "inputs": ["ask"]},
         {"name": "slow", "run": "pystages:slow", "inputs": ["wide"]}],
        [{"input": "slow", "uri": "out/"}], batch_rows=2000, memory=str(2 * 2**20)))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   SLOW_SECONDS="0.05", GROW_AT="40000")
    assert done.returncode == 0, done.stderr
    tasks = [json.loads(line) for line in
             (tmp_path / "run" / "tasks.jsonl").read_text().splitlines()]
    assert any(t["state"] == "denied" for t in tasks)  # a batch was given up...
    seen = service.stats()
    assert seen["answered"] == seen["distinct"] == 200  # ...and none of its requests resent
    assert run_status(tmp_path / "run")["stages"]["ask"]["calls"]["memo_hits"] > 0
    assert sorted(read_sink(tmp_path / "out")["y"].to_pylist()) == [
        2 * x for x in range(40_000)]


def test_a_request_that_keeps_failing_fails_the_run_naming_stage_batch_url_and_answer(
        tmp_path, stub):
    service = stub("--down")
    _spec(tmp_path, service.url, call={"retries": 1})
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 1
    assert "stage 'ask', batch " in done.stderr
    assert f"to {service.url} failed after 1 retries: HTTP 503" in done.stderr
    assert "overloaded, try later" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("call,field,message", [
    ({"url": "geo.default.svc/lookup"}, "spec.stages[0].call.url", "http:// or https://"),
    ({"format": "xml"}, "spec.stages[0].call.format", "expected one of ['arrow', 'json']"),
    ({"concurrency": 0}, "spec.stages[0].call.concurrency", "expected an integer >= 1"),
    ({"headers": {"Authorization": "Bearer $(NO_SUCH_TOKEN)"}},
     "spec.stages[0].call.headers.Authorization", "$(NO_SUCH_TOKEN) is not set"),
])
def test_a_bad_call_is_refused_naming_the_field(tmp_path, call, field, message):
    _spec(tmp_path, "http://127.0.0.1:9/", call=call)
    done = podpipe("run", "p.yaml", "--quiet", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert field in done.stderr and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_bundled_example_quotes_every_june_line_through_its_service(lineitem, tmp_path):
    import pyarrow.compute as pc

    from examples.calls import service, stages

    quotes = subprocess.Popen([sys.executable, "-m", "examples.calls.service"], cwd=ROOT,
                              env=cli_env(), stdout=subprocess.PIPE, text=True)
    try:
        port = quotes.stdout.readline().strip()
        done = podpipe("run", str(ROOT / "examples" / "calls" / "shipping.yaml"), "--quiet",
                       "--set", f"source.uri={lineitem}/*.parquet",
                       "--set", "sinks.0.uri=out/", cwd=tmp_path, QUOTES_PORT=port)
    finally:
        quotes.kill()
        quotes.wait()
        quotes.stdout.close()
    assert done.returncode == 0, done.stderr
    june = stages.june_lines(pq.read_table(lineitem))
    expected = pc.sum(service.quote(june)["quote"]).as_py()
    assert read_sink(tmp_path / "out").to_pylist() == [{"quotes": june.num_rows,
                                                          "total": expected}]


def test_two_replicas_of_a_call_stage_show_one_status_with_percentiles_never_added(
        tmp_path, stub):
    """The status of a multi-replica run merges its pods' field by field: counts add
    up, the most in flight is one process's, and latency percentiles are the larger
    of the pods' (an upper bound), never their sum; read while the pods run (one may
    have no latency yet) and after."""
    service = stub("--latency", "0.05")
    _spec(tmp_path, service.url, shards=2)
    run = _start(tmp_path, "--replicas", "2")
    _answered_at_least(service, run, 10)
    live = podpipe("status", "run", "--json", cwd=tmp_path)
    assert live.returncode == 0, live.stderr  # (a pod without latency beside one with it)
    assert json.loads(live.stdout)["stages"]["ask"]["kind"] == "call"
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, out + err
    final = json.loads(podpipe("status", "run", "--json", cwd=tmp_path).stdout)
    pods = [run_status(tmp_path / "run" / "pods" / str(i))["stages"]["ask"]["calls"]
            for i in (0, 1)]
    calls = final["stages"]["ask"]["calls"]
    assert all(p["requests"] > 0 for p in pods)  # both pods called the service
    assert calls["requests"] == sum(p["requests"] for p in pods) == REQUESTS
    for field in ("latency_p50", "latency_p99", "in_flight_max"):
        assert calls[field] == max(p[field] for p in pods) < sum(p[field] for p in pods)
    assert 1 <= final["stages"]["ask"]["workers_max"] <= max(
        run_status(tmp_path / "run" / "pods" / str(i))["stages"]["ask"]["workers_max"]
        for i in (0, 1))
    _expected(tmp_path)


def test_a_retry_after_of_an_hour_waits_no_longer_than_the_calls_timeout(tmp_path, stub):
    """A 429 asking for an hour held the stage for that hour (no stage timeout by
    default): the wait is capped by the call's `timeout`, and the run finishes."""
    service = stub("--throttle", "3", "--retry-after", "3600")
    _spec(tmp_path, service.url, call={"timeout": 1})
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path, timeout=200)
    assert done.returncode == 0, done.stderr
    assert service.stats()["received"] > REQUESTS  # the 429s were asked again, and answered
    _expected(tmp_path)


def test_a_stale_answer_on_a_kept_alive_connection_is_never_kept(tmp_path, stub):
    """Case 3 of the integrity issue: without `echo` a stale answer of the right length
    cannot be told from the right one (the run below shows the stub's fault is real);
    with `echo` it is refused, its connection dropped, and the request sent again —
    also the stale answers the first run kept are refused when a second run finds them
    on the durable tier."""
    service = stub("--echo", "--stale", "5")
    durable = tmp_path / "durable"
    _spec(tmp_path, service.url, checkpoints={"durable": f"file://{durable}"})
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "blind", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert service.stats()["stale"] == 5
    out = read_sink(tmp_path / "out")
    wrong = sum(x * 2 != y for x, y in zip(out["x"].to_pylist(), out["y"].to_pylist()))
    assert sorted(out["y"].to_pylist()) != [2 * x for x in range(10_000)] or wrong

    for durable_tier, stale in ((tmp_path / "fresh", 5), (durable, 0)):
        service.mode(stale=stale)
        shutil.rmtree(tmp_path / "out")
        _spec(tmp_path, service.url, call={"echo": ["x"]},
              checkpoints={"durable": f"file://{durable_tier}"})
        run_dir = f"run-{stale}"
        done = podpipe("run", "p.yaml", "--quiet", "--run-dir", run_dir, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert service.stats()["stale"] == stale
        _expected(tmp_path)
        out = read_sink(tmp_path / "out")
        assert out["x"].to_pylist() == [y // 2 for y in out["y"].to_pylist()]
        calls = run_status(tmp_path / run_dir)["stages"]["ask"]["calls"]
        assert calls["retries"] >= stale and calls["failures"] == 0
    # the wrong answers the first run kept were checked and asked again
    assert calls["memo_hits"] <= REQUESTS - 5


def test_every_worker_killed_at_once_twice_is_two_incidents_not_four_restarts(tmp_path, stub):
    """A container crash ends all its workers at once: with `retries: 3`, both workers
    of the call stage killed together twice is two incidents and two deaths per
    batch at most — the run finishes (it failed 'after 3 restarts' when each process
    counted)."""
    service = stub("--latency", "0.1")
    _spec(tmp_path, service.url)
    path = tmp_path / "p.yaml"
    text = path.read_text().replace("call:", "workers: 2\n    retries: 3\n    call:", 1)
    path.write_text(text)
    run = _start(tmp_path)
    killed: set[int] = set()
    for _ in range(2):
        def both_up() -> bool:
            assert run.poll() is None, run.communicate()
            pids = {p["pid"] for p in run_status(tmp_path / "run").get("processes", [])
                    if p["stage"] == "ask"}
            return len(pids) == 2 and not pids & killed and service.stats()["in_flight"] > 0
        wait_until(both_up, "both workers of 'ask' up and asking")
        pids = [p["pid"] for p in run_status(tmp_path / "run")["processes"]
                if p["stage"] == "ask"]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        killed.update(pids)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert run_status(tmp_path / "run")["stages"]["ask"]["restarts"] == 4
    _expected(tmp_path)


def test_a_standing_lines_jobs_share_the_answers_kept(tmp_path, stub):
    """Answers stand for their request: a line keeps them for all its jobs (in its
    folder), so a second job over the same data sends nothing, and a third over other
    rows sends only its new requests."""
    service = stub()
    _spec(tmp_path, service.url)
    up = podpipe("up", "p.yaml", "--name", "calls", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    try:
        seen = []
        make_numbers(tmp_path / "more", files=3)  # the same 10,000 rows, 5,000 more
        for n, data, rows in ((1, "data", 10_000), (2, "data", 10_000), (3, "more", 15_000)):
            done = podpipe("submit", "calls", "--wait", "--set", f"sinks.0.uri=out{n}/",
                           "--set", f"source.uri={data}/*.parquet", cwd=tmp_path)
            assert done.returncode == 0, done.stderr
            job = run_status(Path(done.stdout.split("run directory: ")[1].split()[0]))
            seen.append((service.stats()["answered"], job["stages"]["ask"]["calls"]))
            assert sorted(read_sink(tmp_path / f"out{n}")["y"].to_pylist()) == \
                [2 * x for x in range(rows)]
    finally:
        assert podpipe("down", "calls", cwd=tmp_path).returncode == 0
    (first, calls1), (second, calls2), (third, calls3) = seen
    assert first == REQUESTS and calls1["requests"] == REQUESTS
    assert second == first and calls2["requests"] == 0 and calls2["memo_hits"] == REQUESTS
    # the first 10,000 rows' requests were answered: only the 5,000 new rows' are sent
    assert calls3["memo_hits"] == REQUESTS and calls3["requests"] == REQUESTS // 2
    assert third == first + REQUESTS // 2
    kept = tmp_path / ".podpipe" / "lines" / "calls" / "answers" / "ask"
    assert len(list(kept.iterdir())) == REQUESTS + REQUESTS // 2
