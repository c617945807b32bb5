"""The run's journal: which (node, batch) finished, and where its output lives.

SQLite in `RUN_DIR/journal.sqlite` (WAL). Two tables: `done` (node, batch, the
version of the stage that did it) and `outputs` (node, batch, tier, path, bytes,
rows, checksum), a row per tier holding a copy. The conductor records what
finished, and each node-tier copy once it is fsynced, and commits at every status
flush. A crash loses at most the last quarter
second of records: those batches are computed again. Nothing in the journal is
trusted on resume without checking the file's checksum.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Callable

from podpipe.model.output import Output

FILE = "journal.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS done (
    node TEXT NOT NULL, batch INTEGER NOT NULL, version TEXT,
    PRIMARY KEY (node, batch));
CREATE TABLE IF NOT EXISTS outputs (
    node TEXT NOT NULL, batch INTEGER NOT NULL, tier TEXT NOT NULL, path TEXT NOT NULL,
    nbytes INTEGER NOT NULL, rows INTEGER NOT NULL, checksum TEXT NOT NULL,
    PRIMARY KEY (node, batch, tier));
CREATE TABLE IF NOT EXISTS schemas (
    node TEXT PRIMARY KEY, batch INTEGER NOT NULL, schema BLOB NOT NULL);
"""


class CorruptJournal(Exception):
    """The journal cannot be read as one (a damaged file, not a SQLite database)."""


class Journal:
    """The run's record for a resume. A write that fails (a full disk) sets the
    journal aside rather than crash the run or leave it half-written and trusted: a
    resume then starts from the other tiers (`error` says so)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.error: str | None = None
        path = run_dir / FILE
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))  # private;
        self.db = sqlite3.connect(path, timeout=10)  # its -wal and -shm files follow it
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self.db.close()
            raise CorruptJournal(f"{path}: {exc}") from exc

    def _write(self, sql: str, values: tuple[object, ...] = ()) -> None:
        self._guarded(lambda: self.db.execute(sql, values))

    def _guarded(self, write: Callable[[], object]) -> None:
        """Do `write`, unless the journal was set aside; a failure sets it aside."""
        if self.error is not None:
            return  # set aside: nothing more is recorded
        try:
            write()
        except sqlite3.Error as exc:  # "database or disk is full", an I/O error
            self.error = (f"the journal cannot be written ({exc}): set aside, a resume "
                          "starts from the other tiers")
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            with contextlib.suppress(OSError):
                Journal.set_aside(self.run_dir)

    def forget(self, node: str, batch: int) -> None:
        """What `node` made for `batch` no longer stands (recomputed): no resume uses it."""
        self._write("DELETE FROM done WHERE node = ? AND batch = ?", (node, batch))
        self._write("DELETE FROM outputs WHERE node = ? AND batch = ?", (node, batch))

    def finished(self, node: str, batch: int, version: str) -> None:
        self._write("INSERT OR REPLACE INTO done VALUES (?, ?, ?)", (node, batch, version))

    def stored(self, copy: Output) -> None:
        """A copy of an output on `copy.tier` (one row per tier that holds one)."""
        self._write("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (copy.node, copy.key, copy.tier, copy.path, copy.nbytes, copy.rows,
                     copy.checksum))

    def commit(self) -> None:
        self._guarded(self.db.commit)

    def done(self) -> dict[str, set[int]]:
        finished: dict[str, set[int]] = {}
        try:
            for node, batch in self.db.execute("SELECT node, batch FROM done"):
                finished.setdefault(node, set()).add(batch)
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(str(exc)) from exc
        return finished

    def fix_schema(self, node: str, batch: int, schema: bytes) -> None:
        """`node`'s output schema for the run (`schema: fixed`), as `batch` made it."""
        self._write("INSERT OR IGNORE INTO schemas VALUES (?, ?, ?)", (node, batch, schema))

    def schemas(self) -> dict[str, tuple[int, bytes]]:
        """node -> (the batch that fixed its schema, the schema)."""
        try:
            return {node: (batch, bytes(schema)) for node, batch, schema in
                    self.db.execute("SELECT node, batch, schema FROM schemas")}
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(str(exc)) from exc

    def made_by(self) -> dict[tuple[str, int], str]:
        """The version of the stage that made each (node, batch) it recorded."""
        try:
            return {(node, batch): version for node, batch, version in
                    self.db.execute("SELECT node, batch, version FROM done") if version}
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(str(exc)) from exc

    def copies(self) -> list[Output]:
        try:
            return [Output(*row) for row in self.db.execute(
                "SELECT node, batch, path, nbytes, rows, checksum, tier FROM outputs "
                "ORDER BY node, batch, tier")]
        except sqlite3.DatabaseError as exc:
            raise CorruptJournal(str(exc)) from exc

    @staticmethod
    def set_aside(run_dir: Path) -> Path:
        """Move a corrupt journal out of the way (kept for a look); returns where."""
        aside = run_dir / f"{FILE}.corrupt"
        for suffix in ("", "-wal", "-shm"):
            source = run_dir / f"{FILE}{suffix}"
            if source.exists():
                os.replace(source, run_dir / f"{FILE}.corrupt{suffix}")
        return aside

    def close(self) -> None:
        self.commit()
        if self.error is None:
            self.db.close()
