"""The master's read-only admin endpoint (admin_bind): the dashboard (/),
/status.json, /series.json and Prometheus' /metrics.

It runs in daemon threads of the master process and never calls into the
master: the loop hands it a snapshot about once a second (`publish`) and it
serves only that. Nothing is shared with the loop but one attribute the loop
replaces, so an admin client, however slow or hostile, cannot hold up
signals, heartbeats or routing. What one client can take is bounded: one
request per connection, MAX_CONNECTIONS at once (more are closed as soon as
they are accepted), HEAD_WITHIN seconds in all for the request head (a
client trickling bytes does not extend it), MAX_HEAD bytes of head, and
SEND_WITHIN seconds to take the answer. Bodies are made once per snapshot:
a flood of /metrics renders nothing more.

The request parsing and the routing decision are pure functions, apart from
the sockets and threads below them.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hmac
import importlib.resources
import ipaddress
import json
import logging
import os
import re
import selectors
import socket
import stat
import threading
import time
from http import HTTPStatus

import psutil

from ipserve import metrics
from ipserve.config import Bind, UnixAddress
from ipserve.errors import UsageError
from ipserve.routing.reuseport import explain

MAX_CONNECTIONS = 64       # admin connections served at once; more are closed at accept
HEAD_WITHIN = 5.0          # seconds from accept to the end of the request head, in all
SEND_WITHIN = 10.0         # seconds to take the whole answer
LINGER = 1.0               # after answering: how long unread input is drained before closing
MAX_HEAD = 8192            # bytes of request line and header fields, CRLFs included
CLOSE_JOIN = 1.0           # close() waits this long for the accepting thread
ACCEPT_PAUSE = 1.0         # out of descriptors: stop accepting this long
BACKLOG = 128

PLACEHOLDER = (b"<!doctype html><meta charset=utf-8><title>ipserve</title>"
               b"<p>The dashboard is not installed; see <a href=/status.json>/status.json</a> "
               b"and <a href=/metrics>/metrics</a>.</p>\n")


# ================================================================ requests (pure)

class Route(enum.Enum):
    DASHBOARD = "/"
    STATUS = "/status.json"
    SERIES = "/series.json"
    METRICS = "/metrics"


ROUTES = {route.value: route for route in Route}
READ_METHODS = ("GET", "HEAD")

TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN = re.compile(TCHAR + rb"+")
METHOD_SO_FAR = re.compile(rb"\Z|" + TCHAR + rb"+(?: |\Z)")   # how a request may start
TARGET = re.compile(rb"/[\x21-\x7e]*")               # origin-form only
VERSION = re.compile(rb"HTTP/1\.[01]")
FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
BARE_LF = re.compile(rb"(?<!\r)\n")


class BadRequest(Exception):
    """The client's bytes cannot be a request we answer: 400, or 431 for a head too large."""

    def __init__(self, status: HTTPStatus, why: str):
        super().__init__(why)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, tuple[str, ...]]     # lower-case name -> every value, in order

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]


def head_length(buffer: bytes) -> int | None:
    """The length of the request head at the start of `buffer`, CRLFCRLF
    included; None if more must come. Raises BadRequest as soon as the bytes
    so far cannot start a request (a TLS hello, a bare LF) or the head is too
    large, without waiting for the rest."""
    if not METHOD_SO_FAR.match(buffer):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "not an HTTP request")
    end = buffer.find(b"\r\n\r\n")
    scan = buffer if end < 0 else buffer[:end + 4]
    if BARE_LF.search(scan):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "a line ends in a bare LF")
    length = None if end < 0 else end + 4
    if (length or len(buffer)) > MAX_HEAD:
        raise BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
    return length


def parse_head(head: bytes) -> Request:
    """A complete head (as head_length() delimits it), strictly: one request
    line `METHOD SP /target SP HTTP/1.x`, then `Name: value` fields; no
    obs-fold, no whitespace before a colon, no control characters."""
    if not head.endswith(b"\r\n\r\n"):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "incomplete head")
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "stray CR or LF")
    parts = lines[0].split(b" ")
    if (len(parts) != 3 or not TOKEN.fullmatch(parts[0]) or not TARGET.fullmatch(parts[1])
            or not VERSION.fullmatch(parts[2])):
        raise BadRequest(HTTPStatus.BAD_REQUEST, "bad request line")
    headers: dict[str, tuple[str, ...]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.fullmatch(name):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "bad header field")
        value = value.strip(b" \t")
        if not FIELD_VALUE.fullmatch(value):
            raise BadRequest(HTTPStatus.BAD_REQUEST, "control character in a header field")
        key = name.decode("ascii").lower()
        headers[key] = headers.get(key, ()) + (value.decode("latin-1"),)
    return Request(parts[0].decode("ascii"), parts[1].decode("ascii"), headers)


def authorized(request: Request, token: str | None) -> bool:
    """No token set, or exactly one `Authorization: Bearer <token>`,
    compared in constant time."""
    if token is None:
        return True
    values = request.headers.get("authorization", ())
    if len(values) != 1:
        return False
    scheme, _, credentials = values[0].partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(credentials.strip(" ").encode("latin-1"), token.encode("ascii"))


@dataclasses.dataclass(frozen=True)
class Answer:
    status: HTTPStatus
    route: Route | None = None     # what to serve, when the status is 200
    head_only: bool = False


# Served without the token: the dashboard page holds no data (it fetches the
# documents with the token, taken from its ?token= address), and a browser
# cannot add an Authorization header to the address it is asked to open.
OPEN_ROUTES = frozenset({Route.DASHBOARD})


def decide(request: Request, token: str | None) -> Answer:
    """Who may ask comes first: without the token, every request but for the
    page itself is 401, whatever it asks for (nothing tells what exists)."""
    head_only = request.method == "HEAD"
    route = ROUTES.get(request.path)
    is_open = route in OPEN_ROUTES and request.method in READ_METHODS
    if not (is_open or authorized(request, token)):
        return Answer(HTTPStatus.UNAUTHORIZED, head_only=head_only)
    if request.method not in READ_METHODS:
        return Answer(HTTPStatus.METHOD_NOT_ALLOWED)
    if route is None:
        return Answer(HTTPStatus.NOT_FOUND, head_only=head_only)
    return Answer(HTTPStatus.OK, route, head_only)


EXTRA_HEADERS = {
    HTTPStatus.UNAUTHORIZED: [("WWW-Authenticate", 'Bearer realm="ipserve"')],
    HTTPStatus.METHOD_NOT_ALLOWED: [("Allow", "GET, HEAD")],
    HTTPStatus.SERVICE_UNAVAILABLE: [("Retry-After", "1")],
}


def response(status: HTTPStatus, body: bytes, content_type: str, head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 response; every one closes its connection and is never cached."""
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
               ("Connection", "close"), *EXTRA_HEADERS.get(status, [])]
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
    return head.encode("latin-1") + (b"" if head_only else body)


def error_response(status: HTTPStatus, head_only: bool = False) -> bytes:
    return response(status, f"{status.value} {status.phrase}\n".encode(),
                    "text/plain; charset=utf-8", head_only)


# ================================================================ what is served

class Snapshot:
    """What the loop published once, as the bytes served. The status is
    serialized at once, on the loop's thread, so that the admin threads never
    read an object the loop may change; the series (new lists of numbers
    nothing else holds) and the metrics are made on the first request that
    wants them, on an admin thread, and kept."""

    def __init__(self, status: dict, series: dict):
        self.status_json = json.dumps(status, default=str).encode()
        self._series = series
        self._lock = threading.Lock()
        self._series_json: bytes | None = None
        self._metrics: bytes | None = None

    def series_json(self) -> bytes:
        with self._lock:
            if self._series_json is None:
                self._series_json = json.dumps(self._series, default=str).encode()
                self._series = None
            return self._series_json

    def metrics(self) -> bytes:
        with self._lock:
            if self._metrics is None:
                self._metrics = metrics.render(json.loads(self.status_json))
            return self._metrics


def body_for(route: Route, snapshot: Snapshot | None, dashboard: bytes) -> tuple[bytes, str] | None:
    """The body and content type of a route; None until a first snapshot (503)."""
    if route is Route.DASHBOARD:
        return dashboard, "text/html; charset=utf-8"
    if snapshot is None:
        return None
    if route is Route.STATUS:
        return snapshot.status_json, "application/json"
    if route is Route.SERIES:
        return snapshot.series_json(), "application/json"
    return snapshot.metrics(), metrics.CONTENT_TYPE


def load_dashboard() -> bytes:
    """ipserve/dashboard.html, read once at start; a placeholder page if it is missing."""
    try:
        return importlib.resources.files("ipserve").joinpath("dashboard.html").read_bytes()
    except OSError:
        return PLACEHOLDER


# ================================================================ the listening socket

class BindError(UsageError):
    def __init__(self, message: str, in_use: bool = False):
        super().__init__(message)
        self.in_use = in_use


@dataclasses.dataclass(eq=False)
class Listener:
    """The bound, listening admin socket, and for unix:/path the file we made
    (removed at close only if it is still that file)."""
    sock: socket.socket
    address: Bind | UnixAddress
    inode: int | None = None

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.inode is not None:
            try:
                st = os.lstat(self.address.path)
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
                    os.unlink(self.address.path)
            except OSError:
                pass
        self.sock.close()


def open_listener(address: Bind | UnixAddress) -> Listener:
    """Bind and listen on admin_bind. Raises BindError (one line) when the
    address is in use or cannot be had; `in_use` tells the first apart."""
    if isinstance(address, UnixAddress):
        return open_unix(address)
    sock = socket.socket(address.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # A successor binds while connections of ours may linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"admin_bind: {explain(exc, address)}",
                        in_use=exc.errno == errno.EADDRINUSE) from None
    return Listener(sock, address)


def open_unix(address: UnixAddress) -> Listener:
    """A unix socket created 0600. A file already there is removed only if it
    is a socket of ours that nobody listens on (left by a master that died)."""
    path = address.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise BindError(f"admin_bind {address}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise BindError(f"admin_bind {address}: {path} exists and is not a socket of uid "
                            f"{os.geteuid()}; remove it or choose another path")
        if unix_listening(path):
            raise BindError(f"admin_bind {address} is already in use (a program listens on "
                            f"it): stop it or choose another path", in_use=True)
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise BindError(f"admin_bind {address}: {exc.strerror}",
                        in_use=exc.errno == errno.EADDRINUSE) from None
    finally:
        os.umask(old_umask)
    return Listener(sock, address, os.lstat(path).st_ino)


def unix_listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(path)
        return True
    except BlockingIOError:
        return True            # listening, its queue full
    except OSError:
        return False           # ECONNREFUSED: nobody listens
    finally:
        probe.close()


def held_by(pid: int, address: Bind | UnixAddress) -> bool:
    """Process `pid` listens on `address` (or on one that conflicts with it)."""
    try:
        process = psutil.Process(pid)
        connections = getattr(process, "net_connections", None) or process.connections  # < 6.0
        if isinstance(address, UnixAddress):
            return any(c.laddr == address.path for c in connections(kind="unix"))
        wanted = ipaddress.ip_address(address.host)
        for c in connections(kind="tcp"):
            if c.status != psutil.CONN_LISTEN or not c.laddr or c.laddr.port != address.port:
                continue
            held = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            if held.version == wanted.version and (held == wanted or held.is_unspecified
                                                   or wanted.is_unspecified):
                return True
    except (psutil.Error, OSError, ValueError):
        pass
    return False


# ================================================================ the server

class AdminServer:
    def __init__(self, listener: Listener, token: str | None, dashboard: bytes,
                 log: logging.Logger):
        self.listener = listener
        self.token = token
        self.dashboard = dashboard
        self.log = log
        self.snapshot: Snapshot | None = None
        self.active: set[socket.socket] = set()
        self.lock = threading.Lock()          # guards `active`; never taken by the loop
        self.stopping = threading.Event()
        self.wake_r, self.wake_w = socket.socketpair()
        self.acceptor: threading.Thread | None = None
        self.last_warning = -1e9

    # ------------------------------------------------------------ the loop's side
    def publish(self, status: dict, series: dict) -> None:
        """Called by the loop: one attribute replaced, no lock."""
        self.snapshot = Snapshot(status, series)

    def start(self) -> None:
        self.listener.sock.setblocking(False)
        self.acceptor = threading.Thread(target=self.accept_loop, name="ipserve-admin",
                                         daemon=True)
        self.acceptor.start()
        self.log.info("admin endpoint on %s%s", self.listener.address,
                      "" if self.token is None else " (bearer token required)")

    def close(self) -> None:
        """Stop accepting, close the listening socket (a successor may bind
        it once we release the instance lock) and cut what is in progress."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass
        if self.acceptor is not None:
            self.acceptor.join(CLOSE_JOIN)
        if self.acceptor is None or not self.acceptor.is_alive():
            self.wake_r.close()
            self.wake_w.close()
        self.listener.close()
        with self.lock:
            active = list(self.active)
        for conn in active:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------ accepting
    def accept_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener.sock, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                selector.select()
                while not self.stopping.is_set():
                    try:
                        conn, _ = self.listener.sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:
                        if self.stopping.is_set():
                            return
                        self.warn(f"admin endpoint: cannot accept ({exc.strerror}); pausing "
                                  f"{ACCEPT_PAUSE:.0f}s")
                        self.stopping.wait(ACCEPT_PAUSE)
                        break
                    self.admit(conn)
        finally:
            selector.close()

    def admit(self, conn: socket.socket) -> None:
        with self.lock:
            full = len(self.active) >= MAX_CONNECTIONS
            if not full:
                self.active.add(conn)
        if full:
            conn.close()
            self.warn(f"admin endpoint: {MAX_CONNECTIONS} connections open, closing new ones")
            return
        try:
            threading.Thread(target=self.serve, args=(conn,), name="ipserve-admin-conn",
                             daemon=True).start()
        except RuntimeError:     # no thread can be started: drop it
            self.forget(conn)
            conn.close()

    def forget(self, conn: socket.socket) -> None:
        with self.lock:
            self.active.discard(conn)

    def warn(self, message: str, exc_info: bool = False) -> None:
        """At most one warning a minute: a hostile client must not flood the log."""
        now = time.monotonic()
        if now - self.last_warning >= 60.0:
            self.last_warning = now
            self.log.warning("%s", message, exc_info=exc_info)

    # ------------------------------------------------------------ one connection
    def serve(self, conn: socket.socket) -> None:
        try:
            answer = self.answer(conn, time.monotonic() + HEAD_WITHIN)
            if answer is not None:
                send_within(conn, answer, time.monotonic() + SEND_WITHIN)
                linger(conn, time.monotonic() + LINGER)
        except OSError:
            pass
        except Exception:    # noqa: BLE001 - a bug here must not reach the master
            self.warn("admin endpoint: unexpected error", exc_info=True)
        finally:
            self.forget(conn)
            conn.close()

    def answer(self, conn: socket.socket, deadline: float) -> bytes | None:
        """The response to the request on `conn`; None if the client left."""
        buffer = b""
        try:
            while (length := head_length(buffer)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return error_response(HTTPStatus.REQUEST_TIMEOUT)
                conn.settimeout(left)
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    return error_response(HTTPStatus.REQUEST_TIMEOUT)
                if not chunk:
                    return None
                buffer += chunk
            request = parse_head(buffer[:length])
        except BadRequest as exc:
            return error_response(exc.status)
        decision = decide(request, self.token)
        if decision.status is not HTTPStatus.OK:
            return error_response(decision.status, decision.head_only)
        served = body_for(decision.route, self.snapshot, self.dashboard)
        if served is None:
            return error_response(HTTPStatus.SERVICE_UNAVAILABLE, decision.head_only)
        body, content_type = served
        return response(HTTPStatus.OK, body, content_type, decision.head_only)


def send_within(conn: socket.socket, data: bytes, deadline: float) -> None:
    """Send everything by `deadline` (in all, not per send), else give up."""
    view = memoryview(data)
    while view:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        conn.settimeout(left)
        try:
            sent = conn.send(view)
        except TimeoutError:
            return
        view = view[sent:]


def linger(conn: socket.socket, deadline: float) -> None:
    """Half-close, then read what the client still sends for a moment: closing
    with unread input would reset the connection and could destroy the answer
    before the client reads it (a 431 to a client still sending)."""
    conn.shutdown(socket.SHUT_WR)
    drained = 0
    while drained < 65536:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            return
        if not chunk:
            return
        drained += len(chunk)
