"""The runtime layer: processes, sockets, files. It carries out the engine's actions.

Its subpackages, lowest first; each imports only those below it (import-linter
holds it, `pyproject.toml`):

- `plumbing`: what every process is built on: the wire (`protocol`), the event
  loop, process lifetimes, log lines, CPU time, publishing a file atomically;
- `data`: batch data itself: Arrow IPC files in RAM scratch, the source, the sinks,
  the tables;
- `storage`: what outlives a process: the node tier, the journal, the durable tier
  and its object-store seam, a call stage's kept answers;
- `rundir`: the run directory as others read it: its layout, `status.json`, the
  task and sample records;
- `stage` and `conductor`, which never import each other: the stage process (an
  agent, what it does with a task, the fork server) and the per-pod process that
  owns the run; they meet only through the wire and the run directory;
- `runs`: a run as a whole, and from another shell: one pod start to end, the
  replicas, where a run starts from, the launchers, following and steering runs.
"""
