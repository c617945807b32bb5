"""One batch output, as every part of podpipe records it.

The engine keeps one per (node, key) while it is needed; the journal stores one per
tier that holds a copy; a durable manifest lists them; the wire carries one in an
agent's `done`. One record for all four, so nothing is converted on the way.
"""

from __future__ import annotations

import msgspec

TIERS = ("ram", "node", "durable")  # nearest first: where a resume looks for an output


class Output(msgspec.Struct, frozen=True):
    """What `node` made for `key` (a source batch, a shard, or 0 for a global node):
    a file of `nbytes` bytes and `rows` rows, with its xxh3 `checksum`, on `tier`."""

    node: str
    key: int
    path: str
    nbytes: int
    rows: int
    checksum: str = ""
    tier: str = "ram"

    def on(self, tier: str, path: str) -> "Output":
        """The same output, copied to another tier."""
        return msgspec.structs.replace(self, tier=tier, path=path)
