"""Where a URI points, as far as can be told without touching it: does one location
contain another? Used to refuse sinks that would overwrite each other or be read
back as the source.

Local paths (no scheme, or `file://`) are compared absolute and normalized,
relative ones from the working directory; other URLs as text, scheme included.
`resolved` follows the links of a local path, for the check a run makes before it
writes (the spec's own check does not touch the file system).
"""

from __future__ import annotations

import fnmatch
import os
import re

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_GLOB = set("*?[")


def _normal(uri: str) -> str:
    match = _SCHEME.match(uri)
    if match is None or match.group(1) == "file":
        path = uri[len("file://"):] if match else uri
        return "file://" + os.path.normpath(os.path.abspath(path))
    return uri.rstrip("/")


def resolved(uri: str) -> str:
    """A local path with the links in it that exist now followed (`os.path.realpath`:
    the one place here that looks at the file system); other URLs as they are. A sink
    reached through a link into the source is inside it all the same."""
    match = _SCHEME.match(uri)
    if match is None or match.group(1) == "file":
        path = uri[len("file://"):] if match else uri
        return os.path.realpath(path)
    return uri


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def overlap(one: str, other: str) -> bool:
    """Is one location the other, or inside it?"""
    a, b = _normal(one), _normal(other)
    return _inside(a, b) or _inside(b, a)


def reads_back(source: str, sink: str) -> bool:
    """Would a source at `source` read what a sink at `sink` writes? A folder source
    reads everything below it; a glob reads what it matches (`*` within one path
    segment, `**` across any number)."""
    pattern, folder = _normal(source), _normal(sink)
    if not _GLOB & set(pattern):
        return _inside(folder, pattern)
    return _matches(pattern.split("/"), f"{folder}/part-000000.parquet".split("/"))


def _matches(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and \
        _matches(pattern[1:], parts[1:])
