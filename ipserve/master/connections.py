"""The master's end of the control socket: accepting, reading, writing.

Nothing a peer does here can stall the master or grow without bound: sockets
are non-blocking, replies wait in a bounded outbox until the peer reads them,
lines are bounded (control.MAX_LINE), descriptors are bounded per message,
connections are bounded in number and in how long they may stay silent
before saying who they are. Who the peer is comes from the kernel,
read once at accept: SO_PEERCRED (pid, uid, gid), the process's start time
(with the pid, an identity nobody can take over), and where the kernel has it
(Linux 6.5+) a pidfd of the very process that connected (SO_PEERPIDFD).

Admission is by who connects, so no one can crowd out anyone else: admins
(root, the master's uid) have their own allowance, each known worker pid
its own, and any other uid a small one (they are refused once they speak).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
from typing import Callable

from ipserve import control
from ipserve.master.events import Event

MAX_OUTBOX = 4 << 20          # a status of 1024 workers is ~0.5 MiB
IDENTIFY_WITHIN = 5.0         # a connection that has said nothing by then is closed
ACCEPT_PAUSE = 1.0            # out of descriptors: stop accepting this long
ADMIN_CONNECTIONS = 64        # ipservectl, dashboards, a master taking over
WORKER_CONNECTIONS = 4        # a worker uses one (and one to report a failed boot)
STRANGER_CONNECTIONS = 8      # per uid, for everybody else
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)   # <asm-generic/socket.h>, Linux 6.5


def admission_key(peer: control.Peer, is_admin: Callable[[int], bool],
                  is_worker: Callable[[int], bool]) -> tuple[tuple, int]:
    """Whose allowance a connection counts against, and its size."""
    if is_admin(peer.uid):
        return ("admin",), ADMIN_CONNECTIONS
    if is_worker(peer.pid):
        return ("worker", peer.pid), WORKER_CONNECTIONS
    return ("uid", peer.uid), STRANGER_CONNECTIONS


def peer_pidfd(sock: socket.socket) -> int | None:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError:
        return None   # an older kernel: the start time read at accept stands alone


def pidfd_pid(pidfd: int) -> int | None:
    """The pid a pidfd refers to; None once that process has exited."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as fh:
            for line in fh:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError):
        pass
    return None


class Connection:
    """One accepted control connection: a worker, or an ipservectl request."""

    def __init__(self, sock: socket.socket, peer: control.Peer, now: float,
                 peer_start: int | None = None, peer_pidfd: int | None = None,
                 key: tuple = ()):
        self.sock = sock
        self.peer = peer
        self.peer_start = peer_start     # the peer's start time, read at accept
        self.peer_pidfd = peer_pidfd     # the very process that connected, if the kernel says
        self.key = key                   # whose allowance it counts against
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

    def peer_is(self, pid: int, start: int) -> bool:
        """The process that connected is `pid` started at `start`, and still
        runs: not a process that took over its pid, nor a child it left the
        connection to."""
        if self.peer.pid != pid or self.peer_start != start:
            return False
        return self.peer_pidfd is None or pidfd_pid(self.peer_pidfd) == pid

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
                 is_admin: Callable[[int], bool], is_worker: Callable[[int], bool],
                 start_time: Callable[[int], int | None]):
        self.path = path
        self.selector = selector
        self.log = log
        self.clock = clock
        self.is_admin = is_admin
        self.is_worker = is_worker
        self.start_time = start_time
        self.listener: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.open_by_key: dict[tuple, int] = {}
        self.paused_until = 0.0
        self.on_messages: Callable = lambda conn, messages: None
        self.on_closed: Callable = lambda conn: None
        self._warned: set[tuple] = set()

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
        self.selector.register(sock, selectors.EVENT_READ, (Event.ACCEPT, None))

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
            self.admit(sock)

    def admit(self, sock: socket.socket) -> None:
        try:
            peer = control.peer_of(sock)
        except OSError:
            sock.close()
            return
        key, allowance = admission_key(peer, self.is_admin, self.is_worker)
        # A worker is known by its pid and start time. An admin is known by
        # its uid alone: it may even be outside our pid namespace (pid 0 here,
        # when the master is a container's init).
        start = self.start_time(peer.pid) if peer.pid > 0 else None
        if start is None and key[0] != "admin":
            sock.close()           # gone already: whatever it left behind is nobody
            return
        if self.open_by_key.get(key, 0) >= allowance:
            if key not in self._warned:
                self.log.warning("control socket: %d connections of %s open, refusing more",
                                 allowance, " ".join(map(str, key)))
                self._warned.add(key)
            sock.close()
            return
        self._warned.discard(key)
        sock.setblocking(False)
        conn = Connection(sock, peer, self.clock(), peer_start=start,
                          peer_pidfd=peer_pidfd(sock), key=key)
        self.open_by_key[key] = self.open_by_key.get(key, 0) + 1
        self.connections.add(conn)
        self.selector.register(sock, selectors.EVENT_READ, (Event.CONNECTION, conn))

    def pause(self) -> None:
        if self.paused_until:
            return
        self.paused_until = self.clock() + ACCEPT_PAUSE
        self.selector.unregister(self.listener)

    def resume_if_due(self) -> None:
        if self.paused_until and self.clock() >= self.paused_until:
            self.paused_until = 0.0
            self.selector.register(self.listener, selectors.EVENT_READ, (Event.ACCEPT, None))

    # ------------------------------------------------------------ reading
    def read(self, conn: Connection) -> bool:
        """Read and handle what arrived; False when nothing was waiting."""
        try:
            data, fds, _, _ = socket.recv_fds(conn.sock, 65536, control.MAX_FDS)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data, fds = b"", []
        conn.fds.extend(fds)
        if not data:
            self.close(conn)
            return True
        try:
            messages = conn.reader.feed(data)
        except control.FramingError as exc:
            self.log.warning("control: closing the connection of pid %d (uid %d): %s",
                             conn.peer.pid, conn.peer.uid, exc)
            self.close(conn)
            return True
        if messages:
            self.on_messages(conn, messages)
        return True

    def read_last_words(self, conn: Connection, reads: int = 16) -> None:
        """What a peer that has exited sent just before: a worker's last
        heartbeat and leak report may still wait unread when its exit is
        handled first."""
        for _ in range(reads):
            if conn.closed or not self.read(conn):
                return

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
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
        try:
            self.selector.modify(conn.sock, events, (Event.CONNECTION, conn))
        except (KeyError, ValueError):
            pass

    # ------------------------------------------------------------ ending
    def close(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.discard(conn)
        if conn.key in self.open_by_key:
            self.open_by_key[conn.key] -= 1
            if not self.open_by_key[conn.key]:
                del self.open_by_key[conn.key]
        if conn.peer_pidfd is not None:
            os.close(conn.peer_pidfd)
            conn.peer_pidfd = None
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
