"""Batch data: outputs as Arrow IPC files mapped from RAM scratch (`arrowfile`,
`scratch`), the source's plan and batches (`source`), the sinks' Parquet files
(`sink`) and the tables loaded once per pod (`tables`). Imports only `plumbing`."""
