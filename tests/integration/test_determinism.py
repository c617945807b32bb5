"""A stage that is not deterministic is found out: a batch made again (a resume after
the pod's RAM was lost) by the same version is compared with what it made before.
Real processes: the conductor SIGKILLed mid-run, its RAM scratch deleted, resumed."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from conftest import make_numbers, podpipe, run_status, spec, start_run, write_spec


def _killed_mid_run(workdir: Path, stage: str, mode: str | None) -> list[int]:
    """Run source -> STAGE -> gated -> sink until STAGE has done 3 batches (journaled),
    SIGKILL the conductor and delete its RAM scratch (a pod's RAM lost): the batches
    it did are to be made again. Returns them."""
    make_numbers(workdir / "data")
    document = spec([{"name": "maker", "run": f"pystages:{stage}", "inputs": ["source"],
                      "workers": 1},
                     {"name": "gated", "run": "pystages:tag_v1_gated", "inputs": ["maker"],
                      "workers": 1}],
                    [{"input": "gated", "uri": "out/"}])
    if mode is not None:
        document["spec"]["checks"] = {"determinism": mode}
    write_spec(workdir / "p.yaml", document)
    run = start_run(workdir, GATE=str(workdir / "gate"))
    deadline = time.monotonic() + 60
    while run_status(workdir / "run").get("stages", {}).get("maker", {}) \
            .get("batches_done", 0) < 3:
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.02)
    before = run_status(workdir / "run")
    run.kill()
    run.communicate()
    for pid in (p["pid"] for p in before["processes"]):
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
    shutil.rmtree(before["scratch"])
    (workdir / "gate").touch()
    return list(range(before["stages"]["maker"]["batches_done"]))


def test_a_batch_made_again_with_other_bytes_flags_the_stage(tmp_path):
    made = _killed_mid_run(tmp_path, "noisy", None)  # checks.determinism: warn (default)
    done = podpipe("resume", "run", cwd=tmp_path, GATE=str(tmp_path / "gate"))
    assert done.returncode == 0, done.stderr
    flagged = run_status(tmp_path / "run")["stages"]["maker"]["nondeterministic"]
    assert flagged and set(flagged) <= set(made)  # only what it had made before the kill
    assert "warning: stage 'maker' is not deterministic" in done.stdout
    log = (tmp_path / "run" / "logs" / "conductor.log").read_text()
    assert f"stage 'maker': batch {flagged[0]} made again by version src-" in log
    report = podpipe("report", "run", "-o", "r.html", cwd=tmp_path)
    assert report.returncode == 0
    assert 'class="nondeterministic" data-node="maker"' in (tmp_path / "r.html").read_text()


def test_with_checks_determinism_fail_the_resumed_run_fails_naming_stage_and_batch(tmp_path):
    _killed_mid_run(tmp_path, "noisy", "fail")
    done = podpipe("resume", "run", "--quiet", cwd=tmp_path, GATE=str(tmp_path / "gate"))
    assert done.returncode == 1
    assert "stage 'maker', batch " in done.stderr
    assert "gave other bytes than before: the stage is not deterministic" in done.stderr
    assert "(checks.determinism: fail)" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("mode", [None, "off"], ids=["deterministic-stage", "checks-off"])
def test_a_deterministic_stage_or_checks_off_flags_nothing(tmp_path, mode):
    _killed_mid_run(tmp_path, "double" if mode is None else "noisy", mode)
    done = podpipe("resume", "run", cwd=tmp_path, GATE=str(tmp_path / "gate"))
    assert done.returncode == 0, done.stderr
    status = run_status(tmp_path / "run")
    assert status["stages"]["maker"]["nondeterministic"] == []
    assert status["stages"]["maker"]["recomputed"] >= 1  # made again, compared (or not)
    assert "not deterministic" not in done.stdout
    assert status["state"] == "succeeded"


def _finished(workdir: Path, stages: list[dict], **extra) -> None:
    """A clean run of source -> STAGES -> sink, finished."""
    make_numbers(workdir / "data")
    write_spec(workdir / "p.yaml", spec(stages, [{"input": stages[-1]["name"],
                                                  "uri": "out/"}], **extra))
    done = podpipe("run", "p.yaml", "--quiet", "--run-dir", "run", cwd=workdir)
    assert done.returncode == 0, done.stderr


def test_verify_on_a_deterministic_pipeline_reports_nothing(tmp_path):
    _finished(tmp_path, [
        {"name": "double", "run": "pystages:double", "inputs": ["source"]},
        {"name": "plus", "run": "pystages:plus_one", "inputs": ["double"]},
        {"name": "total", "run": "pystages:sum_all", "reduce": True, "inputs": ["plus"]}])
    checked = podpipe("verify", "run", "--batches", "4", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "stage 'double': the same bytes on 4 batches" in checked.stdout
    assert "stage 'plus': the same bytes on 4 batches" in checked.stdout
    assert "stage 'total': 4 not compared (a reduce: made of every batch)" in checked.stdout
    assert "other bytes" not in checked.stdout
    assert list(Path("/dev/shm").glob("podpipe-verify-*")) == []  # its folder went with it


def test_verify_names_the_stage_that_gives_other_bytes(tmp_path):
    _finished(tmp_path, [
        {"name": "double", "run": "pystages:double", "inputs": ["source"]},
        {"name": "maker", "run": "pystages:noisy", "inputs": ["double"]}])
    checked = podpipe("verify", "run", "--batches", "2", cwd=tmp_path)
    assert checked.returncode == 1, checked.stderr
    assert "stage 'maker': other bytes on 2 batches (0: other bytes than the run made; " \
        "9: other bytes than the run made)" in checked.stdout
    assert "stage 'double': the same bytes on 2 batches" in checked.stdout
    one = podpipe("verify", "run", "--stage", "double", "--batches", "1", cwd=tmp_path)
    assert one.returncode == 0 and "maker" not in one.stdout
    for args, message in ((["--stage", "nope"], "--stage 'nope': no such stage"),
                          (["--batches", "0"], "--batches 0: expected 1 or more")):
        refused = podpipe("verify", "run", *args, cwd=tmp_path)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    (tmp_path / "data" / "part-0.parquet").touch()  # newer: the source changed
    changed = podpipe("verify", "run", cwd=tmp_path)
    assert changed.returncode == 2 and "part-0.parquet (bytes or modification time)" \
        in changed.stderr


def test_verify_refuses_a_run_that_did_not_finish(tmp_path):
    _killed_mid_run(tmp_path, "double", None)
    refused = podpipe("verify", "run", cwd=tmp_path)
    assert refused.returncode == 2 and "the run is interrupted" in refused.stderr
