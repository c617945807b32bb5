"""Reading a spec's values: each checked, each error naming the file, the field (a
path such as `spec.stages[1].inputs[0]`), its YAML line and what was expected.
`model.spec` says which fields a pipeline has (`model.stagespec` a stage's); this
says how a value is read."""

from __future__ import annotations

import re
from typing import Any

import yaml

from podpipe.errors import SpecError
from podpipe.model.pipeline import NAME

MAX_WORKERS = 256  # processes of one node
MAX_BATCH_ROWS = 1 << 31  # rows of a batch (or of a call's request)


class Reader:
    """Checks values and raises SpecError with the field's path and YAML line."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file, self.root = file, root

    def fail(self, path: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, field=path or None, line=self._line(path))

    def _line(self, path: str) -> int | None:
        node = self.root
        for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
            if isinstance(node, yaml.MappingNode):
                node = next((v for k, v in node.value if k.value == part), None)
            elif isinstance(node, yaml.SequenceNode) and part.startswith("["):
                index = int(part[1:-1])
                node = node.value[index] if index < len(node.value) else None
            else:
                node = None
            if node is None:
                return None
        return node.start_mark.line + 1 if node is not None else None

    def mapping(self, path: str, value: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping with fields {sorted(allowed)}, "
                                  f"got {kind(value)}")
        for key in value:
            if key not in allowed:
                raise self.fail(join(path, str(key)),
                                f"unknown field {key!r}; expected one of {sorted(allowed)}")
        for key in sorted(required):
            if key not in value:
                raise self.fail(path, f"missing required field {key!r}")
        return value

    def string(self, path: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(path, f"expected a non-empty string, got {kind(value)}")
        return value

    def integer(self, path: str, value: Any, minimum: int = 1,
                maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(path, f"expected an integer >= {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.fail(path, f"expected at most {maximum:,}, got {value:,}")
        return value

    def seconds(self, path: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self.fail(path, f"expected seconds > 0, got {value!r}")
        return float(value)

    def boolean(self, path: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"expected true or false, got {value!r}")
        return value

    def strings(self, path: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(path, f"expected a non-empty list of strings, got {kind(value)}")
        return tuple(self.string(f"{path}[{i}]", item) for i, item in enumerate(value))

    def workers(self, path: str, value: Any) -> int | None:
        """A node's `workers`: a whole number from 1, or `auto` (None)."""
        if value == "auto":
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not \
                1 <= value <= MAX_WORKERS:
            raise self.fail(path, f"expected 'auto' or a whole number of worker processes "
                                  f"from 1 to {MAX_WORKERS}, got {value!r}")
        return value

    def name(self, path: str, value: Any) -> str:
        text = self.string(path, value)
        if not NAME.match(text):
            hint = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63]
            raise self.fail(path, f"invalid name {text!r}: a name is also a process's, a "
                                  "folder's and, on Kubernetes, a container's (a DNS label): "
                                  "lower-case letters, digits and '-', starting and ending "
                                  "with a letter or digit, at most 63 characters"
                                  + (f"; e.g. {hint!r}" if NAME.match(hint) else ""))
        return text


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: f"the string {value!r}",
            bool: f"{str(value).lower()}"}.get(type(value), f"{value!r}")
