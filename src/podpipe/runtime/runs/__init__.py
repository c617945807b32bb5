"""A run as a whole: one pod start to end (`pod`), every replica of a pipeline here
(`replicas`), where a run starts from (`origin`), what a run would do (`planning`,
`podpipe plan`), starting stage processes (`launcher`: the fork server's and the
spawning launcher), and a run seen from another shell: finding and following it
(`following`), steering it (`control`). The top of the runtime: imports any of it."""
