"""Byte sizes as Kubernetes quantities (`512Mi`, `2Gi`, `1.5G`, `1000000`).

Binary suffixes Ki, Mi, Gi, Ti, Pi (Docker's KiB, MiB, ... too) and decimal ones
k, M, G, T, P (KB, MB, ...); a plain number is bytes. A lone `m` is refused: in
Kubernetes it is milli (512m is half a byte), in Docker it is MiB.
"""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
    "p": 10**15, "pb": 10**15, "pi": 2**50, "pib": 2**50,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_EXAMPLES = "such as 512Mi, 2Gi, 1.5G or 1000000 (bytes)"


def parse_size(text: str | int) -> int:
    """Bytes in `text`; raises ValueError saying what to write instead."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size {_EXAMPLES}, got a boolean")
    if isinstance(text, int):
        if text <= 0:
            raise ValueError(f"expected a positive size {_EXAMPLES}, got {text}")
        return text
    match = _SIZE.match(str(text))
    if match and match.group(2) == "m":
        number = match.group(1)
        raise ValueError(f"{text!r}: 'm' is milli in Kubernetes ({number}m is "
                         f"{float(number) / 1000:g} bytes) and MiB in Docker; write "
                         f"{number}Mi ({number} MiB) or {number}M ({number} MB)")
    unit = match.group(2).lower() if match else None
    if unit == "m":  # `M`: mega, as in Kubernetes
        unit = "mb"
    if not match or unit not in _UNITS:
        raise ValueError(f"expected a size {_EXAMPLES}, got {text!r}")
    value = float(match.group(1)) * _UNITS[unit]
    if value != int(value) or value < 1:
        raise ValueError(f"{text!r} is not a whole number of bytes: give a unit, e.g. "
                         f"{match.group(1)}Gi or {match.group(1)}Mi")
    return int(value)


def format_size(size: float) -> str:
    """A short human form, binary units: 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"
