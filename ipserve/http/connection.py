"""One client connection, from its first byte to its close: requests in,
the application called, responses out (PEP 3333)."""

from __future__ import annotations

import os
import random
import socket
import ssl
import time
from urllib.parse import unquote_to_bytes

import gevent
import httptools
from gevent.socket import socket as GeventSocket
from gevent.socket import wait_write

from ipserve.http import tls
from ipserve.http.body import Input
from ipserve.http.errors import ClientError, ClientGone, error_response
from ipserve.http.parser import Request, RequestParser
from ipserve.http.response import LAST_CHUNK, FileWrapper, Framing, build_head, chunk
from ipserve.http.websocket import (
    WebSocket,
    check_handshake,
    is_upgrade,
    offered_protocols,
)

RECV_SIZE = 65536
# A body the application left unread is read and thrown away if at most this
# much remains; more, and the connection closes instead.
DISCARD_LIMIT = 64 * 1024
# After refusing a request, unread input is drained for up to this long before
# the close, so that the kernel does not answer it with a reset that destroys
# our answer before the client reads it (nginx's lingering close).
LINGER = 2.0

# Requests one connection may be served in a row without the hub running.
FAIR_TURN = 8

# Header name as sent -> environ key ("" for a name we drop); bounded, since
# clients choose the names.
_ENVIRON_KEYS: dict[bytes, str] = {}
_ENVIRON_KEYS_MAX = 1024


def environ_key(name: bytes) -> str:
    text = name.decode("latin-1").upper()
    if "_" in text:
        # X_Forwarded_For would pass for X-Forwarded-For in the environ: dropped,
        # as nginx and gunicorn do.
        return ""
    text = text.replace("-", "_")
    if text in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        return text
    return "HTTP_" + text


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, query) of a request target: origin-form, absolute-form or *."""
    if target[:1] != b"/" and target != b"*":
        try:
            url = httptools.parse_url(target)        # absolute-form (RFC 9112 3.2.2)
        except httptools.HttpParserInvalidURLError:
            raise ClientError(400, "malformed request target") from None
        return url.path or b"/", url.query or b""
    if b"#" in target:
        target = target.partition(b"#")[0]
    path, _, query = target.partition(b"?")
    return path, query


class Connection:
    __slots__ = (
        "server", "sock", "client", "port", "base_environ", "parser", "read_deadline",
        "write_deadline", "timed_out", "unclean", "pending_error", "upgraded",
        "request", "status", "headers", "head_sent", "framing", "length", "sent", "keep_alive",
        "websocket")

    def __init__(self, server, sock: socket.socket, address, base_environ: dict):
        self.server = server
        self.sock = sock
        self.client = address[0] if isinstance(address, tuple) else ""
        self.port = str(address[1]) if isinstance(address, tuple) else ""
        self.base_environ = base_environ
        self.parser = RequestParser(server.limits)
        self.read_deadline = None
        self.write_deadline = None
        self.timed_out = False      # the sweeper shut the socket down: a deadline passed
        self.unclean = False        # closing may leave client bytes unread: linger
        self.pending_error: ClientError | None = None
        self.upgraded: bytes | None = None   # bytes after an upgrade request's head
        self.request: Request | None = None
        self.websocket: WebSocket | None = None
        # The response being sent (reset per request in handle()).
        self.status: str | None = None
        self.headers: list | None = None
        self.head_sent = False
        self.framing = Framing.NONE
        self.length: int | None = None
        self.sent = 0
        self.keep_alive = False

    # ------------------------------------------------------------ the loop
    def serve(self) -> None:
        try:
            # The first request's head (and with TLS the handshake before it)
            # must arrive within header_timeout of the accept.
            timeout = self.server.limits.header_timeout
            deadline = None if timeout is None else self.server.clock() + timeout
            if self.server.tls is not None and not self.handshake(deadline):
                return
            request = self.next_request(deadline, first=True)
            clock = self.server.clock
            turn_began, served_in_turn = clock(), 0
            while request is not None and self.handle(request):
                # A client that always has its next request ready never makes
                # recv() block, and would keep the worker to itself (seconds of
                # p99 for everyone else). The loop's cached time moves only
                # when the hub has run: after FAIR_TURN requests without
                # that, give the others a turn.
                if clock() != turn_began:
                    turn_began, served_in_turn = clock(), 0
                served_in_turn += 1
                if served_in_turn >= FAIR_TURN:
                    gevent.sleep(0)
                    turn_began, served_in_turn = clock(), 0
                request = self.next_request(None, first=False)
        except ClientError as exc:
            self.refuse(exc)
        except OSError:
            pass                    # reset, gone, timed out while sending
        except Exception:
            self.server.log.exception("connection from %s failed", self.client)
        finally:
            self.close()

    def handshake(self, deadline: float | None) -> bool:
        """TLS: wrap the socket and do the handshake here, in this
        connection's greenlet, by `deadline` (the sweeper cuts a client that
        stalls it, as it cuts a slow request head). False: it failed, and was
        logged as a client error."""
        server = self.server
        sock = server.tls.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = sock
        # Both: a handshake waits to read the client's flights and to send ours.
        self.read_deadline = self.write_deadline = deadline
        try:
            sock.do_handshake()
        except OSError as exc:      # ssl.SSLError included
            self.read_deadline = self.write_deadline = None
            kind, detail = tls.handshake_failure(exc, self.timed_out)
            server.client_errors.note(kind, self.client, detail)
            if tls.is_plain_http(exc) and not self.timed_out:
                # OpenSSL sent nothing: answer in plain text, as nginx does,
                # and linger so the client reads it rather than a reset.
                self.unclean = True
                try:
                    GeventSocket.send(sock, error_response(
                        400, body="plain HTTP request sent to the HTTPS port"))
                    server.count_response("400")
                except OSError:
                    pass
            return False
        finally:
            self.read_deadline = self.write_deadline = None
        if server.tls.verify_mode != ssl.CERT_NONE:
            dn = tls.subject_dn(sock.getpeercert())
            if dn is not None:
                self.base_environ = {**self.base_environ, "SSL_CLIENT_S_DN": dn,
                                     "SSL_CLIENT_VERIFY": "SUCCESS"}
        return True

    def next_request(self, head_deadline: float | None, first: bool) -> Request | None:
        """The next request's head, or None if the client is done. A keep-alive
        connection may idle for `keepalive` between requests; a request's head,
        once begun (or the first one, from the accept), must be whole by
        `head_deadline` (header_timeout)."""
        parser = self.parser
        server = self.server
        # Computed once: a client trickling bytes must not extend its own wait.
        idle_deadline = None if first else server.clock() + server.limits.keepalive
        while not parser.ready:
            if self.pending_error is not None:
                raise self.pending_error
            if parser.in_head or first:
                if head_deadline is None and not first and server.limits.header_timeout is not None:
                    head_deadline = server.clock() + server.limits.header_timeout
                deadline = head_deadline
            else:
                deadline = idle_deadline
            data = self.recv(deadline)
            if not data:
                if self.timed_out and (parser.in_head or first):
                    raise ClientError(408, "request head timeout")
                if parser.in_head:
                    raise ClientError(400, "connection closed inside a request head")
                return None
            self.feed(data)
        return parser.ready.popleft()

    def handle(self, request: Request) -> bool:
        """Answer one request; True if the connection can take another."""
        server = self.server
        server.requests += 1
        self.request = request
        self.status = self.headers = None
        self.head_sent = False
        self.sent = 0
        self.keep_alive = False
        started = time.time() if server.access_log is not None else 0.0
        began = time.perf_counter()
        environ = self.make_environ(request)
        websocket = None
        if "HTTP_UPGRADE" in environ and is_upgrade(environ):
            check_handshake(environ)
            websocket = self.websocket = WebSocket(self, environ, self.upgraded or b"")
            environ["wsgi.websocket"] = websocket
            environ["wsgi.websocket_version"] = "13"
        elif request.upgrade and (request.chunked or request.content_length):
            # llhttp hands over every byte after an upgrade request's head as
            # the new protocol's: the body of a plain request sent with an
            # Upgrade we do not take (h2c) would be lost.
            raise ClientError(400, "body on a request with an Upgrade we do not take")
        elif server.limits.shed_load and random.random() < server.lag.shed_probability():
            server.shed += 1
            self.send(error_response(503, "Retry-After: 1\r\n", "worker too busy, retry shortly"))
            server.count_response("503")
            return False
        result = None
        try:
            result = server.app(environ, self.start_response)
            if websocket is None or (self.status is not None and not websocket._open):
                self.send_result(result)
        except ClientError as exc:
            self.refuse(exc)
            return False
        except ClientGone:
            return False
        except Exception:
            server.log.exception("error in the application (%s %s from %s)", environ["REQUEST_METHOD"],
                                 environ["RAW_URI"], self.client)
            if websocket is not None and websocket._open and not websocket.closed:
                websocket.close(1011, b"internal error")
            elif not self.head_sent:
                self.status = "500 Internal Server Error"
                self.send(error_response(500))
                server.count_response("500")
            return False
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    server.log.exception("error closing the application's response")
            if websocket is None:     # a WebSocket's request lasts as long as the socket
                server.durations.observe(time.perf_counter() - began)
            if started:
                server.log_access(self, request, environ, started, time.perf_counter() - began)
        if websocket is not None:
            if websocket._open and not websocket.closed:
                websocket.close()
            return False
        self.request = None
        self.head_sent = False
        return self.keep_alive and self.finish(request)

    # ------------------------------------------------------------ reading
    def recv(self, deadline: float | None) -> bytes:
        self.read_deadline = deadline
        try:
            return self.sock.recv(RECV_SIZE)
        except OSError:
            return b""
        finally:
            self.read_deadline = None

    def feed(self, data: bytes) -> None:
        try:
            upgraded = self.parser.feed(data)
        except ClientError as exc:
            current = self.request
            if (current is not None and not current.complete) or not self.parser.ready:
                raise
            # Requests parsed before the error are answered first; the parser
            # is dead now, so the error surfaces when the next byte is needed
            # (a body read, or the next request).
            self.pending_error = exc
            return
        if upgraded is not None:
            self.upgraded = upgraded

    def read_body(self, request: Request) -> None:
        """More of `request`'s body (wsgi.input calls this)."""
        if self.pending_error is not None:
            raise self.pending_error
        if request.expect_continue:
            request.expect_continue = False
            if not self.head_sent:
                self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        timeout = self.server.limits.body_timeout
        data = self.recv(None if timeout is None else self.server.clock() + timeout)
        if not data:
            self.unclean = True
            if self.timed_out:
                raise ClientError(408, "request body timeout")
            raise ClientError(400, "connection closed inside a request body")
        self.feed(data)

    def finish(self, request: Request) -> bool:
        """Read past what the application left of the body. False: close instead."""
        if not request.complete:
            pending = request.body_pending
            if self.pending_error is not None or (pending is not None and pending > DISCARD_LIMIT):
                self.unclean = True
                return False
            timeout = self.server.limits.body_timeout
            deadline = None if timeout is None else self.server.clock() + timeout
            discarded = 0
            while not request.complete:
                discarded += len(request.body)
                request.body.clear()
                data = self.recv(deadline) if discarded <= DISCARD_LIMIT else b""
                if not data:
                    self.unclean = True
                    return False
                try:
                    self.feed(data)
                except ClientError:
                    self.unclean = True
                    return False
        request.body.clear()
        return True

    def make_environ(self, request: Request) -> dict:
        environ = self.base_environ.copy()
        target = request.target
        path, query = split_target(target)
        environ["REQUEST_METHOD"] = request.method.decode("ascii")
        environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
        environ["QUERY_STRING"] = query.decode("latin-1")
        environ["RAW_URI"] = target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if request.version == "1.1" else "HTTP/1.0"
        environ["REMOTE_ADDR"] = self.client
        environ["REMOTE_PORT"] = self.port
        environ["wsgi.input"] = Input(self, request)
        environ["ipserve.too_busy"] = self.server.lag.too_busy()
        keys = _ENVIRON_KEYS
        for name, value in request.headers:
            key = keys.get(name)
            if key is None:
                key = environ_key(name)
                if len(keys) < _ENVIRON_KEYS_MAX:
                    keys[name] = key
            if not key:
                continue
            value = value.decode("latin-1")
            if key in environ:
                # RFC 6265 5.4: cookies are joined with "; ", other fields with ", ".
                environ[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
            else:
                environ[key] = value
        request.headers = []    # in the environ now; a long-lived connection need not keep both
        return environ

    # ------------------------------------------------------------ writing
    def send(self, data: bytes) -> None:
        """Send all of `data`; a client that stops reading it for body_timeout
        is cut off."""
        self.send_within(data, self.server.limits.body_timeout)

    def send_within(self, data: bytes, timeout: float | None) -> None:
        """Send all of `data`; each step must make progress within `timeout`
        (None: no limit)."""
        sock = self.sock
        try:
            if timeout is None:
                sock.sendall(data)
                return
            clock = self.server.clock
            view = data
            while True:
                self.write_deadline = clock() + timeout
                sent = sock.send(view)
                if sent >= len(view):
                    return
                if type(view) is bytes:
                    view = memoryview(view)
                view = view[sent:]
        except OSError as exc:
            raise ClientGone(f"sending failed: {exc}") from None
        finally:
            self.write_deadline = None

    def start_response(self, status: str, headers: list, exc_info=None):
        websocket = self.websocket
        if websocket is not None and websocket._open:
            # After the 101 nothing else goes out: engine.io, for one, answers
            # its finished WebSocket request with a start_response of its own.
            return _ignore
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called again without exc_info")
        if websocket is not None:
            if status[:3] == "101":
                protocol = next((v for k, v in headers if k.lower() == "sec-websocket-protocol"), None)
                if protocol is not None and protocol not in offered_protocols(websocket.environ):
                    raise ValueError(f"subprotocol {protocol!r} was not offered by the client")
                websocket.accept(protocol)
                return _ignore
            websocket.closed = True     # refused: this response goes out as plain HTTP
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if type(data) is not bytes:
            if not isinstance(data, (bytearray, memoryview)):
                raise TypeError(f"the application wrote {type(data).__name__}, not bytes")
            data = bytes(data)
        if not self.head_sent:
            self.send_head(data, None)
        elif data:
            framed = self.frame(data)
            if framed:
                self.send(framed)

    def send_head(self, body: bytes, body_length: int | None) -> None:
        request = self.request
        server = self.server
        keep_alive = (request.keep_alive and not server.retiring and server.limits.keepalive > 0
                      and self.upgraded is None)
        if keep_alive and not request.complete:
            pending = request.body_pending
            keep_alive = self.pending_error is None and pending is not None and pending <= DISCARD_LIMIT
        head, self.framing, self.length, self.keep_alive = build_head(
            self.status, self.headers, http10=request.version == "1.0",
            head_request=request.method == b"HEAD", body_length=body_length, keep_alive=keep_alive)
        self.head_sent = True
        server.count_response(self.status)
        self.send(head + self.frame(body) if body else head)

    def frame(self, data: bytes) -> bytes:
        framing = self.framing
        if framing == Framing.LENGTH:
            room = self.length - self.sent
            if len(data) > room:
                data = data[:room]        # more than it declared: cut, and close after
                self.keep_alive = False
        elif framing == Framing.CHUNKED:
            self.sent += len(data)
            return chunk(data)
        elif framing == Framing.NONE:
            return b""
        self.sent += len(data)
        return data

    def send_result(self, result) -> None:
        if type(result) is list or type(result) is tuple:
            if not self.head_sent:
                if self.status is None:
                    raise AssertionError("the application returned without calling start_response()")
                body = b"".join(result)
                self.send_head(body, len(body))
                return self.end_body()
        elif (type(result) is FileWrapper and not self.head_sent and self.status is not None
              and self.server.tls is None):       # sendfile(2) would bypass TLS
            fd = result.fileno()
            if fd is not None:
                return self.send_file(result, fd)
        for data in result:
            if data:
                self.write(data)
        if not self.head_sent:
            if self.status is None:
                raise AssertionError("the application returned without calling start_response()")
            self.send_head(b"", 0)
        self.end_body()

    def end_body(self) -> None:
        if self.framing == Framing.CHUNKED:
            self.send(LAST_CHUNK)
        elif self.framing == Framing.LENGTH and self.sent < self.length:
            self.keep_alive = False       # the body fell short of its Content-Length

    def send_file(self, wrapper: FileWrapper, fd: int) -> None:
        """wsgi.file_wrapper over a real file: sendfile(2) from its position
        (tell(): a buffered file's descriptor is ahead of what was read)."""
        try:
            offset = wrapper.filelike.tell()
        except (AttributeError, OSError, ValueError):
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        size = max(0, os.fstat(fd).st_size - offset)
        self.send_head(b"", size)
        if self.framing != Framing.LENGTH:
            return
        count = min(size, self.length)
        sock_fd = self.sock.fileno()
        timeout = self.server.limits.body_timeout
        clock = self.server.clock
        try:
            while count > 0:
                try:
                    sent = os.sendfile(sock_fd, fd, offset, count)
                except BlockingIOError:
                    self.write_deadline = None if timeout is None else clock() + timeout
                    wait_write(sock_fd)
                    continue
                if sent == 0:
                    break
                offset += sent
                count -= sent
                self.sent += sent
        except OSError as exc:
            raise ClientGone(f"sending failed: {exc}") from None
        finally:
            self.write_deadline = None
        self.end_body()

    # ------------------------------------------------------------ WebSockets
    def send_handshake(self, data: bytes, websocket: WebSocket) -> None:
        self.head_sent = True
        self.status = "101 Switching Protocols"
        self.server.count_response(self.status)
        self.send(data)
        self.server.websockets.add(websocket)
        self.parser = None           # nothing more is HTTP on this connection

    def send_ws(self, data: bytes) -> None:
        self.send_within(data, self.server.limits.ws_send_timeout)

    def recv_ws(self, mid_frame: bool) -> bytes:
        timeout = self.server.limits.body_timeout if mid_frame else None
        return self.recv(None if timeout is None else self.server.clock() + timeout)

    def end_websocket(self) -> None:
        """We sent our close frame: the client may still be sending; stop
        reading it (the close lingers so our frame is read before any reset)."""
        self.unclean = True

    # ------------------------------------------------------------ ending
    def refuse(self, exc: ClientError) -> None:
        self.server.client_errors.note(exc.kind, self.client, exc.detail)
        self.unclean = True
        if not self.head_sent:
            extra = "Sec-WebSocket-Version: 13\r\n" if exc.status == 426 else ""
            try:
                self.send(error_response(exc.status, extra))
            except OSError:
                pass
            self.server.count_response(str(exc.status))

    def expire(self, writing: bool) -> None:
        """A deadline passed (the server's sweeper calls this): wake the
        greenlet blocked on the socket; it sees end of input, or a failed send."""
        self.timed_out = True
        try:
            # gevent's plain socket.shutdown, on a TLS socket too: its own
            # drops the TLS state, and our 408 would go out in plaintext.
            GeventSocket.shutdown(self.sock, socket.SHUT_RDWR if writing else socket.SHUT_RD)
        except OSError:
            pass

    def close(self) -> None:
        if self.unclean and not self.timed_out:
            self.linger()
        try:
            self.sock.close()
        except OSError:
            pass
        # Break the reference cycles (parser <-> callbacks, WebSocket <->
        # connection) here rather than leave them to the garbage collector.
        if self.parser is not None:
            self.parser.close()
        if self.websocket is not None:
            self.server.websockets.discard(self.websocket)
            self.websocket = None
        self.server.forget(self)

    def linger(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
            end = self.server.clock() + LINGER
            while self.recv(end):
                pass
        except OSError:
            pass


def _ignore(data: bytes) -> None:
    """write() after a WebSocket handshake: nothing more goes out as HTTP."""
