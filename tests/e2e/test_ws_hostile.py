"""End-to-end: hostile WebSocket clients against a worker (the engine contract,
issue 9, RFC 6455).

The real `ipserve` command (nft router, one worker, tests/apps/hostile.py,
ws_max_message 1 MiB) runs in the testbed's server namespace; the client is a
raw socket with a frame builder written here, so it can break every rule a
library would not let it break. Each case asserts the exact close code (or
handshake status) of the contract, that the connection then ends, that the
worker serving the slot is the same process afterwards and that no traceback
was logged. One module-scope server holds every case but the retiring one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import signal
import socket
import struct
import threading
import time

import pytest

from backends import routed_workers, which
from netns import Bg, tcp_connect
from test_http_hostile import (MIB, OPEN, PORT, Case, PeakRss, Resp, Served,
                               Wire, case_problems, get, run_case, server_args, serving,
                               show_log_on_failure, wait_routed)

WS_MAX = MIB
WS_ARGS = ["--ws-max-message", "1MiB"]
WS_RSS_BOUND = 16 * MIB    # a correct worker holds at most ~1 MiB of a message; 20 MB buffered is over
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

pytestmark = pytest.mark.skipif(not which("nft"), reason="nft is not installed")


# --------------------------------------------------------------------------- #
# A raw WebSocket client
# --------------------------------------------------------------------------- #

def new_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def accept_for(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


def upgrade(path: bytes = b"/ws", key: bytes | None = None, *, version: bytes | None = b"13",
            protocol: bytes | None = None, http: bytes = b"HTTP/1.1", method: bytes = b"GET",
            connection: bytes | None = b"Upgrade", upgrade_: bytes = b"websocket",
            extra: bytes = b"") -> bytes:
    """An upgrade request; None leaves a field out."""
    fields = [b"Upgrade: " + upgrade_ + b"\r\n"]
    if connection is not None:
        fields.append(b"Connection: " + connection + b"\r\n")
    if key is not None:
        fields.append(b"Sec-WebSocket-Key: " + key + b"\r\n")
    if version is not None:
        fields.append(b"Sec-WebSocket-Version: " + version + b"\r\n")
    if protocol is not None:
        fields.append(b"Sec-WebSocket-Protocol: " + protocol + b"\r\n")
    return get(path, *fields, extra, version=http, method=method)


def xor(data: bytes, key: bytes) -> bytes:
    """`data` masked with the 4-byte `key` (RFC 6455 5.3), in linear time."""
    n = len(data)
    if not n:
        return data
    k = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ k).to_bytes(n, "big")


def frame_header(opcode: int, length: int, *, fin: bool = True, rsv: int = 0,
                 mask: bytes | None = b"") -> bytes:
    """A frame header; mask b"" picks a random key, None sends the frame unmasked."""
    b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
    bit = 0 if mask is None else 0x80
    if length < 126:
        head = struct.pack("!BB", b0, bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", b0, bit | 126, length)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, length)
    return head + (mask or b"")


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0,
          masked: bool = True) -> bytes:
    if not masked:
        return frame_header(opcode, len(payload), fin=fin, rsv=rsv, mask=None) + payload
    key = os.urandom(4)
    return frame_header(opcode, len(payload), fin=fin, rsv=rsv, mask=key) + xor(payload, key)


def close_frame(code: int | None = 1000, reason: bytes = b"", raw: bytes | None = None) -> bytes:
    payload = raw if raw is not None else (b"" if code is None else struct.pack("!H", code) + reason)
    return frame(CLOSE, payload)


class Ws:
    """An open WebSocket over a Wire: frames out, frames in."""

    def __init__(self, wire: Wire, response: Resp):
        self.wire = wire
        self.response = response

    def close(self) -> None:
        self.wire.close()

    def __enter__(self) -> "Ws":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, data: bytes) -> bool:
        return self.wire.send(data)

    def recv(self, timeout: float = 10) -> tuple[bool, int, bytes] | str:
        """The next frame (fin, opcode, payload), or "eof" / "reset" / "hang" /
        "bad frame: ..."."""
        w = self.wire
        deadline = time.monotonic() + timeout
        try:
            head = w._exactly(2, deadline)
            if head is None:
                return w._closed_how()
            fin, rsv, opcode = bool(head[0] & 0x80), (head[0] >> 4) & 7, head[0] & 0xF
            if head[1] & 0x80:
                return f"bad frame: the server masked a frame ({head!r})"
            if rsv:
                return f"bad frame: RSV bits {rsv} from the server"
            n = head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", w._exactly(2, deadline) or b"\0\0")[0]
            elif n == 127:
                n = struct.unpack("!Q", w._exactly(8, deadline) or b"\0" * 8)[0]
            payload = w._exactly(n, deadline) if n else b""
            if payload is None:
                return f"truncated frame (opcode {opcode}, {n} bytes)"
            return fin, opcode, payload
        except TimeoutError:
            return "hang"

    def message(self, timeout: float = 10) -> tuple[int, bytes] | str:
        """The next data message (opcode, payload), answering nothing; pings are
        skipped. A string for a close frame ("close 1002") or the end."""
        opcode, parts = None, []
        while True:
            f = self.recv(timeout)
            if isinstance(f, str):
                return f
            fin, op, payload = f
            if op == CLOSE:
                return describe_close(payload)
            if op in (PING, PONG):
                continue
            if opcode is None:
                opcode = op
            parts.append(payload)
            if fin:
                return opcode, b"".join(parts)

    def ending(self, timeout: float = 10) -> tuple[str, list]:
        """Read until the server ends the WebSocket: ("close <code>", frames seen
        before it), or ("eof" / "reset" / "hang" / ..., frames seen)."""
        seen = []
        while True:
            f = self.recv(timeout)
            if isinstance(f, str):
                return f, seen
            if f[1] == CLOSE:
                return describe_close(f[2]), seen
            seen.append(f)


def describe_close(payload: bytes) -> str:
    if len(payload) < 2:
        return f"close without a code ({payload!r})"
    return f"close {struct.unpack('!H', payload[:2])[0]}"


def open_ws(served: Served, path: bytes = b"/ws", protocol: bytes | None = None,
            connection: bytes = b"Upgrade", src: str | None = None, timeout: float = 10) -> Ws:
    key = new_key()
    wire = served.wire(src, timeout=timeout)
    try:
        wire.send(upgrade(path, key, protocol=protocol, connection=connection))
        r = wire.response(timeout)
        assert isinstance(r, Resp), f"upgrade {path!r}: {r}"
        assert r.status == 101, f"upgrade {path!r}: {r.status_line} {r.body[:200]!r}"
        assert r.header("sec-websocket-accept") == accept_for(key), r.headers
        assert (r.header("upgrade") or "").lower() == "websocket", r.headers
        assert "upgrade" in (r.header("connection") or "").lower(), r.headers
    except BaseException:
        wire.close()
        raise
    return Ws(wire, r)


def finish(ws: Ws) -> str:
    """After the server's close frame: answer it as a client does, and say how the
    TCP connection ends ("eof" / "reset" expected)."""
    ws.send(close_frame(1000))
    try:
        end = ws.wire.ending(5)
    except OSError as exc:
        return repr(exc)
    return end


# --------------------------------------------------------------------------- #
# The server
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def ws_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("ws"), WS_ARGS, "ws") as served:
        yield served


@pytest.fixture
def srv(request, ws_server) -> Served:
    show_log_on_failure(request, ws_server)
    return ws_server


# --------------------------------------------------------------------------- #
# Protocol errors: each ends with a close frame carrying the code
# --------------------------------------------------------------------------- #

PROTOCOL_CASES: dict[str, tuple[list[bytes], int]] = {
    "unmasked text frame": ([frame(TEXT, b"hi", masked=False)], 1002),
    "reserved opcode 3": ([frame(0x3, b"x")], 1002),
    "reserved opcode 7": ([frame(0x7, b"x")], 1002),
    "reserved opcode 0xB": ([frame(0xB, b"x")], 1002),
    "reserved opcode 0xF": ([frame(0xF)], 1002),
    "RSV1 set (no extension agreed)": ([frame(TEXT, b"hi", rsv=4)], 1002),
    "RSV3 set": ([frame(BINARY, b"hi", rsv=1)], 1002),
    "ping with FIN=0": ([frame(PING, b"p", fin=False)], 1002),
    "close with FIN=0": ([frame(CLOSE, struct.pack("!H", 1000), fin=False)], 1002),
    "ping with a 126-byte payload": ([frame(PING, b"p" * 126)], 1002),
    "pong with a 200-byte payload": ([frame(PONG, b"p" * 200)], 1002),
    "continuation with no message started": ([frame(CONT, b"x")], 1002),
    "continuation after a complete message": ([frame(TEXT, b"a"), frame(CONT, b"b")], 1002),
    "text frame while a fragmented message is open": (
        [frame(TEXT, b"a", fin=False), frame(TEXT, b"b")], 1002),
    "binary frame while a fragmented text message is open": (
        [frame(TEXT, b"a", fin=False), frame(BINARY, b"b")], 1002),
    "close with a 1-byte payload": ([close_frame(raw=b"\x03")], 1002),
    **{f"close with code {code}": ([close_frame(code)], 1002)
       for code in (0, 999, 1004, 1005, 1006, 1015, 2999, 5000)},
    "invalid UTF-8 text": ([frame(TEXT, b"\xff\xfe")], 1007),
    "UTF-16 surrogate in text": ([frame(TEXT, b"\xed\xa0\x80")], 1007),
    "text cut inside a character": ([frame(TEXT, "€".encode()[:2])], 1007),
    "invalid UTF-8 in a later fragment": (
        [frame(TEXT, b"ok", fin=False), frame(CONT, b"\xc3\x28")], 1007),
    "invalid UTF-8 in a close reason": ([close_frame(1000, b"\xff")], 1007),
    "frame header declaring 1 TiB": ([frame_header(BINARY, 1 << 40, mask=os.urandom(4))], 1009),
    "one byte over ws_max_message": ([frame(BINARY, b"x" * (WS_MAX + 1))], 1009),
    "ws_max_message + 1 over two fragments": (
        [frame(BINARY, b"x" * (WS_MAX // 2), fin=False), frame(CONT, b"x" * (WS_MAX // 2 + 1))],
        1009),
}


@pytest.mark.parametrize("name", list(PROTOCOL_CASES))
def test_protocol_error_closes_with_code(srv, name):
    frames, code = PROTOCOL_CASES[name]
    mark = srv.log_mark()
    with open_ws(srv) as ws:
        for f in frames:
            if not ws.send(f):
                break
        how, seen = ws.ending(10)
        assert how == f"close {code}", f"{name}: {how} (expected close {code}); frames before: " \
                                       f"{[(op, p[:40]) for _, op, p in seen]}"
        end = finish(ws)
        assert end in ("eof", "reset"), f"{name}: after the close frame the connection is {end}"
    srv.assert_unchanged(mark)


# --------------------------------------------------------------------------- #
# Valid traffic, boundaries included
# --------------------------------------------------------------------------- #

def test_valid_traffic_is_echoed(srv):
    mark = srv.log_mark()
    with open_ws(srv) as ws:
        assert ws.response.header("sec-websocket-protocol") is None
        ws.send(frame(TEXT, "héllo €".encode()))
        assert ws.message() == (TEXT, "héllo €".encode())
        ws.send(frame(BINARY, bytes(range(256))))
        assert ws.message() == (BINARY, bytes(range(256)))
        # A character split across fragments, a ping between them: answered with
        # a pong carrying its payload, the message echoed whole.
        euro = "€".encode()
        ws.send(frame(TEXT, b"a" + euro[:1], fin=False) + frame(PING, b"ping!")
                + frame(CONT, euro[1:] + b"z"))
        f = ws.recv()
        assert f == (True, PONG, b"ping!"), f
        assert ws.message() == (TEXT, b"a" + euro + b"z")
        # Exactly ws_max_message, in one frame and over fragments.
        big = os.urandom(WS_MAX)
        ws.send(frame(BINARY, big))
        assert ws.message(20) == (BINARY, big)
        q = WS_MAX // 4
        parts = [big[i * q:(i + 1) * q] for i in range(4)]
        ws.send(b"".join(frame(BINARY if i == 0 else CONT, part, fin=i == 3)
                         for i, part in enumerate(parts)))
        assert ws.message(20) == (BINARY, big)
        # A clean close is answered with a close frame (the code echoed), then the end.
        ws.send(close_frame(1000, b"bye"))
        how, seen = ws.ending()
        assert how == "close 1000", (how, seen)
        assert ws.wire.ending(5) in ("eof", "reset")
    srv.assert_unchanged(mark)


@pytest.mark.parametrize("fragments", [1, 100], ids=["one 20 MB frame", "100 fragments of 200 KB"])
def test_message_over_ws_max_message_closes_1009_and_rss_stays_bounded(srv, fragments):
    total = 20 * 1000 * 1000
    size = total // fragments
    mark = srv.log_mark()
    with open_ws(srv) as ws, PeakRss(srv.pid) as peak:
        out = ws.wire.sock.dup()              # its own timeout; shut down below
        stop = threading.Event()

        def send_all() -> int:
            """Send the frames in 64 KiB writes, masked with one key per frame."""
            sent = 0
            out.settimeout(30)
            piece = os.urandom(64 * 1024)
            try:
                for i in range(fragments):
                    key = os.urandom(4)
                    out.sendall(frame_header(BINARY if i == 0 else CONT, size,
                                             fin=i == fragments - 1, mask=key))
                    left = size
                    while left and not stop.is_set():
                        chunk = piece[:min(left, len(piece))]
                        out.sendall(xor(chunk, key))   # 64 KiB: a multiple of 4, key stays aligned
                        left -= len(chunk)
                        sent += len(chunk)
                    if stop.is_set():
                        break
            except OSError:
                pass
            return sent

        sender = Bg(send_all)
        try:
            how, seen = ws.ending(15)
            assert how == "close 1009", f"{how} (expected close 1009); {len(seen)} frames before"
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                ws.wire.sock.shutdown(socket.SHUT_RDWR)
            sent = sender.value(30)
            out.close()
    print(f"close 1009 after {sent / MIB:.1f} MiB sent; peak RSS growth {peak.growth / MIB:.1f} MiB")
    assert peak.growth < WS_RSS_BOUND, f"RSS grew {peak.growth / MIB:.1f} MiB for a refused message"
    srv.assert_unchanged(mark)


def test_echo_still_works_on_a_new_connection(srv):
    """After every hostile case above, the same worker still echoes."""
    with open_ws(srv) as ws:
        ws.send(frame(TEXT, b"still here"))
        assert ws.message() == (TEXT, b"still here")
        ws.send(close_frame(1000))
        assert ws.ending()[0] == "close 1000"
    srv.assert_unchanged()


# --------------------------------------------------------------------------- #
# Handshakes
# --------------------------------------------------------------------------- #

HANDSHAKE_CASES: dict[str, Case] = {
    "Sec-WebSocket-Key: short": Case(upgrade(key=b"short"), (400,)),
    "key of 15 bytes": Case(upgrade(key=base64.b64encode(b"x" * 15)), (400,)),
    "key of 17 bytes": Case(upgrade(key=base64.b64encode(b"x" * 17)), (400,)),
    "no key": Case(upgrade(key=None), (400,)),
    "upgrade over HTTP/1.0": Case(upgrade(key=new_key(), http=b"HTTP/1.0"), (400,)),
    "upgrade with POST": Case(upgrade(key=new_key(), method=b"POST",
                                      extra=b"Content-Length: 0\r\n"), (400,)),
    "version 8": Case(upgrade(key=new_key(), version=b"8"), (426,),
                      check=lambda rs: rs[0].header("sec-websocket-version") == "13"
                      or pytest.fail(f"426 without Sec-WebSocket-Version: 13: {rs[0].headers}")),
    "no version": Case(upgrade(key=new_key(), version=None), ({400, 426},),
                       note="a missing version is 'other than 13' (426) or malformed (400)"),
    "Upgrade: websocket without Connection: upgrade": Case(
        upgrade(key=new_key(), connection=None), (200,), end=OPEN,
        check=lambda rs: rs[0].json()["websocket"] is False
        or pytest.fail(f"the app got a WebSocket: {rs[0].body!r}")),
    "Upgrade: websocket with Connection: keep-alive": Case(
        upgrade(key=new_key(), connection=b"keep-alive"), (200,), end=OPEN,
        check=lambda rs: rs[0].json()["websocket"] is False
        or pytest.fail(f"the app got a WebSocket: {rs[0].body!r}")),
}


@pytest.mark.parametrize("name", list(HANDSHAKE_CASES))
def test_handshake(srv, name):
    case = HANDSHAKE_CASES[name]
    mark = srv.log_mark()
    resps, stopped, end, _ = run_case(srv, case)
    problems = case_problems(case, resps, stopped, end)
    assert problems == [], f"{name}: " + "; ".join(problems) + (f" ({case.note})" if case.note else "")
    assert not any(r.status == 101 for r in resps)
    srv.assert_unchanged(mark)


def test_connection_header_with_several_tokens_upgrades(srv):
    with open_ws(srv, connection=b"keep-alive, Upgrade") as ws:
        ws.send(frame(TEXT, b"x"))
        assert ws.message() == (TEXT, b"x")


def test_subprotocol_chosen_by_the_app(srv):
    """The app picks "chat" of the client's "a, chat" by start_response("101 ...")."""
    mark = srv.log_mark()
    with open_ws(srv, b"/ws-chat", protocol=b"a, chat") as ws:
        assert ws.response.header("sec-websocket-protocol") == "chat", ws.response.headers
        ws.send(frame(TEXT, b"hi"))
        assert ws.message() == (TEXT, b"hi")
    srv.assert_unchanged(mark)


def test_subprotocol_chosen_by_app_protocol(srv):
    """gevent-websocket's way: the app object's app_protocol(path) lists what it
    speaks there; the server picks one the client offered, or none."""
    with open_ws(srv, b"/ws-app-protocol", protocol=b"a, chat") as ws:
        assert ws.response.header("sec-websocket-protocol") == "chat", ws.response.headers
        ws.send(frame(TEXT, b"hi"))
        assert ws.message() == (TEXT, b"hi")
    with open_ws(srv, b"/ws-app-protocol", protocol=b"a, b") as ws:
        assert ws.response.header("sec-websocket-protocol") is None, ws.response.headers
        ws.send(frame(TEXT, b"hi"))
        assert ws.message() == (TEXT, b"hi")


def test_no_subprotocol_unless_the_app_chooses(srv):
    with open_ws(srv, b"/ws", protocol=b"a, chat") as ws:
        assert ws.response.header("sec-websocket-protocol") is None, ws.response.headers
        ws.send(frame(TEXT, b"hi"))
        assert ws.message() == (TEXT, b"hi")
    srv.assert_unchanged()


def test_app_refusing_the_upgrade_answers_plain_http(srv):
    mark = srv.log_mark()
    with srv.wire() as w:
        w.send(upgrade(b"/ws-refuse", new_key()))
        r = w.response()
        assert isinstance(r, Resp), r
        assert r.status == 403, r.status_line
        assert r.body == b"no WebSocket for you\n"
        assert r.header("sec-websocket-accept") is None
        assert w.ending() in ("eof", "reset"), "the connection stayed open after the refusal"
    srv.assert_unchanged(mark)


def test_bad_handshakes_are_logged_rate_limited(srv):
    """1,000 bad handshakes of three kinds: a few log lines (one per kind per
    10 s, with a count), no traceback, the same worker."""
    bad = [upgrade(key=b"short"), upgrade(key=new_key(), version=b"8"),
           upgrade(key=new_key(), http=b"HTTP/1.0")]
    mark = srv.log_mark()
    for i in range(1000):
        with srv.wire() as w:
            w.send(bad[i % len(bad)])
            r = w.response()
            assert isinstance(r, Resp) and r.status in (400, 426), (i, r)
    new = srv.log_since(mark)
    assert not any("Traceback" in line for line in new), "\n".join(new[-40:])
    assert len(new) <= 6, f"{len(new)} log lines for 1000 bad handshakes:\n" + "\n".join(new[:20])
    srv.assert_unchanged()


# --------------------------------------------------------------------------- #
# A retiring worker
# --------------------------------------------------------------------------- #

def test_retiring_worker_closes_plain_request_carrying_upgrade(testbed, ipserve):
    """`Upgrade: websocket` without `Connection: upgrade` is a plain request, and
    a retiring worker (after a HUP) answers it like any plain request: with
    `Connection: close`, so the client reconnects to the new generation."""
    server = ipserve(server_args(["--keepalive", "30s"]))
    old = wait_routed(server)[0]["pid"]
    w = Wire(tcp_connect(testbed.client_ns, testbed.client_ips[0], testbed.server_ip, PORT,
                         timeout=10))
    try:
        w.send(get())
        r = w.response()
        assert isinstance(r, Resp) and r.status == 200 and r.json()["pid"] == old, r
        assert not r.closes()
        server.send_signal(signal.SIGHUP)
        server.wait_for(lambda st: (t := routed_workers(st, 1)) is not None and t[0]["pid"] != old,
                        timeout=30, what="the new generation routed")
        st = server.status()
        assert any(x["pid"] == old for x in st["workers"]), "the old worker left (it holds us)"
        w.send(upgrade(b"/ws", new_key(), connection=None))
        r = w.response()
        assert isinstance(r, Resp), r
        assert r.status == 200, r.status_line
        body = r.json()
        assert body["pid"] == old and body["websocket"] is False, body
        assert r.closes(), f"a retiring worker's answer without Connection: close: {r.headers}"
        assert w.ending() in ("eof", "reset")
    finally:
        w.close()
    assert "Traceback" not in server.log_text()
