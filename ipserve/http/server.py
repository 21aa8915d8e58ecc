"""A worker's HTTP server: accepts connections on its listening sockets,
at most worker_connections at a time, and ends those whose deadline passed."""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import sys

import gevent
from gevent.event import Event

from ipserve import accesslog
from ipserve.histogram import REQUEST_BOUNDS, RESPONSE_CLASSES, Histogram, response_class
from ipserve.http.clientlog import ClientErrorLog
from ipserve.http.connection import Connection
from ipserve.http.limits import Limits
from ipserve.http.response import FileWrapper

SWEEP_INTERVAL = 0.5
# accept() failing for want of descriptors or memory: the connection stays in
# the kernel's queue; retry when one of ours closes, or after this long.
OUT_OF_FDS_RETRY = 1.0
# A shortage (descriptors, worker_connections) is warned about once per this.
SHORTAGE_WARNING_INTERVAL = 60.0
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_RETRY = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN)


def base_environ(listener: socket.socket, public: dict[int, tuple[str, int]], extra: dict,
                 tls: bool = False) -> dict:
    """The environ keys that are the same for every request on `listener`.
    SERVER_NAME and SERVER_PORT are the public address of its family, not the
    worker's own port, which NAT routing hides from clients."""
    address = listener.getsockname()
    if listener.family in public:
        host, port = public[listener.family]
    elif isinstance(address, tuple):
        host, port = address[0], address[1]
    else:
        host, port = address, ""
    return {
        "SCRIPT_NAME": "", "SERVER_NAME": host, "SERVER_PORT": str(port),
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "wsgi.input_terminated": True, "wsgi.file_wrapper": FileWrapper,
        **({"wsgi.url_scheme": "https", "HTTPS": "on"} if tls else {}), **extra,
    }


class Server:
    def __init__(self, listeners: list[socket.socket], app, *, limits: Limits, lag,
                 log: logging.Logger, access_log: logging.Logger | None = None,
                 environ: dict | None = None, public: dict[int, tuple[str, int]] | None = None,
                 tls: ssl.SSLContext | None = None):
        self.listeners = listeners
        self.app = app
        self.limits = limits
        self.lag = lag
        self.log = log
        self.access_log = access_log
        self.environ = environ or {}
        self.public = public or {}      # family -> the (host, port) clients connect to
        # With a context, every connection is TLS: its greenlet does the
        # handshake (Connection.serve), never the accept loop.
        self.tls = tls
        self.clock = gevent.get_hub().loop.now     # libev's cached monotonic time
        self.client_errors = ClientErrorLog(log, self.clock)
        self.open: set[Connection] = set()
        self.websockets: set = set()
        self.requests = 0
        self.shed = 0
        self.responses = [0] * len(RESPONSE_CLASSES)    # by status class, for /metrics
        self.durations = Histogram(REQUEST_BOUNDS)      # plain requests, not WebSockets
        self.retiring = False
        self._room = Event()          # set while below worker_connections
        self._room.set()
        self._closed_one = Event()    # set whenever a connection closes
        self._accepters: list[gevent.Greenlet] = []
        self._warned: dict[str, float] = {}  # shortage -> when last warned

    @property
    def connections(self) -> int:
        return len(self.open)

    def start(self) -> None:
        for listener in self.listeners:
            self._accepters.append(gevent.spawn(self._accept_loop, listener,
                                                base_environ(listener, self.public, self.environ,
                                                             self.tls is not None)))
        gevent.spawn(self._sweep_loop)

    def close(self) -> None:
        """Stop accepting and close our listening sockets (the master keeps its copies)."""
        for accepter in self._accepters:
            accepter.kill(block=False)
        self._accepters = []
        for listener in self.listeners:
            listener.close()

    def retire(self) -> None:
        """Keep-alive clients are sent elsewhere: each gets Connection: close
        with its next response. Idle ones are not closed early: a request may
        be on its way, and closing under it would fail it (they end at
        `keepalive`)."""
        self.retiring = True

    def forget(self, connection: Connection) -> None:
        self.open.discard(connection)
        self._closed_one.set()
        if len(self.open) < self.limits.connections:
            self._room.set()

    # ------------------------------------------------------------ accepting
    def _accept_loop(self, listener: socket.socket, environ: dict) -> None:
        limit = self.limits.connections
        accepted = 0
        while True:
            if len(self.open) >= limit:
                self._short("connections", "worker_connections (%d) reached: not accepting until a "
                            "connection closes; new clients wait in the kernel's queue", limit)
                self._room.clear()
                self._room.wait()
                continue
            try:
                sock, address = listener.accept()
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._short("descriptors", "accept failed (%s): not accepting until a connection "
                                "closes; new clients wait in the kernel's queue", exc.strerror)
                    self._closed_one.clear()
                    self._closed_one.wait(OUT_OF_FDS_RETRY)
                    continue
                if exc.errno in _ACCEPT_RETRY:
                    continue
                if listener.fileno() == -1 or exc.errno == errno.EBADF:
                    return          # closed: retiring or stopping
                raise
            if sock.family != socket.AF_UNIX:
                # Without it a keep-alive client waits on Nagle x delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(self, sock, address, environ)
            # Counted from the accept: a draining worker must not exit while
            # a connection it took waits for its greenlet to run.
            self.open.add(connection)
            gevent.spawn_raw(connection.serve)
            accepted += 1
            if accepted % 100 == 0:
                gevent.sleep(0)         # a flood of connections must not starve the held ones

    def _short(self, what: str, message: str, *args) -> None:
        now = self.clock()
        last = self._warned.get(what)
        if last is None or now - last >= SHORTAGE_WARNING_INTERVAL:
            self._warned[what] = now
            self.log.warning(message + " (warned at most once a minute)", *args)

    # ------------------------------------------------------------ deadlines
    def _sweep_loop(self) -> None:
        while True:
            gevent.sleep(SWEEP_INTERVAL)
            self.sweep()

    def sweep(self) -> None:
        """End the waits whose deadline passed (see Connection.expire)."""
        now = self.clock()
        for connection in list(self.open):
            write = connection.write_deadline
            if write is not None and write <= now:
                connection.expire(writing=True)
                continue
            read = connection.read_deadline
            if read is not None and read <= now:
                connection.expire(writing=False)
        self.client_errors.flush()

    # ------------------------------------------------------------ counting
    def count_response(self, status: str) -> None:
        """A response head went out (the application's, or one of ours)."""
        index = response_class(status)
        if index is not None:
            self.responses[index] += 1

    # ------------------------------------------------------------ access log
    def log_access(self, connection: Connection, request, environ: dict, started: float,
                   duration: float) -> None:
        """One access log line (only called with an access log). `started`: unix
        time of the request; `duration`: seconds it took."""
        log = self.access_log
        log.write(accesslog.atoms(
            remote=connection.client, method=request.method.decode("ascii"),
            target=request.target.decode("latin-1"), version=request.version,
            status=connection.status, sent=connection.sent, response_headers=connection.headers,
            environ=environ, started=started, duration=duration, pid=log.pid))
