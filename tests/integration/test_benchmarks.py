"""The paradigm benchmark runs end to end (`--quick`): a smoke test, not a timing.

Every contestant (podpipe, the floor, Ray, HTTP services, a local-dir store and
S3 over moto's server) must produce the floor's output on both workloads, or the
script exits non-zero; the figures and the chart must be written.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, cli_env, node_stage

CONTESTANTS = {"podpipe", "floor", "ray", "services", "store-dir", "store-s3"}


def test_the_quick_paradigm_benchmark_runs_every_contestant_to_the_same_output(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/paradigms.py", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "paradigms.json").read_text())
    assert set(results["workloads"]) == {"q1", "wide"}
    for name, summary in results["workloads"].items():
        assert set(summary) == CONTESTANTS, name
        # What each paradigm moves, counted: podpipe through RAM only.
        assert summary["podpipe"]["network_storage_bytes"] == 0
        assert summary["podpipe"]["shared_memory_bytes"] > 0
        for other in ("services", "store-dir", "store-s3"):
            assert summary[other]["network_storage_bytes"] > 0, (name, other)
        assert all(s["peak_bytes"] > 0 and s["median_s"] > 0 for s in summary.values())
    assert set(results["targets"]) >= {"q1_ray_over_podpipe", "q1_store_s3_over_podpipe"}
    assert (tmp_path / "paradigms.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| podpipe (paradigm 3) |" in (tmp_path / "paradigms.md").read_text()


def test_the_quick_shards_benchmark_measures_both_replica_counts_and_plans_a_cluster(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/shards.py", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # non-zero on a wrong or differing answer
    results = json.loads((tmp_path / "shards.json").read_text())
    assert set(results["measured"]["median_s"]) == {"one shard (q1.yaml)", "S=8, N=1",
                                                    "S=8, N=2"}
    simulated = results["simulated"]
    assert len(simulated["per_pod"]) == 100 and simulated["shards_per_pod"] == [10]
    assert sum(p["bytes"] for p in simulated["per_pod"]) == simulated["source_bytes"] >= 10**12
    assert sum(p["batches"] for p in simulated["per_pod"]) == simulated["batches"]
    assert "Simulated cluster: 100 pods" in (tmp_path / "shards.md").read_text()


def test_the_serving_benchmark_runs_both_modes_to_the_same_output(tmp_path):
    node_stage("serve_double.mjs")  # node and apache-arrow are there
    out = tmp_path / "serving.json"
    done = subprocess.run([sys.executable, "benchmarks/serving.py", "--batches", "4",
                           "--rows", "100", "--rounds", "1", "--out", str(out)], cwd=ROOT,
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # non-zero on a wrong output
    result = json.loads(out.read_text())
    assert set(result["medians"]) == {"per-batch", "serving"}
    assert all(m["per_batch_ms"] > 0 for m in result["medians"].values())
