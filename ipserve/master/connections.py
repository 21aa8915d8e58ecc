"""The master's end of the control socket: accepting, reading, writing.

Nothing a peer does here can stall the master or grow without bound: sockets
are non-blocking, replies wait in a bounded outbox until the peer reads them,
lines are bounded (control.MAX_LINE), descriptors are bounded per message,
connections are bounded in number and in how long they may stay silent
before saying who they are. Who the peer is comes from the kernel
(SO_PEERCRED), read once at accept.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Callable

from ipserve import control

MAX_OUTBOX = 4 << 20          # a status of 1024 workers is ~0.5 MiB
IDENTIFY_WITHIN = 5.0         # a connection that has said nothing by then is closed
ACCEPT_PAUSE = 1.0            # out of descriptors: stop accepting this long


class Connection:
    """One accepted control connection: a worker, or an ipservectl request."""

    def __init__(self, sock: socket.socket, peer: control.Peer, now: float):
        self.sock = sock
        self.peer = peer
        self.opened_at = now
        self.reader = control.LineReader()
        self.outbox = bytearray()
        self.worker = None               # its WorkerRecord once identified
        self.fds: list[int] = []         # descriptors received and not yet claimed
        self.closing = False             # close once the outbox is flushed
        self.closed = False

    @property
    def identified(self) -> bool:
        return self.worker is not None or self.closing

    def send(self, message: dict) -> bool:
        """Queue `message`; False if the connection is gone or the peer has
        stopped reading (then it is closed by the caller's next flush)."""
        if self.closed:
            return False
        if len(self.outbox) > MAX_OUTBOX:
            return False
        self.outbox += control.encode(message)
        return self.flush()

    def flush(self) -> bool:
        while self.outbox:
            try:
                sent = self.sock.send(self.outbox)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del self.outbox[:sent]
        return True

    def send_fds_now(self, message: dict, fds: list[int]) -> bool:
        """A small message with descriptors (SCM_RIGHTS), sent at once."""
        try:
            socket.send_fds(self.sock, [control.encode(message)], fds)
            return True
        except OSError:
            return False

    def release_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class ControlServer:
    """Accepts control connections and reads them for the master.

    `on_messages(conn, messages)` gets every complete message; `on_closed(conn)`
    is called once per connection when it ends (either side)."""

    def __init__(self, path: str, selector, log: logging.Logger, clock: Callable[[], float],
                 max_connections: Callable[[], int]):
        self.path = path
        self.selector = selector
        self.log = log
        self.clock = clock
        self.max_connections = max_connections
        self.listener: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.paused_until = 0.0
        self.on_messages: Callable = lambda conn, messages: None
        self.on_closed: Callable = lambda conn: None
        self._warned_full = False

    def open(self, owner: tuple[int, int] | None) -> None:
        """Bind the socket 0600 (owned by the workers' user when they run as
        another one, so they can connect; the master's uid and root can too).
        The runtime directory has been checked: nobody else can swap the path."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        if owner is not None:
            os.chown(self.path, *owner, follow_symlinks=False)
        sock.listen(1024)
        sock.setblocking(False)
        self.listener = sock
        self.selector.register(sock, 1, ("accept", None))   # EVENT_READ

    # ------------------------------------------------------------ accepting
    def accept(self) -> None:
        for _ in range(64):   # a burst (a takeover: every worker reconnects) in a few turns
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The connection stays queued and the listener readable:
                    # stop polling it for a moment instead of spinning.
                    self.log.warning("control socket: cannot accept (%s); pausing %.0fs",
                                     exc.strerror, ACCEPT_PAUSE)
                    self.pause()
                return
            if len(self.connections) >= self.max_connections():
                if not self._warned_full:
                    self.log.warning("control socket: %d connections open, refusing more",
                                     len(self.connections))
                    self._warned_full = True
                sock.close()
                continue
            self._warned_full = False
            sock.setblocking(False)
            try:
                peer = control.peer_of(sock)
            except OSError:
                sock.close()
                continue
            conn = Connection(sock, peer, self.clock())
            self.connections.add(conn)
            self.selector.register(sock, 1, ("conn", conn))

    def pause(self) -> None:
        if self.paused_until:
            return
        self.paused_until = self.clock() + ACCEPT_PAUSE
        self.selector.unregister(self.listener)

    def resume_if_due(self) -> None:
        if self.paused_until and self.clock() >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.listener, 1, ("accept", None))

    # ------------------------------------------------------------ reading
    def read(self, conn: Connection) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, 65536, control.MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds = b"", []
        conn.fds.extend(fds)
        if not data:
            self.close(conn)
            return
        try:
            messages = conn.reader.feed(data)
        except control.FramingError as exc:
            self.log.warning("control: closing the connection of pid %d (uid %d): %s",
                             conn.peer.pid, conn.peer.uid, exc)
            self.close(conn)
            return
        if messages:
            self.on_messages(conn, messages)

    def writable(self, conn: Connection) -> None:
        if not conn.flush():
            self.close(conn)
            return
        self._watch(conn)

    def after_send(self, conn: Connection) -> None:
        """Watch for writability while something waits in the outbox; close a
        connection whose peer stopped reading, or one that was answered."""
        if conn.closed:
            return
        if len(conn.outbox) > MAX_OUTBOX:
            self.log.warning("control: pid %d stopped reading; closing its connection", conn.peer.pid)
            self.close(conn)
            return
        self._watch(conn)

    def _watch(self, conn: Connection) -> None:
        if conn.closing and not conn.outbox:
            self.close(conn)
            return
        events = 1 | (2 if conn.outbox else 0)   # EVENT_READ | EVENT_WRITE
        try:
            self.selector.modify(conn.sock, events, ("conn", conn))
        except (KeyError, ValueError):
            pass

    # ------------------------------------------------------------ ending
    def close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.discard(conn)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.release_fds()
        self.on_closed(conn)

    def close_silent(self, now: float) -> None:
        """Connections that never said who they are within IDENTIFY_WITHIN."""
        for conn in list(self.connections):
            if not conn.identified and now - conn.opened_at > IDENTIFY_WITHIN:
                self.log.warning("control: pid %d (uid %d) said nothing in %.0fs; closing",
                                 conn.peer.pid, conn.peer.uid, IDENTIFY_WITHIN)
                self.close(conn)

    def shutdown(self) -> None:
        for conn in list(self.connections):
            conn.flush()
            self.close(conn)
        if self.listener is not None:
            if not self.paused_until:
                try:
                    self.selector.unregister(self.listener)
                except (KeyError, ValueError):
                    pass
            self.listener.close()
            self.listener = None
