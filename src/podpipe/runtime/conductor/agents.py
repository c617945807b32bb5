"""The agents' connections: who is connected as which node, what they say, what we tell them.

The conductor listens on a Unix socket in RAM scratch. A connection becomes an
agent's once it says `Hello` for a node's worker the run has (and that is not
connected already; an agent is named by `protocol.agent_name`); others (`podpipe swap`, a startup probe) stay anonymous. Only the run's
own user can connect: the socket is 0600 in a 0700 directory, and each peer's uid
is checked (SO_PEERCRED) before anything it says is read. Sockets are
never read blocking: `_drain` may have read what made one ready earlier in the
same round of events. `to_event` turns what an agent said into the engine's
event, a pure function.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Callable

from podpipe.engine import events as ev
from podpipe.errors import InputError, SpecError
from podpipe.runtime.plumbing import logline, protocol
from podpipe.runtime.rundir import status
from podpipe.runtime.plumbing.loop import EventLoop

LISTEN = "listen"


@dataclass(eq=False)
class Conn:
    sock: socket.socket
    reader: protocol.Reader = field(default_factory=protocol.Reader)
    node: str | None = None


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    uid: int = struct.unpack("3i", creds)[1]
    return uid


def to_event(name: str, message: protocol.Message, spec_file: str) -> ev.Event | None:
    """The engine's event for what the agent `name` (a node's worker) said; None if it
    is not one."""
    node, worker = protocol.split_name(name)
    if isinstance(message, protocol.Reserve):
        return ev.SpaceRequested(node, message.batch, message.nbytes, worker)
    if isinstance(message, protocol.Done):
        stats = message.stats
        return ev.TaskDone(node, message.batch, message.output, worker,
                           tuple(message.pinned), stats.busy, stats.wanted)
    if isinstance(message, protocol.Failed):
        return ev.TaskFailed(node, message.batch, message.message, message.input_error,
                             message.traceback, worker)
    if isinstance(message, protocol.Broken):
        error = (SpecError(message.message, file=spec_file, field=message.field)
                 if message.field else InputError(message.message))
        return ev.AgentBroken(node, message.message, error, worker)
    return None


class Agents:
    def __init__(self, loop: EventLoop, listener: socket.socket,
                 log: logline.Log = lambda message, level="info": None) -> None:
        """`listener`: the conductor's socket, listening (`protocol.listen`) since
        before the run was planned (an agent may connect early); taken from `listen`."""
        self._loop, self._listener, self._log = loop, listener, log
        self._by_node: dict[str, Conn] = {}
        self._all: set[Conn] = set()   # every open connection, to close at the end
        self.pids: dict[str, int] = {}  # as each agent said in its hello
        self._auto: dict[str, Conn] = {}  # node -> its auto container (`Supervising`)

    def listen(self) -> None:
        """Take connections from now on."""
        self._listener.setblocking(False)
        self._loop.watch(self._listener, LISTEN)

    def read(self, tag: object) -> list[tuple[Conn, protocol.Message | None]]:
        """Accept a connection (`tag` is LISTEN) or read one (`tag` is its Conn):
        the messages read, and (conn, None) for a connection that closed."""
        if tag == LISTEN:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:  # taken already (by a drain, in the same round)
                return []
            uid = peer_uid(sock)
            if uid != os.geteuid():  # only the run's own user may drive it
                self._log(f"refused a connection from uid {uid}: not the run's user",
                          "warning")
                sock.close()
                return []
            conn = Conn(sock)
            self._all.add(conn)
            self._loop.watch(sock, conn)
            return []
        assert isinstance(tag, Conn)
        conn = tag
        if conn.sock.fileno() < 0:
            return []  # closed earlier in this round of events (its process exited)
        try:
            data = conn.sock.recv(1 << 16, socket.MSG_DONTWAIT)
            messages = conn.reader.feed(data) if data else []
        except BlockingIOError:
            return []
        except (OSError, protocol.Closed):
            data, messages = b"", []
        said: list[tuple[Conn, protocol.Message | None]] = []
        for message in messages:
            if isinstance(message, protocol.Supervising):  # an auto container: what it
                self._auto[message.node] = conn  # is asked is ours to say (`fork`)
            else:
                said.append((conn, message))
        if not data:
            self._close(conn)
            said.append((conn, None))
        return said

    def hello(self, conn: Conn, message: protocol.Hello, *, expected: bool = True) -> bool:
        """Take `conn` as the agent of `message.node`'s worker; False if it cannot be
        (not `expected`, already connected, of another protocol): it is closed."""
        name = protocol.agent_name(message.node, message.worker)
        if not expected or name in self._by_node or message.protocol != protocol.PROTOCOL:
            self._close(conn)
            return False
        conn.node = name
        self._by_node[name] = conn
        self.pids[name] = message.pid
        return True

    def stale(self, name: str) -> Conn | None:
        """`name`'s connection if its other end has closed and that is not yet read (a
        container restarted in place may say hello on a new connection first)."""
        conn = self._by_node.get(name)
        try:
            gone = conn is not None and conn.sock.recv(1, socket.MSG_PEEK |
                                                       socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return None  # open, nothing to read
        except OSError:
            gone = True
        return conn if gone else None

    def node_of(self, conn: Conn) -> str | None:
        """The node `conn` is the current agent of, else None (not an agent, or one
        replaced by a swap)."""
        node = conn.node
        return node if node is not None and self._by_node.get(node) is conn else None

    def infos(self, pod: str) -> list[status.ProcessInfo]:
        """Each agent that said hello, as the status lists it (containers: their pids
        are in their own namespaces; alive while connected)."""
        return [status.ProcessInfo("stage", protocol.split_name(name)[0], pid, pod,
                                   container=protocol.split_name(name)[0],
                                   alive=self.connected(name),
                                   worker=protocol.split_name(name)[1])
                for name, pid in self.pids.items()]

    def connected(self, node: str) -> bool:
        return node in self._by_node

    def answer_probe(self, conn: Conn, probe: protocol.Probe) -> None:
        """A probe: the conductor is up, and is the agent it names (if any) connected?"""
        self.answer(conn, protocol.Ready(probe.agent is None or self.connected(probe.agent)))

    def nodes(self) -> list[str]:
        return list(self._by_node)

    def forget(self, conn: Conn) -> str | None:
        """A closed connection: the node it was the agent of, if it still was."""
        node = self.node_of(conn)
        if node is not None:
            del self._by_node[node]
        return node

    def unbind(self, node: str) -> Conn | None:
        """`node`'s agent goes on connected, as no node's until it says hello again (a
        standing line's warm process, told of the next job): what it says meanwhile is
        of the job before and goes unheard."""
        conn = self._by_node.pop(node, None)
        if conn is not None:
            conn.node = None
        return conn

    def drop(self, node: str) -> None:
        """`node`'s agent is no longer its agent (its process went or is going)."""
        conn = self._by_node.pop(node, None)
        if conn is not None:
            self._close(conn)

    def fork(self, node: str, worker: int) -> bool:
        """Have `node`'s auto container start `worker` (its agent will say hello);
        False if no container of it said it could."""
        conn = self._auto.get(node)
        return conn is not None and self.answer(conn, protocol.Fork(worker=worker))

    def shrink(self, node: str, worker: int) -> None:
        """Have `node`'s auto container end `worker`, told to stop, for good."""
        if node in self._auto:
            self.answer(self._auto[node], protocol.Shrink(worker=worker))

    def send(self, node: str, message: protocol.Message) -> bool:
        conn = self._by_node.get(node)
        return conn is not None and self.answer(conn, message)

    def answer(self, conn: Conn, message: protocol.Message) -> bool:
        try:
            protocol.send(conn.sock, message)
            return True
        except OSError:
            return False  # it went away; its exit event, still queued, decides

    def _close(self, conn: Conn) -> None:
        self._all.discard(conn)  # (a standing line takes connections for days)
        for node in [n for n, c in self._auto.items() if c is conn]:
            del self._auto[node]
        if conn.sock.fileno() >= 0:
            self._loop.unwatch(conn.sock)
            conn.sock.close()

    def close(self) -> None:
        for conn in self._all:
            conn.sock.close()
        self._listener.close()
