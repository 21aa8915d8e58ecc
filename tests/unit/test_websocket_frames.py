"""ipserve.http.websocket: the handshake checks, the frame helpers, and
WebSocket.receive()/read_message() over a fake connection that serves the
client's bytes from a script and records what the server sends."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import types

import pytest
from geventwebsocket.exceptions import WebSocketError

from ipserve.http.errors import ClientError
from ipserve.http.limits import Limits
from ipserve.http.websocket import (
    BINARY,
    CLOSE,
    CONTINUATION,
    PING,
    PONG,
    TEXT,
    WebSocket,
    accept_key,
    check_handshake,
    frame_header,
    handshake_response,
    is_upgrade,
    offered_protocols,
    unmask,
    valid_close_code,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# ------------------------------------------------------------------ handshake helpers
def upgrade_environ(**extra) -> dict:
    environ = {"REQUEST_METHOD": "GET", "SERVER_PROTOCOL": "HTTP/1.1", "PATH_INFO": "/ws",
               "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
               "HTTP_SEC_WEBSOCKET_VERSION": "13", "HTTP_SEC_WEBSOCKET_KEY": KEY}
    environ.update(extra)
    return {k: v for k, v in environ.items() if v is not None}


@pytest.mark.parametrize("upgrade, connection, expected", [
    ("websocket", "Upgrade", True),
    ("WebSocket", "upgrade", True),
    ("websocket", "keep-alive, Upgrade", True),
    ("websocket", "Upgrade , keep-alive", True),
    ("h2c, websocket", "upgrade", True),
    ("websocket", None, False),
    ("websocket", "keep-alive", False),
    ("websocket", "upgrades", False),
    ("h2c", "Upgrade", False),
    (None, "Upgrade", False),
    ("websockets", "Upgrade", False),
])
def test_is_upgrade(upgrade, connection, expected):
    environ = {}
    if upgrade is not None:
        environ["HTTP_UPGRADE"] = upgrade
    if connection is not None:
        environ["HTTP_CONNECTION"] = connection
    assert is_upgrade(environ) is expected


def test_valid_handshake_passes():
    check_handshake(upgrade_environ())
    check_handshake(upgrade_environ(HTTP_SEC_WEBSOCKET_KEY=" " + KEY + " "))
    check_handshake(upgrade_environ(HTTP_SEC_WEBSOCKET_KEY=base64.b64encode(os.urandom(16)).decode()))


def _status(environ) -> int:
    with pytest.raises(ClientError) as info:
        check_handshake(environ)
    return info.value.status


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "OPTIONS"])
def test_handshake_not_get_is_400(method):
    assert _status(upgrade_environ(REQUEST_METHOD=method)) == 400


def test_handshake_over_http10_is_400():
    assert _status(upgrade_environ(SERVER_PROTOCOL="HTTP/1.0")) == 400


@pytest.mark.parametrize("key", [
    "short",
    "",
    None,
    "not base64 at all!!",
    "dGhlIHNhbXBsZSBub25jZQ",                       # padding missing
    "dGhlIHNhbXBsZSBub25j ZQ==",                   # space inside
    base64.b64encode(b"x" * 15).decode(),
    base64.b64encode(b"x" * 17).decode(),
    base64.b64encode(b"x" * 32).decode(),
    base64.urlsafe_b64encode(b"\xfb\xff" * 8).decode(),   # '-' and '_' are not base64
])
def test_handshake_bad_key_is_400(key):
    assert _status(upgrade_environ(HTTP_SEC_WEBSOCKET_KEY=key)) == 400


@pytest.mark.parametrize("version", ["8", "12", "14", "", None, "13, 8"])
def test_handshake_other_version_is_426(version):
    assert _status(upgrade_environ(HTTP_SEC_WEBSOCKET_VERSION=version)) == 426


def test_accept_key_rfc6455_example():
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_accept_key_matches_the_definition():
    key = base64.b64encode(os.urandom(16)).decode()
    expected = base64.b64encode(hashlib.sha1(
        (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
    assert accept_key(key) == expected


def test_handshake_response():
    data = handshake_response(upgrade_environ(), None)
    assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert data.endswith(b"\r\n\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in data
    assert b"\r\nConnection: Upgrade\r\n" in data
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in data
    assert b"Sec-WebSocket-Protocol" not in data
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in handshake_response(upgrade_environ(), "chat")


@pytest.mark.parametrize("header, expected", [
    (None, []),
    ("", []),
    ("chat", ["chat"]),
    ("chat, superchat", ["chat", "superchat"]),
    (" chat ,superchat,, ", ["chat", "superchat"]),
])
def test_offered_protocols(header, expected):
    environ = {} if header is None else {"HTTP_SEC_WEBSOCKET_PROTOCOL": header}
    assert offered_protocols(environ) == expected


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 3999, 4000, 4999])
def test_valid_close_codes(code):
    assert valid_close_code(code)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999,
                                  5000, 65535])
def test_invalid_close_codes(code):
    assert not valid_close_code(code)


def naive_unmask(payload: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 125, 126, 1000, 65537])
def test_unmask_matches_naive_xor_and_round_trips(n):
    payload = os.urandom(n)
    mask = os.urandom(4)
    masked = unmask(payload, mask)
    assert masked == naive_unmask(payload, mask)
    assert len(masked) == n
    assert unmask(masked, mask) == payload


def test_unmask_with_zero_bytes_at_the_end():
    # leading/trailing zero bytes must survive the int round trip
    payload = b"\x00\x00abc\x00\x00"
    mask = b"\x00\x00\x00\x00"
    assert unmask(payload, mask) == payload
    mask = b"\x01\x00\x00\x80"
    assert unmask(payload, mask) == naive_unmask(payload, mask)


@pytest.mark.parametrize("length, expected", [
    (0, b"\x81\x00"),
    (125, b"\x81\x7d"),
    (126, b"\x81\x7e\x00\x7e"),
    (65535, b"\x81\x7e\xff\xff"),
    (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
])
def test_frame_header_lengths(length, expected):
    assert frame_header(TEXT, length) == expected


def test_frame_header_opcodes():
    assert frame_header(BINARY, 3) == b"\x82\x03"
    assert frame_header(CLOSE, 2) == b"\x88\x02"
    assert frame_header(PONG, 0) == b"\x8a\x00"


# ------------------------------------------------------------------ fakes
class FakeErrors:
    def __init__(self):
        self.notes = []

    def note(self, kind, client, detail=""):
        self.notes.append((kind, client, detail))


class FakeConnection:
    client = "192.0.2.7"

    def __init__(self, script, *, ws_max_message=1 << 20, app=None):
        self.script = list(script)
        self.server = types.SimpleNamespace(limits=Limits(ws_max_message=ws_max_message),
                                            client_errors=FakeErrors(),
                                            app=app if app is not None else (lambda e, s: []))
        self.recv_flags: list[bool] = []
        self.sent: list[bytes] = []
        self.handshakes: list[bytes] = []
        self.ended = 0

    def recv_ws(self, mid_frame: bool) -> bytes:
        self.recv_flags.append(mid_frame)
        return self.script.pop(0) if self.script else b""

    def send_ws(self, data: bytes) -> None:
        self.sent.append(data)

    def send_handshake(self, data: bytes, websocket) -> None:
        self.handshakes.append(data)

    def end_websocket(self) -> None:
        self.ended += 1

    def frames(self) -> list[tuple[bool, int, bytes]]:
        """What the server sent, as (fin, opcode, payload); checks it is unmasked."""
        out = []
        for data in self.sent:
            first, second = data[0], data[1]
            assert not second & 0x80, "server frames must not be masked"
            assert not first & 0x70
            length, at = second & 0x7F, 2
            if length == 126:
                (length,), at = struct.unpack("!H", data[2:4]), 4
            elif length == 127:
                (length,), at = struct.unpack("!Q", data[2:10]), 10
            assert len(data) == at + length, "one frame per send_ws()"
            out.append((bool(first & 0x80), first & 0x0F, data[at:]))
        return out

    def close_code(self) -> int | None:
        closes = [payload for _, opcode, payload in self.frames() if opcode == CLOSE]
        assert len(closes) == 1, f"expected one close frame, got {closes}"
        return struct.unpack("!H", closes[0][:2])[0] if closes[0] else None


MASK = b"\x37\xfa\x21\x3d"


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True, mask: bytes = MASK) -> bytes:
    """A client frame."""
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, (0x80 if masked else 0) | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, (0x80 if masked else 0) | 126, n)
    else:
        head = struct.pack("!BBQ", first, (0x80 if masked else 0) | 127, n)
    if not masked:
        return head + payload
    return head + mask + naive_unmask(payload, mask)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def socket_for(*script, **kw) -> tuple[WebSocket, FakeConnection]:
    connection = FakeConnection(script, **kw)
    return WebSocket(connection, upgrade_environ(), b""), connection


def receive_all(*script, **kw) -> tuple[list, WebSocket, FakeConnection]:
    """receive() until it returns None."""
    ws, connection = socket_for(*script, **kw)
    messages = []
    for _ in range(50):
        message = ws.receive()
        if message is None:
            return messages, ws, connection
        messages.append(message)
    raise AssertionError("receive() never returned None")


# ------------------------------------------------------------------ messages
def test_receive_sends_the_handshake_once():
    ws, connection = socket_for(frame(TEXT, b"a"), frame(TEXT, b"b"))
    assert ws.receive() == "a"
    assert ws.receive() == "b"
    assert len(connection.handshakes) == 1
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in connection.handshakes[0]


def test_masked_text_message():
    ws, connection = socket_for(frame(TEXT, "h\u00e9llo \u2603".encode()))
    message = ws.receive()
    assert message == "h\u00e9llo \u2603"
    assert type(message) is str
    assert connection.sent == []
    assert not ws.closed


def test_masked_binary_message():
    payload = bytes(range(256))
    ws, _ = socket_for(frame(BINARY, payload))
    message = ws.receive()
    assert message == payload
    assert type(message) is bytes


def test_empty_messages():
    ws, _ = socket_for(frame(TEXT, b""), frame(BINARY, b""))
    assert ws.receive() == ""
    assert ws.receive() == b""


@pytest.mark.parametrize("n", [125, 126, 65535, 65536, 100000])
def test_extended_payload_lengths(n):
    payload = os.urandom(n)
    ws, _ = socket_for(frame(BINARY, payload))
    assert ws.receive() == payload


def test_frames_arriving_one_byte_at_a_time():
    data = frame(TEXT, b"hello") + frame(BINARY, b"x" * 300)
    ws, _connection = socket_for(*[data[i:i + 1] for i in range(len(data))])
    assert ws.receive() == "hello"
    assert ws.receive() == b"x" * 300


def test_several_frames_in_one_read():
    ws, connection = socket_for(frame(TEXT, b"one") + frame(TEXT, b"two") + frame(TEXT, b"three"))
    assert [ws.receive(), ws.receive(), ws.receive()] == ["one", "two", "three"]
    assert len(connection.recv_flags) == 1


def test_bytes_buffered_after_the_handshake_are_read_first():
    connection = FakeConnection([frame(TEXT, b"later")])
    ws = WebSocket(connection, upgrade_environ(), frame(TEXT, b"first")[:4])
    connection.script.insert(0, frame(TEXT, b"first")[4:])
    assert ws.receive() == "first"
    assert ws.receive() == "later"


def test_waiting_for_a_frame_has_no_deadline_but_its_rest_does():
    data = frame(TEXT, b"hello")
    ws, connection = socket_for(data[:1], data[1:3], data[3:])
    assert ws.receive() == "hello"
    assert connection.recv_flags == [False, True, True]


def test_fragmented_text_message():
    ws, connection = socket_for(frame(TEXT, b"Hel", fin=False),
                                frame(CONTINUATION, b"lo ", fin=False),
                                frame(CONTINUATION, b"world"))
    assert ws.receive() == "Hello world"
    assert connection.sent == []


def test_fragmented_binary_message():
    ws, _ = socket_for(frame(BINARY, b"\x00\x01", fin=False), frame(CONTINUATION, b"\x02"))
    assert ws.receive() == b"\x00\x01\x02"


def test_utf8_character_split_across_fragments():
    snowman = "\u2603".encode()
    ws, _ = socket_for(frame(TEXT, b"a" + snowman[:1], fin=False),
                       frame(CONTINUATION, snowman[1:] + b"b"))
    assert ws.receive() == "a\u2603b"


def test_ping_is_answered_with_a_pong_and_the_message_still_returned():
    ws, connection = socket_for(frame(PING, b"are you there"), frame(TEXT, b"msg"))
    assert ws.receive() == "msg"
    assert connection.frames() == [(True, PONG, b"are you there")]
    assert not ws.closed


def test_ping_between_fragments():
    ws, connection = socket_for(frame(TEXT, b"frag", fin=False), frame(PING, b"p"),
                                frame(CONTINUATION, b"ment"))
    assert ws.receive() == "fragment"
    assert connection.frames() == [(True, PONG, b"p")]


def test_empty_ping_and_125_byte_ping():
    ws, connection = socket_for(frame(PING), frame(PING, b"z" * 125), frame(BINARY, b"m"))
    assert ws.receive() == b"m"
    assert connection.frames() == [(True, PONG, b""), (True, PONG, b"z" * 125)]


def test_unsolicited_pong_is_ignored():
    ws, connection = socket_for(frame(PONG, b"hb"), frame(TEXT, b"msg"))
    assert ws.receive() == "msg"
    assert connection.sent == []


# ------------------------------------------------------------------ close
def test_close_frame_is_echoed_and_receive_returns_none():
    messages, ws, connection = receive_all(frame(TEXT, b"bye"),
                                           frame(CLOSE, close_payload(1000, b"done")))
    assert messages == ["bye"]
    assert ws.closed
    assert connection.close_code() == 1000
    assert connection.ended == 1
    assert connection.server.client_errors.notes == []
    with pytest.raises(WebSocketError):
        ws.receive()
    with pytest.raises(WebSocketError):
        ws.send("x")


@pytest.mark.parametrize("code", [1001, 1003, 3000, 4999])
def test_close_code_is_echoed(code):
    _, _ws, connection = receive_all(frame(CLOSE, close_payload(code)))
    assert connection.close_code() == code


def test_empty_close_frame_is_answered_1000():
    _, ws, connection = receive_all(frame(CLOSE))
    assert ws.closed
    assert connection.close_code() == 1000
    assert connection.ended == 1


def test_client_gone_without_close_frame():
    data = frame(TEXT, b"hello")
    ws, connection = socket_for(data[:4])      # then end of input mid-frame
    assert ws.receive() is None
    assert ws.closed
    assert connection.sent == []


def test_client_gone_between_frames():
    ws, _connection = socket_for(frame(TEXT, b"a"))
    assert ws.receive() == "a"
    assert ws.receive() is None
    assert ws.closed


def test_close_sends_a_close_frame_once():
    ws, connection = socket_for()
    ws.accept()
    ws.close(1001, "going away")
    ws.close(1000)
    assert connection.frames() == [(True, CLOSE, close_payload(1001, b"going away"))]
    assert ws.closed


def test_close_reason_is_cut_to_fit_a_control_frame():
    ws, connection = socket_for()
    ws.accept()
    ws.close(1000, b"r" * 300)
    [(_, _, payload)] = connection.frames()
    assert len(payload) <= 125


def test_close_reason_is_cut_on_a_utf8_boundary():
    # RFC 6455 5.5.1: the reason is UTF-8; a client fails the connection on
    # an invalid one. 100 x "é" is 200 bytes: cutting at 123 splits a character.
    ws, connection = socket_for()
    ws.accept()
    ws.close(1000, "\u00e9" * 100)
    [(_, _, payload)] = connection.frames()
    assert len(payload) <= 125
    payload[2:].decode("utf-8")


def test_send_text_and_binary():
    ws, connection = socket_for()
    ws.send("h\u00e9")
    ws.send(b"\x00\x01")
    ws.send("as bytes", binary=True)
    ws.send(bytearray(b"ba"))
    assert connection.frames() == [(True, TEXT, "h\u00e9".encode()), (True, BINARY, b"\x00\x01"),
                                   (True, BINARY, b"as bytes"), (True, BINARY, b"ba")]
    assert len(connection.handshakes) == 1


def test_app_protocol_is_chosen_if_offered():
    class App:
        def __call__(self, environ, start_response):
            return []

        def app_protocol(self, path):
            return "chat" if path == "/ws" else None

    connection = FakeConnection([], app=App())
    ws = WebSocket(connection, upgrade_environ(HTTP_SEC_WEBSOCKET_PROTOCOL="superchat, chat"), b"")
    ws.accept()
    assert ws.protocol == "chat"
    assert b"\r\nSec-WebSocket-Protocol: chat\r\n" in connection.handshakes[0]

    connection = FakeConnection([], app=App())
    ws = WebSocket(connection, upgrade_environ(HTTP_SEC_WEBSOCKET_PROTOCOL="other"), b"")
    ws.accept()
    assert ws.protocol is None
    assert b"Sec-WebSocket-Protocol" not in connection.handshakes[0]


def test_websocket_attributes():
    ws = WebSocket(FakeConnection([]), upgrade_environ(HTTP_ORIGIN="https://a.example"), b"")
    assert ws.path == "/ws"
    assert ws.origin == "https://a.example"
    assert ws.version == "13"
    assert ws.closed is False
    assert ws.protocol is None


# ------------------------------------------------------------------ protocol errors
def failed_with(*script, **kw) -> tuple[int, WebSocket, FakeConnection]:
    ws, connection = socket_for(*script, **kw)
    assert ws.receive() is None
    assert ws.closed
    assert connection.ended == 1
    code = connection.close_code()
    [(kind, client, detail)] = connection.server.client_errors.notes
    assert kind == f"websocket {code}"
    assert client == "192.0.2.7"
    assert detail
    return code, ws, connection


def test_unmasked_client_frame_is_1002():
    assert failed_with(frame(TEXT, b"hello", masked=False))[0] == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_is_1002(opcode):
    assert failed_with(frame(opcode, b"x"))[0] == 1002


@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
def test_rsv_bit_is_1002(rsv):
    assert failed_with(frame(TEXT, b"x", rsv=rsv))[0] == 1002


@pytest.mark.parametrize("opcode", [PING, PONG, CLOSE])
def test_fragmented_control_frame_is_1002(opcode):
    assert failed_with(frame(opcode, b"", fin=False))[0] == 1002


@pytest.mark.parametrize("opcode", [PING, PONG])
def test_oversized_control_frame_is_1002(opcode):
    assert failed_with(frame(opcode, b"x" * 126))[0] == 1002


def test_oversized_close_frame_is_1002():
    assert failed_with(frame(CLOSE, close_payload(1000, b"x" * 124)))[0] == 1002


def test_continuation_without_a_message_is_1002():
    assert failed_with(frame(CONTINUATION, b"x"))[0] == 1002


def test_continuation_after_a_finished_message_is_1002():
    ws, connection = socket_for(frame(TEXT, b"whole"), frame(CONTINUATION, b"x"))
    assert ws.receive() == "whole"
    assert ws.receive() is None
    assert ws.closed
    assert connection.close_code() == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_new_data_frame_inside_a_fragmented_message_is_1002(opcode):
    assert failed_with(frame(TEXT, b"a", fin=False), frame(opcode, b"b"))[0] == 1002


def test_one_byte_close_payload_is_1002():
    assert failed_with(frame(CLOSE, b"\x03"))[0] == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_invalid_close_code_is_1002(code):
    assert failed_with(frame(CLOSE, close_payload(code)))[0] == 1002


@pytest.mark.parametrize("payload", [b"\xff", b"\xc3", b"abc\xed\xa0\x80", b"\xc0\xaf",
                                     b"\xf4\x90\x80\x80"])
def test_invalid_utf8_text_is_1007(payload):
    assert failed_with(frame(TEXT, payload))[0] == 1007


def test_invalid_utf8_across_fragments_is_1007():
    assert failed_with(frame(TEXT, b"ok", fin=False), frame(CONTINUATION, b"\xc3"))[0] == 1007


def test_invalid_utf8_binary_is_fine():
    ws, _ = socket_for(frame(BINARY, b"\xff\xc3"))
    assert ws.receive() == b"\xff\xc3"


def test_invalid_utf8_close_reason_is_1007():
    assert failed_with(frame(CLOSE, close_payload(1000, b"\xff")))[0] == 1007


def test_frame_length_over_2_63_is_1002():
    header = b"\x82\xff" + struct.pack("!Q", 1 << 63)
    code, _ws, connection = failed_with(header, MASK + b"x" * 10, ws_max_message=None)
    assert code == 1002
    assert connection.script == [MASK + b"x" * 10]


# ------------------------------------------------------------------ ws_max_message
def test_message_exactly_at_the_limit_is_accepted():
    ws, _ = socket_for(frame(BINARY, b"x" * 100), ws_max_message=100)
    assert ws.receive() == b"x" * 100


def test_fragments_exactly_at_the_limit_are_accepted():
    ws, _ = socket_for(frame(TEXT, b"a" * 60, fin=False), frame(CONTINUATION, b"b" * 40),
                       ws_max_message=100)
    assert ws.receive() == "a" * 60 + "b" * 40


def test_message_over_the_limit_is_1009_and_never_read():
    header = b"\x82\xfe" + struct.pack("!H", 101)     # binary, masked, 101 bytes: over 100
    rest = MASK + b"x" * 101
    code, _ws, connection = failed_with(header, rest, ws_max_message=100)
    assert code == 1009
    assert connection.script == [rest]                 # mask and payload never read


def test_huge_declared_length_is_1009_and_never_read():
    header = b"\x82\xff" + struct.pack("!Q", 1 << 40)
    rest = MASK + b"x" * 1000
    code, _ws, connection = failed_with(header, rest, ws_max_message=1 << 20)
    assert code == 1009
    assert connection.script == [rest]


def test_fragments_over_the_limit_are_1009_and_the_last_never_read():
    second_header = b"\x00\xfe" + struct.pack("!H", 41)   # continuation, FIN=0... 41 bytes
    rest = MASK + b"b" * 41
    code, _ws, connection = failed_with(frame(TEXT, b"a" * 60, fin=False), second_header, rest,
                                       ws_max_message=100)
    assert code == 1009
    assert connection.script == [rest]


def test_control_frames_do_not_count_toward_the_limit():
    ws, _connection = socket_for(frame(BINARY, b"a" * 90, fin=False), frame(PING, b"p" * 100),
                                frame(CONTINUATION, b"b" * 10), ws_max_message=100)
    assert ws.receive() == b"a" * 90 + b"b" * 10


def test_no_message_limit():
    ws, _ = socket_for(frame(BINARY, b"x" * 70000), ws_max_message=None)
    assert ws.receive() == b"x" * 70000
