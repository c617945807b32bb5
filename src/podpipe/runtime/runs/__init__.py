"""A run as a whole: one pod start to end (`pod`), every replica of a pipeline here
(`replicas`), where a run starts from (`origin`), starting stage processes
(`launcher`, the conductor's `Launcher`), and a run seen from another shell: finding
and following it (`following`), steering it (`control`). The top of the runtime:
imports any of it."""
