"""WebSockets (RFC 6455): the handshake, and frames behind gevent-websocket's
object API (receive, send, close, closed, environ, path, origin, protocol,
version), so Flask-Sockets, python-engineio's gevent mode and plain
gevent-websocket apps run unchanged. gevent-websocket's own frame code
echoes unmasked frames, closes without codes and buffers messages of any
size; this one checks every rule a server must and is bounded by
ws_max_message."""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

from gevent.lock import Semaphore
from geventwebsocket.exceptions import WebSocketError  # what apps already catch

from ipserve.http.errors import ClientError, ClientGone

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = (CONTINUATION, TEXT, BINARY)
_CONTROL_OPCODES = (CLOSE, PING, PONG)

PROTOCOL_ERROR, INVALID_DATA, TOO_BIG = 1002, 1007, 1009


class ProtocolError(ValueError):
    """The client broke RFC 6455: closed with `code`."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",")]


def is_upgrade(environ: dict) -> bool:
    """Does the request ask for a WebSocket (Upgrade: websocket and
    Connection: upgrade)? Anything else is a plain request."""
    return ("websocket" in _tokens(environ.get("HTTP_UPGRADE", ""))
            and "upgrade" in _tokens(environ.get("HTTP_CONNECTION", "")))


def check_handshake(environ: dict) -> None:
    """Raise ClientError unless the upgrade request is one we can accept."""
    if environ["REQUEST_METHOD"] != "GET" or environ["SERVER_PROTOCOL"] != "HTTP/1.1":
        raise ClientError(400, "websocket handshake not GET over HTTP/1.1")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != "13":
        raise ClientError(426, "unsupported websocket version")
    try:
        key = base64.b64decode(environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 16:
        raise ClientError(400, "bad Sec-WebSocket-Key")


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.strip().encode("ascii") + GUID).digest()).decode("ascii")


def offered_protocols(environ: dict) -> list[str]:
    return [t.strip() for t in environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "").split(",") if t.strip()]


def handshake_response(environ: dict, protocol: str | None) -> bytes:
    extra = f"Sec-WebSocket-Protocol: {protocol}\r\n" if protocol else ""
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_key(environ['HTTP_SEC_WEBSOCKET_KEY'])}\r\n"
            f"{extra}\r\n").encode("latin-1")


def valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) \
        or 3000 <= code <= 4999


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def frame_header(opcode: int, length: int) -> bytes:
    if length < 126:
        return struct.pack("!BB", 0x80 | opcode, length)
    if length < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, length)
    return struct.pack("!BBQ", 0x80 | opcode, 127, length)


class WebSocket:
    """environ["wsgi.websocket"]. The 101 answer goes out when the application
    first uses the socket, or calls start_response("101 ...") to pick a
    subprotocol; an application that calls start_response with another status
    first has refused the upgrade, and that response is sent instead."""

    OPCODE_CONTINUATION, OPCODE_TEXT, OPCODE_BINARY = CONTINUATION, TEXT, BINARY
    OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG = CLOSE, PING, PONG

    __slots__ = ("environ", "closed", "protocol", "_connection", "_buffer", "_send_lock", "_open")

    def __init__(self, connection, environ: dict, buffered: bytes):
        self.environ = environ
        self.closed = False
        self.protocol: str | None = None
        self._connection = connection
        self._buffer = buffered          # bytes the client sent right after its handshake
        self._send_lock: Semaphore | None = None   # made on first send: idle sockets stay small
        self._open = False               # 101 sent

    # ------------------------------------------------------------ gevent-websocket's API
    @property
    def path(self) -> str | None:
        return self.environ.get("PATH_INFO")

    @property
    def origin(self) -> str | None:
        return self.environ.get("HTTP_ORIGIN")

    @property
    def version(self) -> str:
        return "13"

    def receive(self):
        """The next message (str for text, bytes for binary), or None once
        the connection is closed (by the client, or for its protocol error)."""
        if self.closed:
            raise WebSocketError("Connection is already closed")
        try:
            self.accept()
            return self.read_message()
        except ProtocolError as exc:
            self._fail(exc.code, str(exc))
        except UnicodeDecodeError:
            self._fail(INVALID_DATA, "invalid UTF-8 in a text message")
        except OSError:            # gone, timed out mid-frame, reset
            self.closed = True
        return None

    def send(self, message, binary: bool | None = None) -> None:
        if self.closed:
            raise WebSocketError("Connection is already closed")
        if binary is None:
            binary = not isinstance(message, str)
        if isinstance(message, str):
            message = message.encode("utf-8")
        elif not isinstance(message, bytes):
            message = bytes(message)
        self.send_frame(message, BINARY if binary else TEXT)

    def send_frame(self, payload: bytes, opcode: int) -> None:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        data = frame_header(opcode, len(payload)) + payload
        if self._send_lock is None:
            self._send_lock = Semaphore()
        try:
            self.accept()
            with self._send_lock:   # greenlets sending at once must not interleave frames
                self._connection.send_ws(data)
        except OSError as exc:
            self.closed = True
            raise WebSocketError(f"connection lost: {exc}") from None

    def close(self, code: int = 1000, message: bytes | str = b"") -> None:
        if self.closed:
            return
        if not self._open:       # never answered 101: nothing to close but the connection
            self.closed = True
            return
        if isinstance(message, str):
            message = message.encode("utf-8")
        # A control frame carries at most 125 bytes; cut the reason on a character.
        reason = message[:123].decode("utf-8", "ignore").encode("utf-8")
        try:
            self.send_frame(struct.pack("!H", code) + reason, CLOSE)
        except WebSocketError:
            pass
        finally:
            self.closed = True

    # ------------------------------------------------------------ the protocol
    def accept(self, protocol: str | None = None) -> None:
        """Send the 101 answer (once)."""
        if self._open:
            return
        self._open = True
        if protocol is None:
            protocol = self._app_protocol()
        self.protocol = protocol
        self._connection.send_handshake(handshake_response(self.environ, protocol), self)

    def _app_protocol(self) -> str | None:
        # gevent-websocket's convention: the application object may choose.
        choose = getattr(self._connection.server.app, "app_protocol", None)
        if choose is None:
            return None
        chosen = choose(self.path)
        return chosen if chosen in offered_protocols(self.environ) else None

    def _read(self, n: int, mid_frame: bool = True) -> bytes:
        """`n` bytes. Waiting for a frame to start has no deadline (an idle
        WebSocket); once it has started, its rest must keep coming."""
        buffered = self._buffer
        if len(buffered) >= n:
            self._buffer = buffered[n:]
            return buffered[:n]
        parts = [buffered]
        have = len(buffered)
        while have < n:
            data = self._connection.recv_ws(mid_frame or have > 0)
            if not data:
                raise ClientGone("the client closed the WebSocket without a close frame")
            parts.append(data)
            have += len(data)
        data = b"".join(parts)
        self._buffer = data[n:]
        return data[:n]

    def read_message(self):
        limit = self._connection.server.limits.ws_max_message
        opcode = None          # of the message being assembled
        parts: list[bytes] = []
        size = 0
        while True:
            first, second = self._read(2, mid_frame=False)
            fin, rsv, frame_opcode = first & 0x80, first & 0x70, first & 0x0F
            length = second & 0x7F
            if rsv:
                raise ProtocolError(PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            if not second & 0x80:
                raise ProtocolError(PROTOCOL_ERROR, "unmasked client frame")
            if frame_opcode in _CONTROL_OPCODES:
                if not fin or length > 125:
                    raise ProtocolError(PROTOCOL_ERROR, "fragmented or oversized control frame")
            elif frame_opcode not in _DATA_OPCODES:
                raise ProtocolError(PROTOCOL_ERROR, f"reserved opcode {frame_opcode:#x}")
            elif frame_opcode == CONTINUATION and opcode is None:
                raise ProtocolError(PROTOCOL_ERROR, "continuation frame without a message")
            elif frame_opcode != CONTINUATION and opcode is not None:
                raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
                if length >> 63:
                    raise ProtocolError(PROTOCOL_ERROR, "frame length over 2**63")
            if frame_opcode < CLOSE and limit is not None and size + length > limit:
                raise ProtocolError(TOO_BIG, f"message over ws_max_message ({limit} bytes)")
            mask = self._read(4)
            payload = unmask(self._read(length), mask)
            if frame_opcode == CLOSE:
                self._on_close(payload)
                return None
            if frame_opcode == PING:
                self.send_frame(payload, PONG)
                continue
            if frame_opcode == PONG:
                continue
            if opcode is None:
                opcode = frame_opcode
            parts.append(payload)
            size += length
            if fin:
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                return data.decode("utf-8") if opcode == TEXT else data

    def _on_close(self, payload: bytes) -> None:
        """The client's close frame: check it, answer with its code, done."""
        if len(payload) == 1:
            raise ProtocolError(PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = None
        if payload:
            (code,) = struct.unpack("!H", payload[:2])
            if not valid_close_code(code):
                raise ProtocolError(PROTOCOL_ERROR, f"invalid close code {code}")
            payload[2:].decode("utf-8")      # UnicodeDecodeError: 1007
        self.close(code or 1000)
        self._connection.end_websocket()

    def _fail(self, code: int, reason: str) -> None:
        self._connection.server.client_errors.note(
            f"websocket {code}", self._connection.client, reason)
        self.close(code, reason.encode("utf-8"))
        self._connection.end_websocket()
