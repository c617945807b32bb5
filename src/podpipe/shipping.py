"""A Python caller's spec made a spec file: a path stays as it is; YAML text, a dict
or a `Pipeline` is written to a private temporary folder; and stages defined where
no stage process can import them — a function or class given as a dict's `run:`,
or named `__main__:NAME` from a notebook or a script — are shipped by value beside
it (`runtime.stage.shipped`). A callable of an importable module is named
`module:NAME` instead, imported by the stage as usual."""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from podpipe.errors import SpecError
from podpipe.model import spec as specs
from podpipe.model.pipeline import Pipeline

MAIN = "__main__"


def _importable(function: Callable[..., Any]) -> str | None:
    """`module:NAME` for a callable a stage process can import, else None."""
    module, name = getattr(function, "__module__", None), getattr(function, "__qualname__", "")
    if not module or module == MAIN or not name.isidentifier():
        return None
    try:
        found = getattr(importlib.import_module(module), name, None)
    except Exception:  # (its module cannot be imported here: ship it)
        return None
    return f"{module}:{name}" if found is function else None


def named(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Callable[..., Any]]]:
    """The spec document with every callable `run:` named (`module:NAME`, or
    `__main__:NAME` to be shipped), and the stages to ship with their callables:
    those given as callables of `__main__`, and those whose `run:` names one."""
    stages = (document.get("spec") or {}).get("stages") if isinstance(document, dict) else None
    if not isinstance(stages, list):
        return document, {}
    document, to_ship = copy.copy(document), {}
    document["spec"] = dict(document["spec"])
    document["spec"]["stages"] = stages = [dict(s) if isinstance(s, dict) else s
                                           for s in stages]
    for index, stage in enumerate(stages):
        if not isinstance(stage, dict) or "run" not in stage:
            continue
        run, field = stage["run"], f"spec.stages[{index}].run"
        if callable(run):
            stage["run"] = _importable(run)
            if stage["run"] is None:
                name = getattr(run, "__name__", "")
                stage["run"] = f"{MAIN}:{name if name.isidentifier() else '_shipped'}"
                to_ship[str(stage.get("name"))] = run
        elif isinstance(run, str) and run.startswith(f"{MAIN}:"):
            to_ship[str(stage.get("name"))] = _from_main(run, field)
    return document, to_ship


def _from_main(target: str, field: str) -> Callable[..., Any]:
    name = target.partition(":")[2]
    found: Callable[..., Any] | None = getattr(sys.modules.get(MAIN), name, None)
    if found is None or not callable(found):
        raise SpecError(f"{target!r}: no function or class {name!r} is defined in this "
                        "notebook or script (define it before running the pipeline)",
                        field=field)
    return found


@contextlib.contextmanager
def spec_file(spec: Any, parsed: Pipeline) -> Iterator[str]:
    """A path to the spec for a run: the user's file when nothing is shipped, else a
    private temporary folder's `spec.yaml` with the shipped stages beside it (gone
    once the run has copied them)."""
    from podpipe.runtime.rundir.layout import SHIPPED
    from podpipe.runtime.stage import shipped

    document, to_ship = named(spec if isinstance(spec, dict) else parsed.document)
    if isinstance(spec, (str, os.PathLike)) and not (isinstance(spec, str) and "\n" in spec) \
            and not to_ship:
        yield os.fspath(spec)
        return
    folder = Path(tempfile.mkdtemp(prefix="podpipe-spec-"))  # 0700: this user's alone
    try:
        for index, stage in enumerate(parsed.stages):
            if stage.name in to_ship:
                shipped.ship(to_ship[stage.name], stage.name, f"spec.stages[{index}].run",
                             folder / SHIPPED)
        (folder / "spec.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        yield str(folder / "spec.yaml")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def parse_dict(spec: dict[str, Any], overrides: list[str]) -> Pipeline:
    """A spec given as a dict, its callables named."""
    return specs.parse(yaml.safe_dump(named(spec)[0], sort_keys=False),
                       file="the spec dict", overrides=overrides, lines=False)
