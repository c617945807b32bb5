"""The Unix sockets a pod's processes talk over (`plumbing.protocol` is what they
say): the conductor's listening socket, a connection to it that waits for it to
come up, one request and its answer (`ask`), and a probe of a conductor (and of an
agent connected to it)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from podpipe.errors import RunError, UsageError
from podpipe.runtime.plumbing import protocol


def listen(path: Path) -> socket.socket:
    """The conductor's socket listening at `path` (a dead conductor's replaced):
    0600, in a 0700 directory (and each peer's uid is checked on connecting)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return sock


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


def ask(sock: socket.socket, message: protocol.Message | None, timeout: float | None,
        what: str) -> protocol.Message:
    """Send `message` (None: nothing, only wait) and return the answer; RunError if
    none comes in `timeout` seconds or the peer goes away, UsageError if it refused
    (each naming `what`: the request, or whom it went to)."""
    sock.settimeout(timeout)
    try:
        if message is not None:
            protocol.send(sock, message)
        answer = protocol.recv(sock)
    except socket.timeout:
        raise RunError(f"{what}: no answer in {timeout:.0f} s") from None
    except (protocol.Closed, OSError) as exc:
        raise RunError(f"{what}: the other end went away ({exc})") from None
    if isinstance(answer, protocol.Refused):
        raise UsageError(f"{what}: {answer.message}")
    return answer


def probe(path: str, timeout: float = 2.0, agent: str | None = None) -> bool:
    """True if a conductor answers on `path` within `timeout` seconds (with `agent`:
    and says that agent is connected, or that the run is over)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            protocol.send(sock, protocol.Probe(agent=agent))
            answer = protocol.recv(sock)
            return isinstance(answer, protocol.Stop) or (
                isinstance(answer, protocol.Ready) and answer.connected)
    except (OSError, protocol.Closed):
        return False
