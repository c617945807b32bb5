"""Stages defined where no stage process can import them — a notebook's cells, a
script's `__main__` — shipped by value: the caller (`podpipe.run`, `podpipe.up`)
pickles each such callable with cloudpickle (its code, and what it refers to that
is itself defined interactively; never data) into `podpipe-shipped/STAGE.pkl` beside the spec
it runs; the run directory keeps a copy beside its own spec (`rundir.layout`), so
a resume loads the same code; the stage's process loads it, from a file of this
user's that no one else can write, instead of importing `__main__`.

A shipped stage's `run:` reads `__main__:NAME`; its version digests the source
text of the callable and of the interactively defined functions and classes it
refers to, as `codeversion` does for a module (the pickle's bytes when the source
cannot be had)."""

from __future__ import annotations

import hashlib
import inspect
import pickle
import sys
import types
from pathlib import Path
from typing import Any, Callable

from podpipe.errors import SpecError
from podpipe.runtime.plumbing import files
from podpipe.runtime.rundir.layout import SHIPPED

MAIN = "__main__"


def folder(spec_file: str | Path) -> Path:
    """Where the stages shipped with a spec are."""
    return Path(spec_file).parent / SHIPPED


def _source(obj: Any) -> str | None:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return None


def _referred(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referred(const)
    return names


def version(function: Callable[..., Any], pickled: bytes) -> str:
    """`src-…` of the callable's source and of the interactively defined functions,
    classes and plain constants it refers to, followed by name; of its pickle when
    its source cannot be had."""
    digest, seen, todo = hashlib.sha256(), set(), [function]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        text = _source(obj)
        if text is None:
            if obj is function:
                return f"src-{hashlib.sha256(pickled).hexdigest()[:12]}"
            continue
        digest.update(text.encode() + b"\0")
        codes = ([obj.__code__] if isinstance(obj, types.FunctionType) else
                 [m.__code__ for m in vars(obj).values() if isinstance(m, types.FunctionType)])
        space = (obj.__globals__ if isinstance(obj, types.FunctionType) else
                 getattr(sys.modules.get(obj.__module__), "__dict__", {}))
        for name in sorted(set().union(*map(_referred, codes)) if codes else ()):
            value = space.get(name)
            if isinstance(value, (types.FunctionType, type)) and value.__module__ == MAIN:
                todo.append(value)
            elif isinstance(value, (int, float, str, bytes, bool, tuple)):
                digest.update(f"{name}={value!r}\0".encode())
    return f"src-{digest.hexdigest()[:12]}"


def ship(function: Callable[..., Any], stage: str, field: str, into: Path) -> None:
    """`function` pickled by value into `into/STAGE.pkl` (a private file), or a
    SpecError naming `field` and why it cannot be shipped."""
    import cloudpickle

    name = getattr(function, "__qualname__", repr(function))
    try:
        pickled = cloudpickle.dumps(function, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # what cannot be pickled is the user's to change
        raise SpecError(f"cannot ship {name!r} to its stage process: "
                        f"{type(exc).__name__}: {exc} (a stage's code may not hold "
                        "open files, locks, sockets or generators; build them in a "
                        "class stage's setup instead)", field=field) from None
    files.private_dirs(into)
    files.publish(into / f"{stage}.pkl",
                  pickle.dumps((version(function, pickled), pickled),
                               protocol=pickle.HIGHEST_PROTOCOL))


def load(spec_file: str, stage: str, target: str, field: str
         ) -> tuple[Callable[..., Any], str]:
    """The shipped callable of `stage` and its version; a SpecError naming the
    target when none was shipped (a spec run from the command line, say)."""
    path = folder(spec_file) / f"{stage}.pkl"
    try:
        held = files.read_ours(path)
    except FileNotFoundError:
        raise SpecError(f"{target!r} names a function of the notebook or script that "
                        "runs the pipeline, and none was shipped with this spec: run it "
                        "with podpipe.run(...) from there (its code goes with the run), "
                        "or move the function into a module", field=field) from None
    except (OSError, files.NotOurs) as exc:
        raise SpecError(f"cannot read the code shipped for {target!r}: {exc}",
                        field=field) from None
    version_of, pickled = pickle.loads(held)  # ours alone: checked just above
    function: Callable[..., Any] = pickle.loads(pickled)
    return function, version_of
