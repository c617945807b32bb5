"""Example pipelines bundled with podpipe."""
