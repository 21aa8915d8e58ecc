"""End-to-end: hostile HTTP clients against a worker (the engine contract, issue 9).

The real `ipserve` command (nft router, one worker, tests/apps/hostile.py) runs
in the testbed's server namespace; raw sockets from the client namespace send
exactly the bytes under test and parse what comes back themselves (no HTTP
library in between that would fix the request up or stop at the first answer).

Every case asserts the exact status line(s) the contract gives, that an error
answer carries `Connection: close` and the connection then closes, that the
worker serving the slot is still the same process afterwards and that nothing
was logged with a traceback. Cases are grouped on a few module-scope servers:

  corpus   limits 512 / 20 / 1024, header_timeout 30 s, keepalive 1 s: the
           syntax corpus (answered at once: a hang here is a 30 s wait), the
           limits at and one past their boundary, keep-alive and pipelining
  bounds   header_timeout 2 s, body_timeout 2 s, limit_request_body 1 MiB:
           slowloris, stalled and dribbled bodies, stalled response writes,
           bodies over the limit (RSS bounded, the app not called)

and one server per test for worker_connections and the open-files limit.
Assertions never compare durations except generous "it did not wait out a
long timeout" bounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import pytest
from conftest import NEEDS_ROOT

import netns
from backends import routed_workers, which
from netns import Bg, Testbed, tcp_connect

PORT = 8000
MIB = 1 << 20
HOST = b"Host: example\r\n"
APP = os.path.join(netns.REPO_ROOT, "tests", "apps", "hostile.py") + ":application"
CASE_TIMEOUT = 10.0       # no answer in this long is a hang (servers here wait 30 s)
CLOSED_WITHIN = 5.0       # an error answer's connection closes within this long

pytestmark = pytest.mark.skipif(not which("nft"), reason="nft is not installed")


# --------------------------------------------------------------------------- #
# Servers
# --------------------------------------------------------------------------- #

def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


def wait_routed(srv, workers: int = 1, timeout: float = 30) -> dict[int, dict]:
    st = srv.wait_for(lambda st: routed_workers(st, workers) is not None, timeout=timeout,
                      interval=0.05, what=f"{workers} active worker(s), each routed its slot")
    return routed_workers(st, workers)


def server_args(extra=(), workers: int = 1) -> list[str]:
    return [APP, "-w", str(workers), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
            "--graceful-timeout", "1", *map(str, extra)]


class Served:
    """One ipserve (one worker, the hostile app) and the client side of its testbed."""

    def __init__(self, tb: Testbed, srv, pid: int):
        self.tb, self.srv, self.pid = tb, srv, pid
        self.srcs = tb.client_ips
        self._next = 0

    def src(self) -> str:
        """A client address (round robin: -w 1, every address is the one slot's)."""
        self._next += 1
        return self.srcs[self._next % len(self.srcs)]

    def connect(self, src: str | None = None, timeout: float = 10,
                rcvbuf: int | None = None) -> socket.socket:
        if rcvbuf is None:
            return tcp_connect(self.tb.client_ns, src or self.src(), self.tb.server_ip, PORT,
                               timeout=timeout)
        # A small receive buffer, set before connect (it then stays small: no autotuning).
        sock = netns.make_socket(self.tb.client_ns, src or self.src(), socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect((self.tb.server_ip, PORT))
        except BaseException:
            sock.close()
            raise
        return sock

    def wire(self, src: str | None = None, **kw) -> "Wire":
        return Wire(self.connect(src, **kw))

    def get(self, path: str, src: str | None = None, timeout: float = 10) -> "Resp":
        with self.wire(src, timeout=timeout) as w:
            w.send(b"GET " + path.encode() + b" HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
            r = w.response(timeout)
        assert isinstance(r, Resp), f"GET {path}: {r}"
        return r

    def json(self, path: str, src: str | None = None) -> dict:
        r = self.get(path, src)
        assert r.status == 200, f"GET {path}: {r.status_line} {r.body[:200]!r}"
        return json.loads(r.body)

    def calls(self, path: str) -> int:
        """How many times the app was called for `path` (its own /calls)."""
        return self.json("/calls").get(path, 0)

    def log_mark(self) -> int:
        return len(self.srv.own_lines())

    def log_since(self, mark: int) -> list[str]:
        return self.srv.own_lines()[mark:]

    def assert_unchanged(self, mark: int | None = None, status: bool = True) -> None:
        """The slot is still served by the same worker process (its own answer and,
        with `status`, the master's view); no traceback logged since `mark`."""
        got = self.json("/whoami")["pid"]
        assert got == self.pid, f"the worker was replaced: pid {self.pid} -> {got}"
        if status:
            table = routed_workers(self.srv.status(), 1)
            assert table is not None and table[0]["pid"] == self.pid, \
                f"slot 0 is no longer routed to pid {self.pid}: {self.srv.last_status}"
        if mark is not None:
            new = self.log_since(mark)
            assert not any("Traceback" in line for line in new), "\n".join(new[-60:])


@contextlib.contextmanager
def serving(tmp_dir, extra=(), name: str = "hostile"):
    """A testbed and an ipserve on it (module scope: not the `ipserve` fixture)."""
    _require_root()
    tb = Testbed()
    try:
        srv = netns.start_ipserve(tb, server_args(extra),
                                  log_path=os.path.join(str(tmp_dir), f"ipserve-{name}.log"))
        try:
            yield Served(tb, srv, wait_routed(srv)[0]["pid"])
        finally:
            srv.cleanup()
    finally:
        tb.close()


def show_log_on_failure(request, served: Served) -> None:
    """Put the server's log tail in this test's failure report, as the `ipserve`
    fixture does for the servers it starts (conftest's makereport hook)."""
    key = getattr(sys.modules.get("conftest"), "_ipserve_key", None)
    if key is not None:
        request.node.stash[key] = [*request.node.stash.get(key, []), served.srv]


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    return int(proc_status(pid)[key].split()[0])


class PeakRss:
    """Peak RSS growth of `pid` over a block: the kernel's high-water mark
    (VmHWM) is reset at the start (/proc/PID/clear_refs, "5"), read at the end;
    where that is not possible, VmRSS is sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid = pid
        self.growth = 0            # bytes
        self._stop = threading.Event()
        self._sampler = None
        self._peak = 0

    def __enter__(self) -> "PeakRss":
        self.base = rss_kib(self.pid)
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
                fh.write("5")
            self._hwm = rss_kib(self.pid, "VmHWM") <= self.base + 1024
        except OSError:
            self._hwm = False
        if not self._hwm:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, KeyError, ValueError):
                self._peak = max(self._peak, rss_kib(self.pid))

    def __exit__(self, *exc) -> None:
        if self._hwm:
            peak = rss_kib(self.pid, "VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._peak
        self.growth = max(0, peak - self.base) * 1024


# --------------------------------------------------------------------------- #
# A raw HTTP client
# --------------------------------------------------------------------------- #

@dataclass
class Resp:
    status_line: str
    status: int
    headers: list[tuple[str, str]]           # names lower-case, in order
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def closes(self) -> bool:
        return "close" in (self.header("connection") or "").lower()

    def json(self) -> dict:
        return json.loads(self.body)


class Wire:
    """A client connection sending raw bytes and parsing the answers itself.

    response() returns a Resp, or a string when there is none: "eof" / "reset"
    (closed before an answer), "hang" (nothing within the timeout), or
    "garbage: ..." / "truncated: ..." (not a whole HTTP response)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False
        self.reset = False
        self.send_error: OSError | None = None

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> bool:
        """Send all of `data`; False if the server closed first (it may have
        answered already: read on)."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.send_error = exc
            return False

    def half_close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def _fill(self, deadline: float) -> bool:
        """Receive more; False at EOF or reset; TimeoutError at `deadline`."""
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            raise TimeoutError from None
        except ConnectionResetError:
            self.eof = self.reset = True
            return False
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self, deadline: float) -> bytes | None:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            if not self._fill(deadline):
                return None

    def _exactly(self, n: int, deadline: float) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill(deadline):
                return None
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def _closed_how(self) -> str:
        if self.buf:
            return f"truncated: {bytes(self.buf[:120])!r}"
        return "reset" if self.reset else "eof"

    def response(self, timeout: float = CASE_TIMEOUT, head: bool = False) -> "Resp | str":
        deadline = time.monotonic() + timeout
        try:
            line = self._line(deadline)
            if line is None:
                return self._closed_how()
            m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\r\n", line)
            if not m:
                return f"garbage: {line[:120]!r}"
            resp = Resp(line.decode("latin-1").rstrip("\r\n"), int(m.group(1)), [])
            while True:
                h = self._line(deadline)
                if h is None:
                    return f"truncated: {resp.status_line} and {len(resp.headers)} header(s)"
                if h == b"\r\n":
                    break
                name, colon, value = h.decode("latin-1").partition(":")
                if not colon:
                    return f"garbage header: {h[:120]!r}"
                resp.headers.append((name.lower(), value.strip()))
            if head or resp.status < 200 or resp.status in (204, 304):
                return resp
            if "chunked" in (resp.header("transfer-encoding") or "").lower():
                body = bytearray()
                while True:
                    size_line = self._line(deadline)
                    if size_line is None:
                        return f"truncated chunked body of {resp.status_line}"
                    size = int(size_line.split(b";")[0].strip(), 16)
                    if size == 0:
                        while self._line(deadline) not in (b"\r\n", None):
                            pass                  # trailer fields
                        break
                    chunk = self._exactly(size + 2, deadline)
                    if chunk is None:
                        return f"truncated chunked body of {resp.status_line}"
                    body += chunk[:-2]
                resp.body = bytes(body)
            elif resp.header("content-length") is not None:
                body = self._exactly(int(resp.header("content-length")), deadline)
                if body is None:
                    return f"truncated body of {resp.status_line}"
                resp.body = body
            else:
                while self._fill(deadline):
                    pass
                resp.body, self.buf = bytes(self.buf), bytearray()
            return resp
        except TimeoutError:
            return "hang" if not self.buf else f"hang after {bytes(self.buf[:120])!r}"

    def ending(self, timeout: float = CLOSED_WITHIN) -> str:
        """What follows the answers read so far: "eof", "reset", "open"
        (nothing within `timeout`) or "data: ..." (bytes nobody asked for)."""
        if self.buf:
            return f"data: {bytes(self.buf[:120])!r}"
        try:
            if not self._fill(time.monotonic() + timeout):
                return "reset" if self.reset else "eof"
        except TimeoutError:
            return "open"
        return f"data: {bytes(self.buf[:120])!r}"


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (what `curl https://` sends to a plain port)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="example")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# --------------------------------------------------------------------------- #
# The corpus
# --------------------------------------------------------------------------- #

LINE_LIMIT, FIELDS_LIMIT, FIELD_SIZE_LIMIT = 512, 20, 1024
CORPUS_ARGS = ["--limit-request-line", LINE_LIMIT, "--limit-request-fields", FIELDS_LIMIT,
               "--limit-request-field-size", FIELD_SIZE_LIMIT,
               "--header-timeout", "30s", "--keepalive", "1s"]

CLOSED, OPEN = "closed", "open"


@dataclass
class Case:
    """Bytes sent on a fresh connection, and what must come back: one status (or
    set of acceptable statuses) per answer, in order, then the connection
    CLOSED (EOF, or a reset once the answers are in) or OPEN (kept alive)."""
    payload: bytes
    expect: tuple
    end: str = CLOSED
    half_close: bool = False           # shut our sending side after the payload
    or_silent_close: bool = False      # a close with no answer at all is fine too
    check: Callable[[list[Resp]], None] | None = None
    head: bool = False                 # the first answer is to a HEAD request (no body)
    note: str = ""


def get(target: bytes = b"/whoami", *fields: bytes, version: bytes = b"HTTP/1.1",
        method: bytes = b"GET", host: bytes = HOST, body: bytes = b"") -> bytes:
    return method + b" " + target + b" " + version + b"\r\n" + host + b"".join(fields) + b"\r\n" + body


def post(*fields: bytes, body: bytes = b"", path: bytes = b"/echo",
         version: bytes = b"HTTP/1.1") -> bytes:
    return get(path, *fields, method=b"POST", version=version, body=body)


def chunked(body: bytes, path: bytes = b"/echo") -> bytes:
    return post(b"Transfer-Encoding: chunked\r\n", body=body, path=path)


def exact_line(limit: int) -> bytes:
    """A request line (CRLF not counted) exactly `limit` bytes long."""
    head, tail = b"GET /whoami?pad=", b" HTTP/1.1"
    line = head + b"a" * (limit - len(head) - len(tail)) + tail
    assert len(line) == limit
    return line


def exact_field(limit: int) -> bytes:
    """A field line (`Name: value`, CRLF not counted) exactly `limit` bytes long."""
    line = b"X-Pad: " + b"v" * (limit - len(b"X-Pad: "))
    assert len(line) == limit
    return line


def fields(n: int) -> bytes:
    """n header fields, Host included."""
    return HOST + b"".join(b"X-F%d: y\r\n" % i for i in range(n - 1))


def check_json(**want) -> Callable[[list[Resp]], None]:
    def check(resps: list[Resp]) -> None:
        got = resps[0].json()
        assert {k: got.get(k) for k in want} == want, got
    return check


def check_echo(*bodies: bytes) -> Callable[[list[Resp]], None]:
    def check(resps: list[Resp]) -> None:
        got = [r.json()["head"].encode("latin-1") for r in resps[:len(bodies)]]
        assert got == list(bodies)
    return check


TLS_HELLO = tls_client_hello()
OK = 200

CORPUS: dict[str, Case] = {
    # -- framing: Content-Length ------------------------------------------------
    "Content-Length +3": Case(post(b"Content-Length: +3\r\n", body=b"abc"), (400,)),
    "Content-Length 1_0": Case(post(b"Content-Length: 1_0\r\n", body=b"a" * 10), (400,)),
    "Content-Length 2**64 (overflow)": Case(post(b"Content-Length: 18446744073709551616\r\n"),
                                           (400,)),
    "Content-Length -5": Case(post(b"Content-Length: -5\r\n", body=b"abcde"), (400,)),
    "Content-Length abc": Case(post(b"Content-Length: abc\r\n"), (400,)),
    "Content-Length list '3, 3'": Case(post(b"Content-Length: 3, 3\r\n", body=b"abc"), (400,)),
    "Content-Length twice, same value": Case(
        post(b"Content-Length: 3\r\n", b"Content-Length: 3\r\n", body=b"abc"), (400,)),
    "Content-Length twice, different values": Case(
        post(b"Content-Length: 3\r\n", b"Content-Length: 5\r\n", body=b"abcde"), (400,)),
    "Content-Length then Transfer-Encoding (smuggling)": Case(
        post(b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\n"),
        (400,)),
    "Transfer-Encoding then Content-Length (smuggling)": Case(
        post(b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", body=b"0\r\n\r\n"),
        (400,)),
    # -- framing: Transfer-Encoding ---------------------------------------------
    "Transfer-Encoding \\x0bchunked": Case(
        post(b"Transfer-Encoding: \x0bchunked\r\n", body=b"0\r\n\r\n"), (400,)),
    "Transfer-Encoding chunked\\x0c": Case(
        post(b"Transfer-Encoding: chunked\x0c\r\n", body=b"0\r\n\r\n"), (400,)),
    "Transfer-Encoding gzip": Case(post(b"Transfer-Encoding: gzip\r\n", body=b"0\r\n\r\n"),
                                   (501,)),
    "Transfer-Encoding gzip, chunked": Case(
        post(b"Transfer-Encoding: gzip, chunked\r\n", body=b"0\r\n\r\n"), (501,)),
    "Transfer-Encoding identity": Case(post(b"Transfer-Encoding: identity\r\n"), (501,)),
    "Transfer-Encoding chunked twice": Case(
        post(b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: chunked\r\n",
             body=b"0\r\n\r\n"), ({400, 501},),
        note="two fields make 'chunked, chunked': not exactly chunked (501), or llhttp's 400"),
    "Transfer-Encoding on HTTP/1.0": Case(
        post(b"Transfer-Encoding: chunked\r\n", body=b"0\r\n\r\n", version=b"HTTP/1.0"), (400,)),
    # -- framing: chunks --------------------------------------------------------
    "chunk size not hex": Case(chunked(b"zz\r\nhello\r\n0\r\n\r\n"), (400,)),
    "chunk data longer than its size": Case(chunked(b"5\r\nhelloXX\r\n0\r\n\r\n"), (400,)),
    "chunk size overflow": Case(chunked(b"f" * 40 + b"\r\nx\r\n0\r\n\r\n"), (400,)),
    "chunk size negative": Case(chunked(b"-5\r\nhello\r\n0\r\n\r\n"), (400,)),
    "long chunk extension": Case(chunked(b"5;" + b"e" * 10000 + b"\r\nhello\r\n0\r\n\r\n"),
                                 ({200, 400},), end=None,
                                 note="valid syntax; the contract sets no limit on extensions"),
    "body ends inside a chunk (EOF)": Case(chunked(b"10\r\nshort"), (400,), half_close=True,
                                           or_silent_close=True),
    "body shorter than Content-Length (EOF)": Case(
        post(b"Content-Length: 10\r\n", body=b"abc"), (400,), half_close=True,
        or_silent_close=True),
    "EOF inside the headers": Case(b"GET /whoami HTTP/1.1\r\n" + HOST, (400,), half_close=True,
                                   or_silent_close=True),
    # -- syntax -----------------------------------------------------------------
    "bare LF line ends": Case(b"GET /whoami HTTP/1.1\n" + b"Host: example\n\n", (400,)),
    "bare LF after a header": Case(b"GET /whoami HTTP/1.1\r\nHost: example\nX-A: b\r\n\r\n",
                                   (400,)),
    "bare CR in a header": Case(get(b"/whoami", b"X-A: b\rX-B: c\r\n"), (400,)),
    "bare CR line ends": Case(b"GET /whoami HTTP/1.1\rHost: example\r\r\n", (400,)),
    "NUL in the request line": Case(get(b"/who\x00ami"), (400,)),
    "NUL in a header name": Case(get(b"/whoami", b"X\x00A: b\r\n"), (400,)),
    "NUL in a header value": Case(get(b"/whoami", b"X-A: b\x00c\r\n"), (400,)),
    "obs-fold continuation line": Case(get(b"/whoami", b"X-A: b\r\n", b"  folded\r\n"), (400,)),
    "whitespace before colon": Case(get(b"/whoami", b"X-A : b\r\n"), (400,)),
    "header without colon": Case(get(b"/whoami", b"NoColonHere\r\n"), (400,)),
    "header name not a token": Case(get(b"/whoami", b"Bad[Name]: b\r\n"), (400,)),
    "empty header name": Case(get(b"/whoami", b": b\r\n"), (400,)),
    "invalid method": Case(get(method=b"G@T"), (400,)),
    "unknown method": Case(get(method=b"BREW"), (400,)),
    "request line of four words": Case(b"GET /whoami HTTP/1.1 extra\r\n" + HOST + b"\r\n", (400,)),
    "method only": Case(b"GET\r\n\r\n", (400,)),
    "NUL bytes only": Case(b"\x00" * 64 + b"\r\n\r\n", (400,)),
    "TLS ClientHello": Case(TLS_HELLO, (400,),
                            note="at once, not after header_timeout (30 s here)"),
    # -- versions ---------------------------------------------------------------
    "HTTP/2.0": Case(get(version=b"HTTP/2.0"), ({400, 505},)),
    "HTTP/9.9": Case(get(version=b"HTTP/9.9"), ({400, 505},)),
    "HTTP/0.9 request line": Case(b"GET /whoami\r\n", ({400, 505},),
                                  note="all an HTTP/0.9 client sends; llhttp waits for more"),
    "HTTP/0.9 request line and a blank line": Case(b"GET /whoami\r\n\r\n", ({400, 505},)),
    "HTTP/1.x": Case(get(version=b"HTTP/1.x"), ({400, 505},)),
    "FOO/1.1": Case(get(version=b"FOO/1.1"), ({400, 505},)),
    # -- Host ---------------------------------------------------------------------
    "HTTP/1.1 without Host": Case(get(host=b""), (400,)),
    "two Host fields": Case(get(b"/whoami", b"Host: other\r\n"), (400,)),
    "HTTP/1.0 without Host": Case(get(host=b"", version=b"HTTP/1.0"), (OK,),
                                  note="HTTP/1.0 needs no Host; closed after the response"),
    # -- Expect -------------------------------------------------------------------
    "Expect: other than 100-continue": Case(
        post(b"Content-Length: 5\r\n", b"Expect: 200-ok\r\n", body=b"hello"), (417,)),
    # -- limits, at and one past the boundary -------------------------------------
    "request line exactly limit_request_line": Case(exact_line(LINE_LIMIT) + b"\r\n" + HOST + b"\r\n",
                                                    (OK,), end=OPEN),
    "request line one over limit_request_line": Case(
        exact_line(LINE_LIMIT + 1) + b"\r\n" + HOST + b"\r\n", (414,)),
    "request line of 100 KiB": Case(b"GET /" + b"a" * 100 * 1024 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
                                    (414,)),
    "field exactly limit_request_field_size": Case(
        get(b"/whoami", exact_field(FIELD_SIZE_LIMIT) + b"\r\n"), (OK,), end=OPEN),
    "field one over limit_request_field_size": Case(
        get(b"/whoami", exact_field(FIELD_SIZE_LIMIT + 1) + b"\r\n"), (431,)),
    "field of 100 KiB": Case(get(b"/whoami", b"X-Big: " + b"v" * 100 * 1024 + b"\r\n"), (431,)),
    "exactly limit_request_fields fields": Case(get(host=fields(FIELDS_LIMIT)), (OK,), end=OPEN),
    "one field over limit_request_fields": Case(get(host=fields(FIELDS_LIMIT + 1)), (431,)),
    "5000 fields": Case(get(host=fields(5000)), (431,)),
    # -- accepted forms -----------------------------------------------------------
    "absolute-form target": Case(get(b"http://example/whoami?q=1"), (OK,), end=OPEN,
                                 check=check_json(path="/whoami", query="q=1")),
    "absolute-form target with a port": Case(get(b"http://example:8080/whoami?a=b&c=d"), (OK,),
                                             end=OPEN,
                                             check=check_json(path="/whoami", query="a=b&c=d")),
    "empty lines before the request line": Case(b"\r\n\r\n" + get(), (OK,), end=OPEN,
                                                note="RFC 9112 2.2: SHOULD be ignored"),
    "Connection: close": Case(get(b"/whoami", b"Connection: close\r\n"), (OK,),
                              check=lambda rs: rs[0].closes() or pytest.fail(
                                  f"no Connection: close in {rs[0].headers}")),
    "HEAD with a body, then a request": Case(
        get(b"/whoami", b"Content-Length: 5\r\n", method=b"HEAD", body=b"abcde") + get(),
        (OK, OK), end=OPEN, head=True,
        note="the body is framed by Content-Length (never read as the next request)"),
    "chunked body": Case(chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), (OK,), end=OPEN,
                         check=check_echo(b"hello world")),
    "chunked body with trailer fields": Case(chunked(b"5\r\nhello\r\n0\r\nX-T: y\r\n\r\n"), (OK,),
                                             end=OPEN, check=check_echo(b"hello")),
    # -- keep-alive and pipelining ------------------------------------------------
    "pipelined good requests": Case(get() * 3, (OK, OK, OK), end=OPEN),
    "pipelined good, good, garbage": Case(get() + get() + b"\x16\x03\x01garbage\r\n\r\n",
                                          (OK, OK, 400)),
    "pipelined bodies": Case(post(b"Content-Length: 5\r\n", body=b"hello")
                             + chunked(b"3\r\nabc\r\n0\r\n\r\n") + get(), (OK, OK, OK), end=OPEN,
                             check=check_echo(b"hello", b"abc")),
    "small unread body is discarded": Case(
        post(b"Content-Length: 1000\r\n", body=b"x" * 1000, path=b"/ignore") + get(), (OK, OK),
        end=OPEN, check=lambda rs: rs[1].json()["path"] == "/whoami" or pytest.fail(rs[1].body)),
    "HTTP/1.0 keep-alive": Case(get(b"/whoami", b"Connection: keep-alive\r\n", version=b"HTTP/1.0")
                                * 2, (OK, OK), end=OPEN),
    "HTTP/1.0 closes by default": Case(get(version=b"HTTP/1.0") * 2, (OK,)),
}


def run_case(served: Served, case: Case) -> tuple[list[Resp], str, str, float]:
    """Send a case on a fresh connection. Returns (answers, why they stopped,
    how the connection continued, seconds to the last answer)."""
    with served.wire() as w:
        t0 = time.monotonic()
        w.send(case.payload)
        if case.half_close:
            w.half_close()
        resps: list[Resp] = []
        stopped = ""
        for i, _ in enumerate(case.expect):
            r = w.response(CASE_TIMEOUT, head=case.head and i == 0)
            if not isinstance(r, Resp):
                stopped = r
                break
            resps.append(r)
        elapsed = time.monotonic() - t0
        if stopped:
            end = ""
        else:
            closes = case.end == CLOSED or (case.end is None and resps[-1].status >= 400)
            end = w.ending(CLOSED_WITHIN if closes else 0.3)
    return resps, stopped, end, elapsed


def case_problems(case: Case, resps: list[Resp], stopped: str, end: str) -> list[str]:
    statuses = [r.status for r in resps]
    if stopped:
        if case.or_silent_close and not resps and stopped in ("eof", "reset"):
            return []
        return [f"answers {statuses}, then {stopped} (expected {list(case.expect)})"]
    problems = []
    for got, want in zip(statuses, case.expect):
        if got != want and not (isinstance(want, set) and got in want):
            problems.append(f"answers {[r.status_line for r in resps]}, expected {list(case.expect)}")
            break
    for r in resps:
        if r.status >= 400 and not r.closes():
            problems.append(f"{r.status_line} without Connection: close: {r.headers}")
    final = resps[-1].status if resps else None
    want_end = case.end
    if want_end is None:                               # follows the answer
        want_end = CLOSED if final is None or final >= 400 else None
    if want_end == CLOSED and end not in ("eof", "reset"):
        problems.append(f"after the answers the connection is {end}, expected closed")
    if want_end == OPEN and end != "open":
        problems.append(f"after the answers the connection is {end}, expected kept open")
    if not problems and case.check is not None:
        case.check(resps)
    return problems


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("corpus"), CORPUS_ARGS, "corpus") as served:
        yield served


@pytest.fixture
def corpus(request, corpus_server):
    show_log_on_failure(request, corpus_server)
    return corpus_server


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus(corpus, name):
    case = CORPUS[name]
    mark = corpus.log_mark()
    resps, stopped, end, elapsed = run_case(corpus, case)
    problems = case_problems(case, resps, stopped, end)
    assert problems == [], f"{name}: " + "; ".join(problems) + (f" ({case.note})" if case.note else "")
    # Answered at once: the server holds 30 s for missing headers, this is well before.
    assert elapsed < CASE_TIMEOUT
    corpus.assert_unchanged(mark)


def test_expect_100_continue_within_limits(corpus):
    mark = corpus.log_mark()
    with corpus.wire() as w:
        w.send(post(b"Content-Length: 5\r\n", b"Expect: 100-continue\r\n"))
        interim = w.response()
        assert isinstance(interim, Resp) and interim.status == 100, interim
        w.send(b"hello")
        r = w.response()
        assert isinstance(r, Resp) and r.status == 200, r
        assert r.json()["head"] == "hello"
        assert w.ending(0.3) == "open"
    corpus.assert_unchanged(mark)


def test_keepalive_idle_connection_closed(corpus):
    """keepalive 1 s, header_timeout 30 s: an idle keep-alive connection is closed
    (plainly, no 408); a connection that has sent nothing yet is governed by
    header_timeout, and outlives it."""
    fresh = corpus.wire()
    try:
        with corpus.wire() as w:
            for _ in range(3):              # back to back: one connection serves them all
                w.send(get())
                r = w.response()
                assert isinstance(r, Resp) and r.status == 200 and r.json()["pid"] == corpus.pid
            # Idle: the server ends the connection (a plain close, no 408).
            assert w.ending(20) in ("eof", "reset")
        fresh.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            fresh.sock.recv(1)              # still open, nothing sent: header_timeout not reached
        fresh.sock.settimeout(10)
        fresh.send(get(b"/whoami", b"Connection: close\r\n"))
        r = fresh.response()
        assert isinstance(r, Resp) and r.status == 200 and r.json()["pid"] == corpus.pid
    finally:
        fresh.close()


def test_corpus_leaves_rss_flat(corpus):
    """1,000 more invalid requests after a warm-up cost next to no memory: one
    traceback chain kept per refused request (handler frames, buffers) was
    ~4 KiB each, several MiB per thousand."""
    names = [n for n, c in CORPUS.items() if any(
        (s if isinstance(s, int) else min(s)) >= 400 for s in c.expect)]

    def hammer(n: int) -> None:
        for i in range(n):
            with corpus.wire() as w:
                w.send(CORPUS[names[i % len(names)]].payload)
                w.half_close()               # every case ends at once, answered or not
                while isinstance(r := w.response(CASE_TIMEOUT), Resp):
                    pass
                assert w.eof, f"{names[i % len(names)]}: {r}"

    hammer(200)
    before = rss_kib(corpus.pid)
    hammer(1000)
    growth = (rss_kib(corpus.pid) - before) * 1024
    print(f"RSS {before / 1024:.1f} MiB before 1000 invalid requests, {growth / 1024:+.0f} KiB after")
    assert growth < 2 * MIB, f"RSS grew {growth / MIB:.1f} MiB over 1000 invalid requests"
    corpus.assert_unchanged()


# --------------------------------------------------------------------------- #
# Bounds: timeouts and body limits
# --------------------------------------------------------------------------- #

BODY_TIMEOUT = 2.0
BODY_LIMIT = MIB
BOUNDS_ARGS = ["--header-timeout", "2s", "--body-timeout", f"{BODY_TIMEOUT:g}s",
               "--limit-request-body", "1MiB"]
RSS_BOUND = 32 * MIB      # what a request may add at its peak; a 200 MB body buffered is far over


@pytest.fixture(scope="module")
def bounds_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("bounds"), BOUNDS_ARGS, "bounds") as served:
        yield served


@pytest.fixture
def bounds(request, bounds_server):
    show_log_on_failure(request, bounds_server)
    return bounds_server


def assert_error_answer(w: Wire, r, status: int) -> None:
    assert isinstance(r, Resp), f"expected {status}, got {r}"
    assert r.status == status, f"expected {status}, got {r.status_line}"
    assert r.closes(), f"{r.status_line} without Connection: close: {r.headers}"
    assert w.ending() in ("eof", "reset"), "the connection stayed open after the error answer"


def test_slowloris_gets_408_after_header_timeout(bounds):
    """header_timeout 2 s: a request line or headers dribbled a byte every
    0.3 s are answered 408 (and closed) long before they are complete."""
    mark = bounds.log_mark()
    cases = {                                   # name -> (sent at once, then dribbled)
        "request line": (b"", get()),
        "headers": (b"GET /whoami HTTP/1.1\r\n" + HOST,
                    b"".join(b"X-Padding-%d: some value\r\n" % i for i in range(10)) + b"\r\n"),
    }

    def attack(prefix: bytes, trickle: bytes):
        with bounds.wire(timeout=30) as w:
            if prefix:
                w.send(prefix)
            sent = 0
            for i in range(len(trickle)):
                if not w.send(trickle[i:i + 1]):
                    break
                sent += 1
                if select.select([w.sock], [], [], 0.3)[0]:
                    break
            r = w.response(10)
            return sent, len(trickle), r, (w.ending() if isinstance(r, Resp) else "")

    threads = {name: Bg(lambda p=p, t=t: attack(p, t)) for name, (p, t) in cases.items()}
    # A connection that sends nothing at all is also closed (with or without a 408).
    with bounds.wire(timeout=30) as silent:
        r = silent.response(15)
        assert r in ("eof", "reset") or (isinstance(r, Resp) and r.status == 408), r
    for name, t in threads.items():
        sent, total, r, end = t.value(60)
        assert sent < total, f"{name}: the whole request was sent before the server answered"
        assert isinstance(r, Resp) and r.status == 408, f"{name}: {r} after {sent} bytes"
        assert r.closes(), f"{name}: 408 without Connection: close"
        assert end in ("eof", "reset"), f"{name}: {end} after the 408"
    bounds.assert_unchanged(mark)


def test_stalled_body_gets_408_after_body_timeout(bounds):
    """An app reading a body that stops coming: 408 once body_timeout passes
    with no progress (the response has not started)."""
    mark = bounds.log_mark()
    with bounds.wire(timeout=30) as w:
        t0 = time.monotonic()
        w.send(post(b"Content-Length: 1000000\r\n", body=b"x" * 1000))
        r = w.response(15 + BODY_TIMEOUT)
        elapsed = time.monotonic() - t0
        assert_error_answer(w, r, 408)
    print(f"408 after {elapsed:.1f}s (body_timeout {BODY_TIMEOUT}s)")
    bounds.assert_unchanged(mark)


def test_stalled_body_of_app_not_reading_is_not_held(bounds):
    """An app that answers without reading the body: the answer goes out, and the
    connection (a body of 1 MB still to come, none of it sent) is closed, not
    held waiting for it: at once (over 64 KiB unread) or at body_timeout."""
    mark = bounds.log_mark()
    with bounds.wire(timeout=30) as w:
        w.send(post(b"Content-Length: 1000000\r\n", path=b"/ignore"))
        r = w.response(10)
        assert isinstance(r, Resp) and r.status == 200, r
        t0 = time.monotonic()
        end = w.ending(BODY_TIMEOUT + 5)
        elapsed = time.monotonic() - t0
    assert end in ("eof", "reset"), f"connection {end} {elapsed:.1f}s after the answer"
    print(f"closed {elapsed:.1f}s after the answer")
    bounds.assert_unchanged(mark)


def test_slow_body_that_progresses_is_not_timed_out(bounds):
    """body_timeout bounds a read making no progress, not the whole body: six
    bytes 0.7 s apart (4.2 s in all, over body_timeout) are read and answered."""
    with bounds.wire(timeout=30) as w:
        w.send(post(b"Content-Length: 6\r\n"))
        for byte in b"abcdef":
            time.sleep(0.7)
            assert w.send(bytes([byte])), "closed while the body was still coming"
        r = w.response(10)
        assert isinstance(r, Resp) and r.status == 200, r
        assert r.json()["head"] == "abcdef"
    bounds.assert_unchanged()


def test_stalled_response_write_is_closed(bounds):
    """A client that reads nothing of a 32 MiB response: once body_timeout
    passes with no write progress the connection ends (a plain close: the
    response had started), rather than holding the worker's buffers forever."""
    mark = bounds.log_mark()
    with bounds.wire(timeout=30, rcvbuf=65536) as w:
        w.send(get(b"/big?mb=32"))
        time.sleep(BODY_TIMEOUT + 3)
        # Now read: what was in flight, then the end of the connection.
        total, how = 0, "open"
        deadline = time.monotonic() + 20
        w.sock.settimeout(5)
        while time.monotonic() < deadline:
            try:
                data = w.sock.recv(1 << 20)
            except (socket.timeout, TimeoutError):
                break
            except ConnectionResetError:
                how = "reset"
                break
            if not data:
                how = "eof"
                break
            total += len(data)
    assert how in ("eof", "reset"), f"still open after {total} bytes"
    assert total < 32 * MIB, f"the whole response ({total} bytes) arrived: nothing was cut"
    print(f"cut after {total / MIB:.1f} MiB of 32")
    bounds.assert_unchanged(mark)


def test_chunked_body_over_limit_gets_413_and_rss_stays_bounded(bounds):
    """200 MB chunked at an app that reads it all, limit_request_body 1 MiB: the
    app's read fails past the limit, the answer is 413, nothing like the body
    is ever held in memory."""
    mark = bounds.log_mark()
    piece = b"%x\r\n" % (64 * 1024) + b"x" * (64 * 1024) + b"\r\n"
    with bounds.wire(timeout=30) as w, PeakRss(bounds.pid) as peak:
        w.send(post(b"Transfer-Encoding: chunked\r\n"))
        out = w.sock.dup()                   # its own timeout; shut down below
        stop = threading.Event()

        def send_all() -> int:
            sent = 0
            out.settimeout(30)
            try:
                while sent < 200_000_000 and not stop.is_set():
                    out.sendall(piece)
                    sent += len(piece)
                out.sendall(b"0\r\n\r\n")
            except OSError:
                pass
            return sent

        sender = Bg(send_all)
        try:
            r = w.response(30)
            assert_error_answer(w, r, 413)
        finally:
            stop.set()
            with contextlib.suppress(OSError):
                w.sock.shutdown(socket.SHUT_RDWR)
            sent = sender.value(30)
            out.close()
    print(f"413 after {sent / MIB:.1f} MiB sent; peak RSS growth {peak.growth / MIB:.1f} MiB")
    assert peak.growth < RSS_BOUND, f"RSS grew {peak.growth / MIB:.1f} MiB for a refused body"
    bounds.assert_unchanged(mark)


@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100-continue"])
def test_content_length_over_limit_gets_413_and_app_not_called(bounds, expect_continue):
    mark = bounds.log_mark()
    before = bounds.calls("/echo")
    extra = b"Expect: 100-continue\r\n" if expect_continue else b""
    with bounds.wire() as w:
        w.send(post(b"Content-Length: 200000000\r\n", extra))
        r = w.response()                     # the first answer: 413, no 100 Continue first
        assert_error_answer(w, r, 413)
    with bounds.wire() as w:
        w.send(post(b"Content-Length: %d\r\n" % (BODY_LIMIT + 1), extra))
        assert_error_answer(w, w.response(), 413)
    assert bounds.calls("/echo") == before, "the app was called for a body over the limit"
    bounds.assert_unchanged(mark)


def test_content_length_at_limit_is_accepted(bounds):
    body = bytes(range(256)) * (BODY_LIMIT // 256)
    with bounds.wire() as w:
        w.send(post(b"Content-Length: %d\r\n" % BODY_LIMIT, body=body))
        r = w.response()
        assert isinstance(r, Resp) and r.status == 200, r
        assert r.json()["length"] == BODY_LIMIT
    bounds.assert_unchanged()


# --------------------------------------------------------------------------- #
# worker_connections and the open-files limit
# --------------------------------------------------------------------------- #


def answered(wires: list[Wire], within: float) -> set[int]:
    """Indexes of the wires with a complete 200 answer within `within` seconds."""
    done: set[int] = set()
    deadline = time.monotonic() + within
    while len(done) < len(wires):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        waiting = {w.sock: i for i, w in enumerate(wires) if i not in done}
        ready, _, _ = select.select(list(waiting), [], [], left)
        for sock in ready:
            i = waiting[sock]
            r = wires[i].response(5)
            assert isinstance(r, Resp) and r.status == 200, f"connection {i}: {r}"
            done.add(i)
    return done


def test_worker_connections_leaves_the_rest_in_the_backlog(testbed, ipserve):
    """worker_connections 20: of 40 connections the worker takes 20; the other
    20 are not refused, they wait in the kernel's backlog (their handshake is
    complete, their request sent) and are served once connections end."""
    limit = 20
    srv = ipserve(server_args(["--worker-connections", limit, "--header-timeout", "60s",
                               "--keepalive", "60s"]))
    pid = wait_routed(srv)[0]["pid"]
    src = testbed.client_ips[0]
    wires = [Wire(tcp_connect(testbed.client_ns, src, testbed.server_ip, PORT, timeout=10))
             for _ in range(2 * limit)]
    try:
        time.sleep(0.5)                      # let the worker take what it will
        for w in wires:
            assert w.send(get()), "a connection was refused or reset"
        first = answered(wires, 2.0)
        assert 0 < len(first) <= limit, f"{len(first)} of {len(wires)} served at once"
        st = srv.status()
        held = [w["connections"] for w in st["workers"] if w["pid"] == pid]
        assert held and held[0] <= limit, f"the worker holds {held} connections"
        waiting = [w for i, w in enumerate(wires) if i not in first]
        for i in first:                      # keep-alive: still open, still counted
            wires[i].close()
        rest = answered(waiting, 10.0)
        assert len(rest) == len(waiting), \
            f"{len(waiting) - len(rest)} waiting connections never served"
    finally:
        for w in wires:
            w.close()
    st = srv.status()
    assert routed_workers(st, 1)[0]["pid"] == pid
    assert "Traceback" not in srv.log_text()


EMFILE_WORDS = re.compile(r"(?i)emfile|too many open files|open files|file descriptors|nofile")


def test_open_files_limit_is_logged_once_without_traceback(testbed, ipserve):
    """A worker out of file descriptors (its limit lowered to 256, 400 clients
    connected) says so in at most one line, with no traceback, keeps the rest
    waiting in the backlog, and serves them once descriptors are free."""
    srv = ipserve(server_args(["--header-timeout", "30s"]))
    pid = wait_routed(srv)[0]["pid"]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (256, 256))
    mark = len(srv.own_lines())
    wires: list[Wire] = []
    try:
        for i in range(400):
            src = testbed.client_ips[i % len(testbed.client_ips)]
            wires.append(Wire(tcp_connect(testbed.client_ns, src, testbed.server_ip, PORT,
                                          timeout=10)))
        time.sleep(2.0)                      # the worker meets its limit meanwhile
        for w in wires[:350]:
            w.close()
        last = wires[350:]
        for w in last:
            assert w.send(get()), "a connection was refused or reset"
        served = answered(last, 15.0)
        assert len(served) == len(last), f"{len(last) - len(served)} connections never served"
    finally:
        for w in wires:
            w.close()
    new = srv.own_lines()[mark:]
    about = [line for line in new if EMFILE_WORDS.search(line)]
    assert not any("Traceback" in line for line in new), "\n".join(new[-40:])
    assert len(about) <= 1, "\n".join(about[:20])
    assert len(new) <= 5, "\n".join(new[:40])
    st = srv.status()
    assert routed_workers(st, 1)[0]["pid"] == pid
