"""The conductor <-> agent wire: length-prefixed JSON over a Unix stream socket.

Only metadata crosses it (stage, batch, paths, sizes, checksums), never data.

    agent -> conductor   {"type": "hello", "node", "version", "pid"}
    conductor -> agent   {"type": "task", "batch", "inputs": [[path, ...], ...], "output", ...}
    agent -> conductor   {"type": "reserve", "batch", "nbytes"}   before writing its output
    conductor -> agent   {"type": "grant"} | {"type": "deny"}    deny: drop the result
    agent -> conductor   {"type": "done", "batch", "output": {...} | null,
                          "stats": {"rows_in", "rows_out", "bytes_out", "busy"}}
    agent -> conductor   {"type": "failed", "batch", "message"}
    conductor -> agent   {"type": "stop"}
    probe -> conductor   {"type": "probe"}   answered {"type": "ready"} (or "stop" once done)
"""

from __future__ import annotations

import json
import socket
import struct
import time
from typing import Any

_HEADER = struct.Struct("!I")
MAX_MESSAGE = 64 << 20


class Closed(Exception):
    """The peer closed the connection."""


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(body)) + body)


def recv(sock: socket.socket) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > MAX_MESSAGE:
        raise Closed(f"message of {size} bytes is larger than {MAX_MESSAGE}")
    return json.loads(_recv_exactly(sock, size))


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(left)
        if not chunk:
            raise Closed("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class Reader:
    """Incremental decoder for a non-blocking socket in the conductor's event loop."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buffer)
            if size > MAX_MESSAGE:
                raise Closed(f"message of {size} bytes is larger than {MAX_MESSAGE}")
            end = _HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(json.loads(self._buffer[_HEADER.size:end]))
            del self._buffer[:end]
        return messages


def connect(path: str, wait: float) -> socket.socket:
    """A connection to the conductor's socket, waiting up to `wait` seconds for it to
    come up (in a pod, containers may start before the conductor is listening)."""
    deadline = time.monotonic() + wait
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)  # nothing to block on until the socket exists
        except OSError:
            sock.close()
            raise


def probe(path: str, timeout: float = 2.0) -> bool:
    """True if a conductor answers on `path` within `timeout` seconds."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            send(sock, {"type": "probe"})
            return recv(sock)["type"] in ("ready", "stop")
    except (OSError, Closed, ValueError):
        return False
