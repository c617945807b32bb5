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


def test_a_run_stage_is_versioned_by_its_own_code(tmp_path):
    one = _version(tmp_path, "def f(t):\n    return t\n", "mod_a")
    same = _version(tmp_path, "def f(t):\n    return t\n", "mod_a")
    changed = _version(tmp_path, "def f(t):\n    return t  # changed\n", "mod_a")
    assert one.startswith("src-") and one == same and changed != one


MODULE = """\
import json
from pathlib import Path

SCALE = 3
OTHER = 1


def decorate(f):
    return f  # decorate


def helper(x):
    return x * SCALE


def unrelated(t):
    return t  # unrelated


@decorate
def f(t):
    return helper(t)


class C:
    def __call__(self, t):
        return helper(t)
"""


def test_editing_an_unrelated_function_leaves_a_stages_version_as_it_was(tmp_path):
    one = _version(tmp_path, MODULE, "mod_c")
    assert _version(tmp_path, MODULE.replace("t  # unrelated", "t + 1"), "mod_c") == one
    assert _version(tmp_path, MODULE.replace("OTHER = 1", "OTHER = 2"), "mod_c") == one
    assert _version(tmp_path, MODULE.replace("import json\n", ""), "mod_c") == one
    assert _version(tmp_path, MODULE + "\n\ndef g(t):\n    return t\n", "mod_c") == one


def test_editing_a_helper_constant_or_decorator_it_refers_to_changes_it(tmp_path):
    one = _version(tmp_path, MODULE, "mod_d")
    assert _version(tmp_path, MODULE.replace("x * SCALE", "x * SCALE + 0"), "mod_d") != one
    assert _version(tmp_path, MODULE.replace("SCALE = 3", "SCALE = 4"), "mod_d") != one
    assert _version(tmp_path, MODULE.replace("f  # decorate", "f"), "mod_d") != one


def test_a_helper_in_the_projects_own_module_is_followed_and_a_library_is_not(tmp_path):
    (tmp_path / "helpers_e.py").write_text("def helper(x):\n    return x\n\n\n"
                                          "def other():\n    pass\n")
    source = "from helpers_e import helper\nimport pyarrow\n\n\ndef f(t):\n" \
             "    return helper(pyarrow.table(t))\n"
    sys.path.insert(0, str(tmp_path))
    try:
        import helpers_e  # noqa: F401  (imported, as the stage's module would)
        one = _version(tmp_path, source, "mod_e")
        (tmp_path / "helpers_e.py").write_text("def helper(x):\n    return x\n\n\n"
                                              "def other():\n    return 1\n")
        sys.modules.pop("helpers_e")
        assert _version(tmp_path, source, "mod_e") == one  # `other` is not reached
        (tmp_path / "helpers_e.py").write_text("def helper(x):\n    return x + 0\n")
        sys.modules.pop("helpers_e", None)
        assert _version(tmp_path, source, "mod_e") != one
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("helpers_e", None)


def test_a_class_stage_is_versioned_by_the_class_and_its_helpers(tmp_path):
    base = MODULE
    (tmp_path / "mod_f.py").write_text(base)
    sys.path.insert(0, str(tmp_path))
    try:
        pipeline = _pipeline({"name": "s", "run": "mod_f:C", "inputs": ["source"]})
        one = work.version_of(pipeline, "s", work.work_for(pipeline, "s"))
        sys.modules.pop("mod_f")
        (tmp_path / "mod_f.py").write_text(base.replace("t  # unrelated", "0")
                                          .replace("return helper(t)\n\n\nclass",
                                                   "return t\n\n\nclass"))
        assert work.version_of(pipeline, "s", work.work_for(pipeline, "s")) == one
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("mod_f", None)


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


def _as_main(tmp_path, source: str):
    """A script's functions, as a notebook's are: defined in `__main__`."""
    import importlib.util

    path = tmp_path / "script.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("__main__", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = """\
K = 2


def helper(t):
    return t * K


def other(t):
    return t  # other


def stage(t):
    return helper(t)
"""


def test_a_shipped_stage_is_versioned_by_its_code_and_what_it_refers_to(tmp_path):
    from podpipe.runtime.stage import shipped

    def version(source: str) -> str:
        return shipped.version(_as_main(tmp_path, source).stage, b"pickled")

    one = version(SCRIPT)
    assert one.startswith("src-") and version(SCRIPT) == one
    assert version(SCRIPT.replace("t  # other", "t + 1")) == one
    assert version(SCRIPT.replace("t * K", "t * K + 0")) != one
    assert version(SCRIPT.replace("K = 2", "K = 3")) != one
