"""A stage's version: its `version:` field, else a digest of what defines it."""

from __future__ import annotations

import sys

import yaml

from podpipe.model import spec as specs
from podpipe.runtime.stage import work


def _pipeline(stage: dict):
    doc = {"apiVersion": "podpipe.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "t"},
           "spec": {"source": {"uri": "x.parquet"}, "stages": [stage],
                    "sinks": [{"input": stage["name"], "uri": "out/"}]}}
    return specs.parse(yaml.safe_dump(doc))


def _version(tmp_path, source: str, module: str, **extra) -> str:
    (tmp_path / f"{module}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        pipeline = _pipeline({"name": "s", "run": f"{module}:f", "inputs": ["source"], **extra})
        return work.version_of(pipeline, "s", work.work_for(pipeline, "s"))
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(module, None)


def test_a_run_stage_is_versioned_by_its_modules_source(tmp_path):
    one = _version(tmp_path, "def f(t):\n    return t\n", "mod_a")
    same = _version(tmp_path, "def f(t):\n    return t\n", "mod_a")
    changed = _version(tmp_path, "def f(t):\n    return t  # changed\n", "mod_a")
    assert one.startswith("src-") and one == same and changed != one


def test_the_version_field_wins_over_the_digest(tmp_path):
    assert _version(tmp_path, "def f(t):\n    return t\n", "mod_b", version=7) == "7"


def test_a_command_stage_is_versioned_by_its_command_image_and_env():
    def version(**extra):
        pipeline = _pipeline({"name": "s", "command": ["tool", "--x"], "inputs": ["source"],
                              **extra})
        return work.version_of(pipeline, "s", work.work_for(pipeline, "s"))

    base = version()
    assert base.startswith("cmd-") and base == version()
    assert version(image="tool:2") != base and version(env={"K": "v"}) != base
    assert version(command=["tool", "--y"]) != base
