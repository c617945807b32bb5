"""Every error podpipe raises on purpose, and the exit code each one means.

    PodpipeError                 base; never raised itself
    +-- InputError               the user's input is wrong: exit 2
    |   +-- SpecError            a pipeline spec (file, field, what was expected)
    |   +-- UsageError           a flag or argument of the CLI
    |   +-- DataError            source data that cannot be read as declared
    +-- RunError                 the run failed: exit 1
        +-- StageError           a stage failed on a batch (names stage and batch)
        +-- BudgetError          the RAM budget cannot hold what the run needs
        +-- StoreError           the durable store cannot be reached or read
        +-- InterruptedRun       stopped by a signal (Ctrl-C, SIGTERM): exit 130

Foreign exceptions (OSError, pyarrow, yaml) are translated where they enter, with
`raise ... from exc`, so that the CLI can map every failure to one exit code here
and never print a traceback for a user's mistake.
"""

from __future__ import annotations


class PodpipeError(Exception):
    """Base of podpipe's own errors."""

    exit_code = 1


class InputError(PodpipeError):
    """The user's input (spec, flags, data) is invalid."""

    exit_code = 2


class SpecError(InputError):
    """A pipeline spec is invalid; the message names file, field and expectation."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 line: int | None = None) -> None:
        self.file, self.field, self.line, self.detail = file, field, line, message
        where = file or "spec"
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}")


class SpecWarning(UserWarning):
    """A spec that is read but should change (an old `apiVersion`, say)."""


class UsageError(InputError):
    """A command-line flag or argument is invalid."""


class DataError(InputError):
    """Source data cannot be read as the spec declares it."""


class RunError(PodpipeError):
    """The run failed. `stage`, `batch` and `traceback` (the last frames of the
    stage's own code) say where, when a stage failed (`StageError`)."""

    exit_code = 1
    stage: str | None = None
    batch: int | None = None
    traceback: str = ""


class StageError(RunError):
    """A stage failed on a batch."""

    stage: str

    def __init__(self, stage: str, batch: int | None, message: str,
                 traceback: str = "") -> None:
        self.stage, self.batch = stage, batch
        self.traceback = traceback  # the last frames of the stage's own code, if any
        where = f"stage {stage!r}" + (f", batch {batch}" if batch is not None else "")
        super().__init__(f"{where}: {message}")


class BudgetError(RunError):
    """The RAM scratch budget cannot hold what the run needs."""


class StoreError(RunError):
    """The object store of the durable tier failed: unreachable, forbidden, malformed.
    Distinct from "nothing there", which is not an error."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url, self.cause = url, cause
        super().__init__(f"the durable store {url} cannot be used: "
                         f"{type(cause).__name__}: {cause}")


INTERRUPTED_EXIT_CODE = 130


class InterruptedRun(RunError):
    """The run was stopped by a signal."""

    exit_code = INTERRUPTED_EXIT_CODE


def exit_code(error: BaseException) -> int:
    """The process exit code for an error that ended a command."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED_EXIT_CODE
    if isinstance(error, PodpipeError):
        return error.exit_code
    return 1
