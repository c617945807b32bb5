"""The base of every message on the wire (`protocol`, `requests`): a msgspec struct
tagged by its `type`, refusing fields it does not know."""

from __future__ import annotations

import msgspec


class Tagged(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass
