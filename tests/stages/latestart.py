"""A stage whose second worker never finishes starting: it waits at import until it
is told to end (SIGTERM) and notes that in the file `LATE_MARK` names, so that a
test can see a run's end stop a process still starting instead of waiting it out."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

if os.environ.get("PODPIPE_WORKER") == "1":
    def _ended(*_: object) -> None:
        Path(os.environ["LATE_MARK"]).write_text(f"terminated {os.getpid()}")
        os._exit(0)

    signal.signal(signal.SIGTERM, _ended)
    while True:
        signal.pause()


def double(table: pa.Table) -> pa.Table:
    return table.set_column(table.schema.get_field_index("x"), "x",
                            pc.multiply(table["x"], 2))
