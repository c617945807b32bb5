"""Shards and replicas: N pods on this machine, each a conductor with its own stage
processes and RAM scratch, as the replicas of a StatefulSet would run.

The rescaling tests kill pods mid-run and start the rest with another number of
replicas: a shard that moved resumes from its checkpoints on the durable tier,
and no batch whose output was checkpointed there is computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (ROOT, SF, cli_env, make_numbers, podpipe, run_status, spec,
                      wait_until, write_spec)

SHARDS, BATCHES, ROWS = 6, 12, 1000


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.glob("part-*.parquet"))}


def test_the_global_result_is_byte_identical_for_one_two_and_three_replicas(lineitem, tmp_path):
    from examples.tpch import data

    results, statuses = {}, {}
    for replicas in (1, 2, 3):
        out = tmp_path / f"q1-{replicas}"
        done = podpipe("run", str(ROOT / "examples/tpch/q1-sharded.yaml"), "--quiet",
                       "--replicas", str(replicas), "--run-dir", str(tmp_path / f"run{replicas}"),
                       "--set", f"source.uri={lineitem}/*.parquet",
                       "--set", "source.batchRows=5000", "--set", f"sinks.0.uri={out}",
                       cwd=ROOT, timeout=180)
        assert done.returncode == 0, done.stderr
        results[replicas] = _digest(out)
        statuses[replicas] = json.loads(podpipe("status", str(tmp_path / f"run{replicas}"),
                                                "--json", cwd=ROOT).stdout)
    assert results[1] == results[2] == results[3] and len(results[1]) == 1
    assert data.compare(pq.read_table(tmp_path / "q1-1"), SF) == []
    n = statuses[3]["source_batches"]
    assert n > 8  # every shard has batches
    for replicas, status in statuses.items():
        stages = status["stages"]
        assert {k: stages[k]["batches_done"] for k in ("source", "merge", "total")} == \
            {"source": n, "merge": 8, "total": 1}
    pods = statuses[3]["pods"]
    assert [(p["ordinal"], p["shards"], p["state"]) for p in pods] == [
        (0, [0, 3, 6], "succeeded"), (1, [1, 4, 7], "succeeded"), (2, [2, 5], "succeeded")]
    every = {pid for p in pods for pid in p["pids"]}
    for pod in pods:  # each pod ran the batches of its shards, and only those
        own = json.loads((Path(pod["run_dir"]) / "status.json").read_text())
        # its own conductor and each node's workers (`auto`: at least one each)
        assert len(pod["pids"]) == 1 + sum(s["workers"] for s in own["stages"].values()) >= 8
        assert {pid for p in pods if p is not pod for pid in p["pids"]}.isdisjoint(
            pod["pids"]) and set(pod["pids"]) <= every
        assert own["stages"]["source"]["batches_total"] == \
            sum(len(range(s, n, 8)) for s in pod["shards"])
        assert own["stages"]["total"]["batches_total"] == (1 if pod["ordinal"] == 0 else 0)


# -- rescaling -------------------------------------------------------------------------


def _spec(workdir: Path, durable: str | None = None) -> Path:
    make_numbers(workdir / "data", files=2, rows=6000)  # 12 batches of 1000 rows
    document = spec(
        [{"name": "slow", "run": "pystages:slow", "inputs": ["source"]},
         {"name": "double", "run": "pystages:double", "inputs": ["slow"]},
         {"name": "part", "run": "pystages:sum_all", "reduce": True, "inputs": ["double"]},
         {"name": "total", "run": "pystages:sum_all_sums", "reduce": True, "scope": "global",
          "inputs": ["part"]}],
        [{"name": "summed", "input": "total", "uri": "out/summed/"},
         {"name": "doubled", "input": "double", "uri": "out/doubled/"}],
        shards=SHARDS)
    document["spec"]["checkpoints"] = {"everyBatches": 1, "interval": 0.2,
                                       **({"durable": durable} if durable else {})}
    return write_spec(workdir / "p.yaml", document)


def _output(workdir: Path) -> dict[str, bytes]:
    out = workdir / "out"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("part-*.parquet"))}


@pytest.fixture
def expected(tmp_path: Path) -> dict[str, bytes]:
    clean = tmp_path / "clean"
    clean.mkdir()
    _spec(clean)
    done = podpipe("run", "p.yaml", "--quiet", cwd=clean, SLOW_SECONDS="0")
    assert done.returncode == 0, done.stderr
    result = _output(clean)
    assert len(result) == BATCHES + 1
    return result


def _checkpointed(store: Path) -> set[int]:
    """The source batches checkpointed whole on the durable tier: their reduce input
    kept, and their per-batch sink file recorded as written."""
    batches = set()
    for manifest in store.rglob("manifest-*.json"):
        content = json.loads(manifest.read_text())
        written = set(content["finished"].get("doubled", []))
        batches |= {o["output"]["key"] for o in content["outputs"]
                    if o["output"]["node"] == "double" and o["output"]["key"] in written}
    return batches


def _loaded(pods: Path) -> list[int]:
    """The source batches the pods under `pods` loaded, from their journals."""
    loaded = []
    for journal in pods.glob("*/journal.sqlite"):
        with sqlite3.connect(journal) as db:
            loaded += [b for (b,) in db.execute("SELECT batch FROM done WHERE node='source'")]
    return loaded


def _pod_status(run: Path, index: int) -> dict:
    return run_status(run / "pods" / str(index))


def test_rescale_three_to_two_after_a_kill_redoes_no_checkpointed_batch(tmp_path, expected):
    workdir = tmp_path / "w"
    _spec(workdir)
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--replicas", "3", "--run-dir", "run"], cwd=workdir,
                           env=cli_env(SLOW_SECONDS="0.3"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    store = workdir / "run" / "durable"
    wait_until(lambda: len(_checkpointed(store)) >= 3 and
              _pod_status(workdir / "run", 1).get("processes"), "three checkpointed batches")
    victim = _pod_status(workdir / "run", 1)["processes"][0]["pid"]  # pod 1's conductor
    os.kill(victim, signal.SIGKILL)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 1
    assert "pod 1:" in stderr  # the failed run names the pod
    status = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    states = {p["ordinal"]: p["state"] for p in status["pods"]}
    assert states[2] == "succeeded"  # one replica failing does not stop the others
    assert states[1] in ("failed", "interrupted")
    checkpointed = _checkpointed(store)
    done = podpipe("resume", "run", "--replicas", "2", "--quiet", cwd=workdir,
                   SLOW_SECONDS="0.01", timeout=180)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    again = _loaded(workdir / "run" / "pods")
    assert not set(again) & checkpointed, "a checkpointed batch was computed again"
    assert sorted(set(again) | checkpointed) == list(range(BATCHES))
    after = json.loads(podpipe("status", "run", "--json", cwd=workdir).stdout)
    assert [(p["ordinal"], p["shards"], p["state"]) for p in after["pods"]] == [
        (0, [0, 2, 4], "succeeded"), (1, [1, 3, 5], "succeeded")]
    assert after["stages"]["source"]["rows_out"] == ROWS * len(again)
    # (How many outputs come back from the durable tier depends on how far each pod
    # had got: a shard finished whole needs none of its batches' outputs again. That
    # no checkpointed batch is computed again, above, is what says they were used.)


def test_rescale_one_to_three_resumes_every_shard_from_the_durable_tier(tmp_path, expected):
    workdir = tmp_path / "w"
    store = tmp_path / "store"
    _spec(workdir, durable=f"file://{store}")
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--run-dir", "one"], cwd=workdir, env=cli_env(SLOW_SECONDS="0.3"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: len(_checkpointed(store)) >= 4, "four checkpointed batches")
    pids = [p["pid"] for p in json.loads((workdir / "one" / "status.json").read_text())
            ["processes"]]
    run.kill()  # the node is lost: the pod, its RAM and its disk
    run.communicate()
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids), "the pod to go")
    checkpointed = _checkpointed(store)
    done = podpipe("run", "p.yaml", "--quiet", "--replicas", "3", "--run-dir", "three",
                   cwd=workdir, SLOW_SECONDS="0.01", timeout=180)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
    again = _loaded(workdir / "three" / "pods")
    assert not set(again) & checkpointed
    assert sorted(set(again) | checkpointed) == list(range(BATCHES))


# -- the plan and bad input ----------------------------------------------------------


def test_plan_shows_each_pods_shards_and_the_bytes_it_pulls(lineitem, tmp_path):
    done = podpipe("plan", str(ROOT / "examples/tpch/q1-sharded.yaml"), "--replicas", "3",
                   "--json", "--set", f"source.uri={lineitem}/*.parquet",
                   "--set", "source.batchRows=5000", cwd=ROOT)
    assert done.returncode == 0, done.stderr
    planned = json.loads(done.stdout)
    columns = {"l_returnflag", "l_linestatus", "l_quantity", "l_extendedprice", "l_discount",
               "l_tax", "l_shipdate"}
    on_disk = 0
    for path in sorted(lineitem.glob("*.parquet")):
        meta = pq.ParquetFile(path).metadata
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            on_disk += sum(group.column(j).total_compressed_size  # read once, sliced or not
                                    for j in range(group.num_columns)
                                    if group.column(j).path_in_schema in columns)
    assert [p["shards"] for p in planned["pods"]] == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert sum(p["batches"] for p in planned["pods"]) == planned["source_batches"]
    assert sum(p["bytes"] for p in planned["pods"]) == planned["source_bytes"] == on_disk
    table = podpipe("plan", str(ROOT / "examples/tpch/q1-sharded.yaml"), "--replicas", "100",
                    "--set", f"source.uri={lineitem}/*.parquet", cwd=ROOT)
    assert table.returncode == 0 and "(none: idles)" in table.stdout


@pytest.mark.parametrize("args, env, message", [
    (["--replicas", "2", "--pod-index", "2"], {}, "pod index 2 is not below --replicas 2"),
    (["--replicas", "2"], {"POD_INDEX": "x"}, "POD_INDEX='x'"),
    (["--replicas", "0"], {}, "--replicas 0: expected at least 1"),
    (["--replicas", "2", "--pod-index", "0"], {}, "set spec.checkpoints.durable"),
])
def test_bad_replica_flags_are_refused_with_exit_2(tmp_path, args, env, message):
    _spec(tmp_path)
    done = podpipe("run", "p.yaml", "--quiet", *args, cwd=tmp_path, **env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_resume_with_replicas_of_a_one_pod_run_says_how_to_rescale(tmp_path):
    _spec(tmp_path)
    assert podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=tmp_path,
                   SLOW_SECONDS="0").returncode == 0
    done = podpipe("resume", "run", "--replicas", "2", cwd=tmp_path)
    assert done.returncode == 2 and "podpipe run SPEC --replicas M" in done.stderr


def test_a_killed_controller_takes_its_pods_with_it_and_resume_finishes_the_run(
        tmp_path, expected):
    """`kill -9` of `run --replicas 2` left both pods and their stage processes
    running (status said interrupted), and `resume` started a second set beside
    them. The pods now stop with it, resumable, and the resume finishes the run."""
    workdir = tmp_path / "w"
    _spec(workdir)
    run = subprocess.Popen([sys.executable, "-m", "podpipe", "run", "p.yaml", "--quiet",
                            "--replicas", "2", "--run-dir", "run"], cwd=workdir,
                           env=cli_env(SLOW_SECONDS="30"),  # minutes of work left
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: all(_pod_status(workdir / "run", i).get("processes")
                           for i in (0, 1)), "both pods running")
    pids = [p["pid"] for i in (0, 1) for p in _pod_status(workdir / "run", i)["processes"]]
    run.kill()
    run.communicate()
    wait_until(lambda: not any(Path(f"/proc/{p}").exists() for p in pids),
               "the pods and their stage processes to end with the controller")
    done = podpipe("resume", "run", "--quiet", cwd=workdir, SLOW_SECONDS="0.01", timeout=180)
    assert done.returncode == 0, done.stderr
    assert _output(workdir) == expected
