"""What outlives a process: the node tier's copies (`tiers`), the run's journal
(`journal`), the durable tier's checkpoints (`durable`) behind the object-store seam
(`store`, with its in-package fake), and a call stage's kept answers (`answers`).
Imports `data` and `plumbing`."""
