"""What a standing line keeps warm from one job to the next, and when it may not.

- **What its processes set up**: a stage's or a sink's process keeps its function,
  its version, a call stage's client and connections, when the next job defines the
  node as the job before did (`unchanged`) — and a class stage whose setup took
  tables (`setupInputs`), only when those tables are kept too. Never the source's or
  a table's: their files may have changed under the same names, and what they set
  up would read the old ones.
- **Tables in RAM**: a table a job loaded stays in the line's RAM scratch, and the
  next job takes it as loaded (`offer`) when it defines the table alike and the
  table's files are as they were (its version: a digest of their names, sizes and
  modification times, `tables.version`); else it is dropped and the job loads it
  anew. The job's status records the version it read, as a run's does.
"""

from __future__ import annotations

from pathlib import Path

from podpipe.model.output import Output
from podpipe.model.pipeline import Pipeline, Table
from podpipe.runtime.data import tables as table_files


class Warmth:
    def __init__(self, served: Pipeline | None = None) -> None:
        """`served`: what the line's processes were started with (its own spec): the
        first job keeps what they set up for the nodes it defines alike."""
        self.served = served  # the last job's, as its processes have it
        self.tables: dict[str, tuple[Table, str, Output]] = {}  # in RAM: as defined, version

    def unchanged(self, now: Pipeline) -> frozenset[str]:
        """The stages and sinks `now` defines as the job before did; `now` is served
        from here on."""
        before, self.served = self.served, now
        if before is None:
            return frozenset()
        same = {s.name for s in now.stages if s in before.stages  # a setup that indexed
                and all(self._fresh(t, now) for t in s.setup_inputs)}  # a table: its own
        return frozenset(same | {s.name for s in now.sinks if s in before.sinks})

    def _fresh(self, name: str, now: Pipeline) -> bool:
        """Is table `name` in RAM, defined by `now` as it was and its files unchanged?"""
        if name not in self.tables:
            return False
        table, version, output = self.tables[name]
        try:
            return (next((t for t in now.tables if t.name == name), None) == table
                    and table_files.version(table) == version and Path(output.path).exists())
        except (OSError, ValueError):  # (its files gone: the job says so)
            return False

    def offer(self, now: Pipeline) -> dict[str, Output]:
        """The tables kept in RAM that the job `now` may take as loaded; the others
        are let go (their files go with the line's next sweep, once no job on the
        line reads them: `Scratch.sweep_jobs`)."""
        offered = {}
        for name, (_, _, output) in list(self.tables.items()):
            if self._fresh(name, now):
                offered[name] = output
            else:
                del self.tables[name]
        return offered

    def keep(self, pipeline: Pipeline, outputs: dict[tuple[str, int], Output],
             versions: dict[str, str]) -> frozenset[str]:
        """After a job: the tables it had in RAM (loaded or offered), kept for the
        next; their nodes (whose scratch folders stay)."""
        self.tables = {}
        for table in pipeline.tables:
            output = outputs.get((table.name, 0))
            if output is not None and output.tier == "ram" and table.name in versions:
                self.tables[table.name] = (table, versions[table.name], output)
        return frozenset(self.tables)
