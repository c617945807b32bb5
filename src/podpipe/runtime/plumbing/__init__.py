"""Plumbing every podpipe process is built on, knowing nothing of pipelines' data:
the wire between a pod's processes (`protocol`), the event loop (`loop`), tying a
process's life to its parent's (`lifetime`), the stamped lines of a run's logs
(`logline`), a process's CPU time (`cputime`) and publishing a file atomically
(`files`). Imports nothing else of the runtime."""
