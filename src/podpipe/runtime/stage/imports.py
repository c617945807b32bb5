"""`podpipe validate`'s import check: every `run:` target imported in a child process,
as a stage's process would (the working directory first on the path), within a
time limit, and checked callable and able to take its `params`. The child reads
the targets as JSON on stdin and writes what was wrong with each on stdout; user
code never runs in the command's own process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

from podpipe.errors import SpecError
from podpipe.model.spec import Pipeline

def check(pipeline: Pipeline, timeout: float) -> None:
    """Raise a SpecError for the first `run:` target that does not import, is not
    callable or cannot take its params (the others named after it)."""
    targets = [{"run": stage.run, "params": stage.params, "stage": stage.name,
                "field": f"spec.stages[{index}].run"}
               for index, stage in enumerate(pipeline.stages) if stage.run]
    if not targets:
        return
    child = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             start_new_session=True)  # its own group: ended whole
    try:
        out, _ = child.communicate(json.dumps({"file": pipeline.file, "targets": targets}),
                                   timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        raise SpecError(f"importing the stages' modules took longer than {timeout:g} s "
                        "(code that runs at import time? 'validate --no-import' skips "
                        "this check)", file=pipeline.file) from None
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    try:
        problems: list[dict[str, str]] = json.loads(out)
    except ValueError:  # it died at import (os._exit, a signal): say so
        raise SpecError(f"importing the stages' modules ended the checking process "
                        f"(exit code {child.returncode})", file=pipeline.file) from None
    if problems:
        first, *others = problems
        also = (f" (and {len(others)} more: " + ", ".join(p["field"] for p in others) + ")"
                if others else "")
        raise SpecError(first["message"] + also, file=pipeline.file, field=first["field"])


def _main() -> None:
    from podpipe.runtime.stage.work import load_callable

    sys.path.insert(0, os.getcwd())
    asked: dict[str, Any] = json.loads(sys.stdin.read())
    real_stdout, sys.stdout = sys.stdout, sys.stderr  # user code's prints are not answers
    problems = []
    for target in asked["targets"]:
        try:
            load_callable(target["run"], asked["file"], target["field"], target["params"],
                          target["stage"])
        except SpecError as exc:
            problems.append({"field": exc.field or target["field"], "message": exc.detail})
    real_stdout.write(json.dumps(problems))


if __name__ == "__main__":
    _main()
