"""The engine layer: decisions of a run as pure functions, no I/O."""
