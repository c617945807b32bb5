"""`python -m podpipe` is the CLI; stage processes are started this way."""

from podpipe.cli import entry

entry()
