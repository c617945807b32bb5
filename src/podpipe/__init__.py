"""podpipe: the pod pipeline pattern.

A pod pulls its shard of the data into RAM once; a graph of stages, each its own
process, transforms it in turn, each reading the previous stage's output straight
out of the pod's shared memory as memory-mapped Arrow IPC files.

From Python (`podpipe.api`): `podpipe.run(spec) -> Run`, `podpipe.resume`,
`podpipe.status`, `podpipe.validate`, `podpipe.up(spec) -> Line` (a standing line:
`line.submit(...) -> Job`, `job.wait()`, `line.down()`); errors are `podpipe.SpecError` (invalid
input) and `podpipe.RunError` (a failed run: `.stage`, `.batch`, `.traceback`).
"""

from podpipe.errors import InputError, PodpipeError, RunError, SpecError, UsageError

__version__ = "0.1.0"

_API = ("run", "resume", "status", "validate", "up", "Run", "Job", "Line", "StageStatus",
        "StageFigures")

__all__ = ["InputError", "PodpipeError", "RunError", "SpecError", "UsageError", *_API]


def __getattr__(name: str) -> object:
    # The API imports the runtime; a stage process (`python -m podpipe agent`) must not.
    if name in _API:
        from podpipe import api

        return getattr(api, name)
    raise AttributeError(f"module 'podpipe' has no attribute {name!r}")
