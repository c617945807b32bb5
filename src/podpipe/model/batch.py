"""A source batch: which rows of which file make batch `b` (the plan `runtime.source`
makes from footers, and the task the source agent loads)."""

from __future__ import annotations

import msgspec


class SourceBatch(msgspec.Struct, frozen=True):
    file: str
    parts: tuple[int, ...] = ()   # row groups / record batches; () = the whole file
    offset: int = 0               # rows to skip within the parts
    length: int | None = None     # rows to keep; None = all
    nbytes: int = 0               # bytes read from the file, as its footer tells
