"""The HTTP/WebSocket server one worker runs: gevent pywsgi + gevent-websocket,
with the limits a server facing hostile clients needs."""

from __future__ import annotations

import email.parser
import io
import random
import re
import socket

import gevent
from gevent import pywsgi
from geventwebsocket.exceptions import WebSocketError
from geventwebsocket.handler import WebSocketHandler


def _response(status: str, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n").encode()


class ClientError(ValueError):
    """A request we refuse; `response` is sent before the connection closes."""

    def __init__(self, status: str, response: bytes):
        super().__init__(status)
        self.status = status
        self.response = response


# (status, response) pairs; raise ClientError(*PAIR), a new exception each
# time: raising one shared instance again and again chains every traceback onto
# it, and with them the handler frames, sockets and buffers (a leak per request).
HEADERS_TOO_LARGE = ("431", _response("431 Request Header Fields Too Large"))
HEADER_TIMEOUT = ("408", _response("408 Request Timeout"))
BAD_REQUEST = ("400", _response("400 Bad Request"))

# RFC 9110/9112: a method and a field name are tokens; the version is HTTP/1.x;
# no control characters in the request line, no NUL/CR/LF in a field value.
_TOKEN = "[!#$%&'*+\\-.^_`|~0-9A-Za-z]+"
_METHOD = re.compile(_TOKEN)
_FIELD_NAME = re.compile(_TOKEN.encode())
_VERSION = re.compile(r"HTTP/1\.[0-9]")
_LINE_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_VALUE_CONTROL = re.compile(rb"[\x00\r\n]")


class Limits:
    """The per-request limits, from the settings (see ipserve.config).

    None (or 0) is no limit, except keepalive, where 0 is keep-alive off.
    """

    def __init__(self, settings: dict):
        self.request_line = settings["limit_request_line"] or None
        self.fields = settings["limit_request_fields"] or None
        self.field_size = settings["limit_request_field_size"] or None
        self.header_timeout = settings["header_timeout"] or None
        self.keepalive = settings["keepalive"]
        self.ws_send_timeout = settings["ws_send_timeout"] or None
        self.shed_load = settings["shed_load"]


class Handler(WebSocketHandler):
    """gevent-websocket's handler with limits, load shedding and counters."""

    requests_on_connection = 0
    header_deadline = None

    # ------------------------------------------------------------ reading
    def _before(self, deadline: float | None, what):
        """Run `what` and give up when the monotonic `deadline` passes (None: never)."""
        if deadline is None:
            return what()
        remaining = deadline - gevent.get_hub().loop.now()
        if remaining <= 0:
            raise gevent.Timeout()
        with gevent.Timeout(remaining):
            return what()

    def read_requestline(self):
        limits = self.server.limits
        now = gevent.get_hub().loop.now()
        # Waiting for the first request is bounded by header_timeout; for the
        # next one on a keep-alive connection, by the keepalive idle timeout.
        if self.requests_on_connection == 0:
            deadline = None if limits.header_timeout is None else now + limits.header_timeout
        elif not limits.keepalive:
            return ""   # keep-alive off: the response said Connection: close
        else:
            deadline = now + limits.keepalive
        # No limit of ours still leaves pywsgi's: 414 from MAX_REQUEST_LINE (8192) on.
        max_line = limits.request_line or pywsgi.MAX_REQUEST_LINE
        try:
            line = self._before(deadline, lambda: self.rfile.readline(max_line + 1))
        except gevent.Timeout:
            if self.requests_on_connection == 0:
                self._send_and_close(ClientError(*HEADER_TIMEOUT))
            return ""   # an idle keep-alive connection just closes
        if limits.header_timeout is not None:
            self.header_deadline = gevent.get_hub().loop.now() + limits.header_timeout
        self.requests_on_connection += 1
        line = line.decode("latin-1")
        if len(line) > max_line:
            return "x" * pywsgi.MAX_REQUEST_LINE   # pywsgi answers 414 and closes
        return line

    def read_request(self, raw_requestline):
        # A malformed request line (HTTP/0.9, garbage, a TLS handshake) is
        # refused at once, not after header_timeout spent waiting for headers.
        line = raw_requestline.rstrip("\r\n")
        words = line.split()
        if (len(words) != 3 or not _METHOD.fullmatch(words[0]) or not _VERSION.fullmatch(words[2])
                or _LINE_CONTROL.search(line)):
            raise ClientError(*BAD_REQUEST)
        # Read the header block ourselves, under the limits, then let pywsgi
        # parse it from memory.
        try:
            block = self._before(self.header_deadline, self._read_header_block)
        except gevent.Timeout:
            raise ClientError(*HEADER_TIMEOUT) from None
        real_rfile, self.rfile = self.rfile, io.BytesIO(block)
        try:
            return super().read_request(raw_requestline)
        finally:
            self.rfile = real_rfile

    def _read_header_block(self) -> bytes:
        limits = self.server.limits
        lines = []
        lengths: set[bytes] = set()
        codings: list[bytes] = []
        while True:
            line = self.rfile.readline(-1 if limits.field_size is None else limits.field_size + 3)
            if not line:
                raise ClientError(*BAD_REQUEST)
            if line in (b"\r\n", b"\n"):
                # Framing must be unambiguous (request smuggling): one
                # Content-Length value, or "Transfer-Encoding: chunked" alone
                # (pywsgi understands no other coding).
                if len(lengths) > 1 or (codings and (lengths or codings != [b"chunked"])):
                    raise ClientError(*BAD_REQUEST)
                lines.append(line)
                return b"".join(lines)
            if ((limits.field_size is not None and len(line.rstrip(b"\r\n")) > limits.field_size)
                    or (limits.fields is not None and len(lines) >= limits.fields)):
                raise ClientError(*HEADERS_TOO_LARGE)
            content = line[:-2] if line.endswith(b"\r\n") else line.rstrip(b"\n")
            name, colon, value = content.partition(b":")
            # No colon, whitespace before it, an obs-fold continuation line,
            # NUL/CR in a value: 400 (RFC 9112 5.1, 5.2; RFC 9110 5.5).
            if not colon or not _FIELD_NAME.fullmatch(name) or _VALUE_CONTROL.search(value):
                raise ClientError(*BAD_REQUEST)
            name = name.lower()
            if name == b"content-length":
                lengths.add(value.strip())
            elif name == b"transfer-encoding":
                codings.append(value.strip().lower())
            lines.append(line)

    def MessageClass(self, fp, *args):
        # pywsgi parses headers with http.client.parse_headers, which refuses a
        # 101st line (the blank one included: 100 fields gave a 400 and a
        # traceback) and lines over 64 KiB. `fp` holds the block that
        # _read_header_block read under our limits: those are the only ones.
        return email.parser.Parser(_class=pywsgi.OldMessage).parsestr(fp.read().decode("latin-1"))

    def _handle_client_error(self, ex):
        if isinstance(ex, ClientError):
            self.close_connection = True
            return (ex.status, ex.response)
        return super()._handle_client_error(ex)

    def handle_error(self, t, v, tb):
        # pywsgi's wsgi.input raises a bare IOError when the client ends the
        # body early (before Content-Length or the last chunk). That is the
        # client's doing: a 400 and a log line, not a 500 and a traceback.
        if issubclass(t, OSError) and str(v).startswith("unexpected end of file while"):
            self.log_error("Invalid request (from %s): %s", self.client_address, v)
            self.close_connection = True
            self._send_error_response_if_possible(400)
            return
        super().handle_error(t, v, tb)

    def _send_and_close(self, error: ClientError) -> None:
        try:
            self.socket.sendall(error.response)
        except OSError:
            pass
        self.close_connection = True

    # ------------------------------------------------------------ responding
    def log_request(self):
        # gevent-websocket's handler logs through a logger of its own, and
        # formats the line even with no access log (~3% of a worker's time in
        # a hello-world profile). Write to our access log, and only if set.
        if self.server.log is not None:
            pywsgi.WSGIHandler.log_request(self)

    def get_environ(self):
        environ = super().get_environ()
        environ["ipserve.too_busy"] = self.server.lag.too_busy()
        return environ

    def run_application(self):
        self.server.requests += 1
        if (self.server.limits.shed_load and self.environ.get("HTTP_UPGRADE", "").lower() != "websocket"
                and random.random() < self.server.lag.shed_probability()):
            self.server.shed += 1
            self.close_connection = True
            body = b"worker too busy, retry shortly\n"
            self.start_response("503 Service Unavailable",
                                [("Content-Type", "text/plain"), ("Retry-After", "1"),
                                 ("Content-Length", str(len(body)))])
            self.write(body)
            return
        return super().run_application()

    def run_websocket(self):
        ws = self.websocket
        self.server.websockets.add(ws)
        # WebSocket has __slots__: its methods cannot be wrapped per instance,
        # but raw_write (every frame, close frames included) is a slot.
        plain_write = ws.raw_write
        timeout = self.server.limits.ws_send_timeout

        def write(data):
            # A peer that stops reading fills the socket buffer and blocks us;
            # past ws_send_timeout the connection is cut rather than held.
            try:
                with gevent.Timeout(timeout):
                    return plain_write(data)
            except gevent.Timeout:
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise WebSocketError(f"peer read nothing for {timeout:.0f}s; connection closed") from None

        if timeout is not None:   # None: no send deadline
            ws.raw_write = write
        try:
            return super().run_websocket()
        finally:
            self.server.websockets.discard(ws)

    def start_response(self, status, headers, exc_info=None):
        # A retiring worker sends keep-alive clients elsewhere: after this
        # response they reconnect, and the kernel routes them to the new worker.
        # keepalive = 0 closes every connection after its response.
        if ((self.server.retiring or not self.server.limits.keepalive)
                and self.environ.get("HTTP_UPGRADE", "").lower() != "websocket"):
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers.append(("Connection", "close"))
        return super().start_response(status, headers, exc_info)


class Server(pywsgi.WSGIServer):
    """pywsgi server that knows how many connections it holds."""

    handler_class = Handler

    def __init__(self, *args, limits: Limits, lag, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.lag = lag
        self.connections = 0
        self.requests = 0
        self.shed = 0
        self.retiring = False
        self.websockets = set()

    def handle(self, sock, address):
        # Without TCP_NODELAY a keep-alive client waits on Nagle x delayed ACK
        # (~22 requests/s here instead of thousands).
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle(sock, address)

    # A connection counts from its accept, not from when its greenlet first
    # runs: _do_read accepts up to 100 at once and only schedules their
    # handlers, and a draining worker (retire, stop) that saw 0 meanwhile
    # would exit holding connections nobody read, which the kernel resets.
    def do_handle(self, *args):
        self.connections += 1
        super().do_handle(*args)

    def do_close(self, *args):
        # gevent calls it once per do_handle: when the handler ends, or when
        # spawning it failed.
        self.connections -= 1
        super().do_close(*args)
