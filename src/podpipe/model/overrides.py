"""`--set KEY=VALUE`: a spec's document changed before it is validated.

The key is a dotted path under `spec` (or from the top when it starts with
apiVersion, kind, metadata or spec); list items are found by `name` or by index;
the value is YAML (`--set memory=2Gi`, `--set stages.filter.workers=4`).
"""

from __future__ import annotations

from typing import Any

import yaml

from podpipe.errors import SpecError


def apply(doc: Any, item: str, file: str) -> Any:
    """`--set stages.filter.run=m:f`: a dotted path under `spec` (or from the top
    when it starts with apiVersion/kind/metadata/spec); list items by `name`."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected KEY=VALUE", file=file)
    parts = key.split(".")
    if parts[0] not in ("apiVersion", "kind", "metadata", "spec"):
        parts = ["spec", *parts]
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = doc
    for depth, part in enumerate(parts[:-1]):
        nxt = _child(node, part)
        if nxt is None and isinstance(node, dict):
            nxt = node[part] = {}
        if nxt is None:
            raise SpecError(f"--set {key}: no field {'.'.join(parts[:depth + 1])!r} "
                            "to set a value under", file=file)
        node = nxt
    if isinstance(node, list):
        index = _index(node, parts[-1])
        if index is None:
            raise SpecError(f"--set {key}: no list item {parts[-1]!r}", file=file)
        node[index] = value
    elif isinstance(node, dict):
        node[parts[-1]] = value
    else:
        raise SpecError(f"--set {key}: {'.'.join(parts[:-1])!r} is not a mapping", file=file)
    return doc


def _child(node: Any, part: str) -> Any:
    if isinstance(node, dict):
        return node.get(part)
    if isinstance(node, list):
        index = _index(node, part)
        return node[index] if index is not None else None
    return None


def _index(items: list[Any], part: str) -> int | None:
    if part.isdigit():
        return int(part) if int(part) < len(items) else None
    return next((i for i, item in enumerate(items)
                 if isinstance(item, dict) and item.get("name") == part), None)
