"""The run directory as podpipe and other shells read it: its layout and `run.json`
(`layout`), the typed `status.json` and how pods' statuses merge (`status`), and the
typed, versioned records of `tasks.jsonl` and `samples.jsonl` (`records`). Imports
`storage`, `data` and `plumbing`."""
