"""The HTTP/WebSocket server one worker runs: gevent pywsgi + gevent-websocket,
with the limits a server facing hostile clients needs."""

from __future__ import annotations

import io
import random
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


HEADERS_TOO_LARGE = ClientError("431", _response("431 Request Header Fields Too Large"))
HEADER_TIMEOUT = ClientError("408", _response("408 Request Timeout"))


class Limits:
    """The per-request limits, from the settings (see ipserve.config)."""

    def __init__(self, settings: dict):
        self.request_line = settings["limit_request_line"]
        self.fields = settings["limit_request_fields"]
        self.field_size = settings["limit_request_field_size"]
        self.header_timeout = settings["header_timeout"]
        self.keepalive = settings["keepalive"]
        self.ws_send_timeout = settings["ws_send_timeout"]
        self.shed_load = settings["shed_load"]


class Handler(WebSocketHandler):
    """gevent-websocket's handler with limits, load shedding and counters."""

    requests_on_connection = 0
    header_deadline = None

    # ------------------------------------------------------------ reading
    def _before(self, deadline: float, what):
        """Run `what` and give up when the monotonic `deadline` passes."""
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
        wait = limits.header_timeout if self.requests_on_connection == 0 else limits.keepalive
        try:
            line = self._before(now + wait, lambda: self.rfile.readline(limits.request_line + 1))
        except gevent.Timeout:
            if self.requests_on_connection == 0:
                self._send_and_close(HEADER_TIMEOUT)
            return ""   # an idle keep-alive connection just closes
        self.header_deadline = gevent.get_hub().loop.now() + limits.header_timeout
        self.requests_on_connection += 1
        line = line.decode("latin-1")
        if len(line) > limits.request_line:
            return "x" * pywsgi.MAX_REQUEST_LINE   # pywsgi answers 414 and closes
        return line

    def read_request(self, raw_requestline):
        # Read the header block ourselves, under the limits, then let pywsgi
        # parse it from memory.
        try:
            block = self._before(self.header_deadline, self._read_header_block)
        except gevent.Timeout:
            raise HEADER_TIMEOUT from None
        real_rfile, self.rfile = self.rfile, io.BytesIO(block)
        try:
            return super().read_request(raw_requestline)
        finally:
            self.rfile = real_rfile

    def _read_header_block(self) -> bytes:
        limits = self.server.limits
        lines = []
        while True:
            line = self.rfile.readline(limits.field_size + 3)
            if not line:
                raise ClientError("400", _response("400 Bad Request"))
            if line in (b"\r\n", b"\n"):
                lines.append(line)
                return b"".join(lines)
            if len(line.rstrip(b"\r\n")) > limits.field_size or len(lines) >= limits.fields:
                raise HEADERS_TOO_LARGE
            if b":" not in line and not line[:1].isspace():
                raise ClientError("400", _response("400 Bad Request"))
            lines.append(line)

    def _handle_client_error(self, ex):
        if isinstance(ex, ClientError):
            self.close_connection = True
            return (ex.status, ex.response)
        return super()._handle_client_error(ex)

    def _send_and_close(self, error: ClientError) -> None:
        try:
            self.socket.sendall(error.response)
        except OSError:
            pass
        self.close_connection = True

    # ------------------------------------------------------------ responding
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
        plain_send = ws.send
        timeout = self.server.limits.ws_send_timeout

        def send(*args, **kwargs):
            # A peer that stops reading fills the socket buffer and blocks us;
            # past ws_send_timeout the connection is cut rather than held.
            try:
                with gevent.Timeout(timeout):
                    return plain_send(*args, **kwargs)
            except gevent.Timeout:
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise WebSocketError(f"peer read nothing for {timeout:.0f}s; connection closed") from None

        ws.send = send
        try:
            return super().run_websocket()
        finally:
            self.server.websockets.discard(ws)

    def start_response(self, status, headers, exc_info=None):
        # A retiring worker sends keep-alive clients elsewhere: after this
        # response they reconnect, and the kernel routes them to the new worker.
        if self.server.retiring and self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
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
        self.connections += 1
        try:
            super().handle(sock, address)
        finally:
            self.connections -= 1
