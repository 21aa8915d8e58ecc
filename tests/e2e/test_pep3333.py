"""End-to-end PEP 3333 conformance: what a WSGI app sees and what goes on the wire.

One ipserve (one worker, v4 and v6 binds) serves tests/apps/pep3333.py for the
whole module; the app runs under wsgiref.validate (tests/apps/wsgi_validate.py),
so every request also checks the environ, start_response, write() and the
body iterable the server hands over. Clients are raw sockets in the client
namespace: the exact bytes on the wire are asserted, not what an HTTP library
makes of them.

After each test the part of the server's log it produced must hold no
"AssertionError" (a wsgiref.validate failure: a 500 and a traceback, or an
iterable garbage-collected without close()), except in the test that provokes
one on purpose.

Waits are bounded polls (a socket timeout, a count that must reach a value);
no test compares a duration with a threshold.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import os
import socket
import struct
import sys
import time
import uuid
from dataclasses import dataclass

import pytest
from conftest import NEEDS_ROOT

import netns

sys.path.insert(0, os.path.join(netns.REPO_ROOT, "tests", "apps"))
from pep3333 import DATE, SERVER, file_bytes  # noqa: E402  (the app's own constants)

PORT = 8000
APP = os.path.join(netns.REPO_ROOT, "tests", "apps", "pep3333.py") + ":application"
TIMEOUT = 10            # a bound on every socket wait: a hang fails, nothing is timed


# --------------------------------------------------------------------------- #
# The server, once for the module
# --------------------------------------------------------------------------- #

@dataclass
class Served:
    tb: netns.Testbed
    srv: netns.IpserveProcess

    @property
    def src(self) -> str:
        return self.tb.client_ips[0]

    def connect(self, v6: bool = False) -> Conn:
        src = self.tb.client_ips6[0] if v6 else self.src
        dst = self.tb.server_ip6 if v6 else self.tb.server_ip
        return Conn(netns.tcp_connect(self.tb.client_ns, src, dst, PORT, timeout=TIMEOUT))

    def log_size(self) -> int:
        return os.path.getsize(self.srv.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.srv.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def wait_log_since(self, offset: int, text: str, timeout: float = 15) -> str:
        """Bounded wait until `text` is in the log written since `offset`."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log_since(offset)
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise self.srv.error(f"{text!r} not logged within {timeout}s")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    log = tmp_path_factory.mktemp("pep3333") / "ipserve.log"
    tb = netns.Testbed()
    try:
        srv = netns.start_ipserve(tb, [APP, "-w", "1", "-b", f"0.0.0.0:{PORT}",
                                       "-b", f"[::]:{PORT}", "--graceful-timeout", "1"],
                                  log_path=str(log))
        try:
            srv.wait_ready(1)
            yield Served(tb, srv)
        finally:
            srv.cleanup(kill_namespace=True)
    finally:
        tb.close()


def _report_key(config):
    """conftest's stash key: a failing test's report then carries the log tail."""
    for plugin in config.pluginmanager.get_plugins():
        key = getattr(plugin, "_ipserve_key", None)
        if isinstance(key, pytest.StashKey):
            return key
    return None


@pytest.fixture
def lint_expected():
    """Request this fixture to allow AssertionError in the log (one test does)."""
    return True


@pytest.fixture(autouse=True)
def no_validator_errors(request, served):
    key = _report_key(request.config)
    if key is not None:
        request.node.stash[key] = [served.srv]
    start = served.log_size()
    yield
    if "lint_expected" in request.fixturenames:
        return
    log = served.log_since(start)
    assert "AssertionError" not in log, f"wsgiref.validate failed in the worker:\n{log[-4000:]}"


# --------------------------------------------------------------------------- #
# A raw HTTP/1.x client
# --------------------------------------------------------------------------- #

@dataclass
class Response:
    raw: bytes                           # every byte this response took on the wire
    status_line: bytes
    headers: list[tuple[bytes, bytes]]   # as received: names not case-folded
    body: bytes                          # de-chunked
    chunked: bool

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])

    def values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k.lower() == key]

    def one(self, name: str) -> str:
        values = self.values(name)
        assert len(values) == 1, f"{name}: {values} in {self.raw[:600]!r}"
        return values[0]

    def has(self, name: str) -> bool:
        return bool(self.values(name))

    def json(self):
        assert self.status == 200, self.raw[:2000]
        return json.loads(self.body)


class Conn:
    """A client socket with a read buffer; responses are parsed from exact bytes."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str, target: str, headers=(), body: bytes | None = None,
                version: str = "HTTP/1.1", host: bool = True) -> None:
        lines = [f"{method} {target} {version}".encode()]
        if host and version == "HTTP/1.1":
            lines.append(b"Host: pep3333.test")
        for name, value in headers:
            lines.append(f"{name}: {value}".encode("latin-1"))
        if body is not None and not any(n.lower() in ("content-length", "transfer-encoding")
                                        for n, _ in headers):
            lines.append(f"Content-Length: {len(body)}".encode())
        self.send(b"\r\n".join(lines) + b"\r\n\r\n" + (body or b""))

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError(f"connection closed in a line: {self.buf!r}")
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def read_response(self, method: str = "GET") -> Response:
        raw = b""
        status_line = self.read_line()
        raw += status_line
        headers = []
        while True:
            line = self.read_line()
            raw += line
            if line == b"\r\n":
                break
            name, sep, value = line[:-2].partition(b":")
            assert sep, f"bad header line {line!r}"
            headers.append((name, value.strip()))
        resp = Response(raw, status_line[:-2], headers, b"", False)
        code = resp.status
        if method == "HEAD" or 100 <= code < 200 or code in (204, 304):
            return resp
        if any(v.lower() == "chunked" for v in resp.values("Transfer-Encoding")):
            resp.chunked = True
            while True:
                size_line = self.read_line()
                raw += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:                           # trailers, then the empty line
                        line = self.read_line()
                        raw += line
                        if line == b"\r\n":
                            break
                    break
                data = self._take(size + 2)
                assert data.endswith(b"\r\n"), data[-10:]
                raw += data
                resp.body += data[:-2]
        elif resp.has("Content-Length"):
            resp.body = self._take(int(resp.one("Content-Length")))
            raw += resp.body
        else:
            resp.body = self.read_to_eof()
            raw += resp.body
        resp.raw = raw
        return resp

    def read_to_eof(self) -> bytes:
        """Everything until the server closes (a TIMEOUT-bounded wait for each read)."""
        while self._fill():
            pass
        out, self.buf = self.buf, b""
        return out

    def closed_by_server(self) -> bool:
        """True if the server closes the connection with nothing more sent."""
        try:
            rest = self.read_to_eof()
        except ConnectionResetError:
            return True
        assert rest == b"", f"bytes after the response: {rest[:300]!r}"
        return True

    def next_response_or_close(self, method: str, target: str) -> Response | None:
        """Send a request; its response, or None if the server closed the
        connection without sending a byte more."""
        try:
            self.request(method, target)
            return self.read_response(method)
        except (EOFError, ConnectionResetError, BrokenPipeError):
            assert self.buf == b"", f"bytes before the close: {self.buf[:300]!r}"
            return None

    def roundtrip(self, method: str, target: str, headers=(), body=None,
                  version: str = "HTTP/1.1") -> Response:
        self.request(method, target, headers, body, version)
        return self.read_response(method)


def get_env(served: Served, target: str = "/env", headers=(), body=None, method: str = "GET",
            version: str = "HTTP/1.1", v6: bool = False) -> tuple[dict, Conn]:
    conn = served.connect(v6=v6)
    resp = conn.roundtrip(method, target, headers, body, version)
    return resp.json(), conn


def value(env: dict, key: str):
    """The value of environ[key] (KeyError if the server did not set it)."""
    return env[key][1]


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def token() -> str:
    return uuid.uuid4().hex


def closes(served: Served, tok: str) -> int:
    with served.connect() as conn:
        return conn.roundtrip("GET", f"/count?token={tok}").json()["closes"]


def wait_closes(served: Served, tok: str, want: int = 1, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = closes(served, tok)
        if n >= want or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


# --------------------------------------------------------------------------- #
# environ
# --------------------------------------------------------------------------- #

def test_environ_required_keys_and_types(served):
    env, conn = get_env(served, "/env/a%20b/caf%C3%A9/x+y?q=a%20b&r=%C3%A9&empty=",
                        [("X-Custom-Thing", "Mixed Case Value")])
    local_port = conn.sock.getsockname()[1]
    conn.close()
    assert env["_environ_type"] == "dict"
    expect = {
        "REQUEST_METHOD": ["str", "GET"],
        "SCRIPT_NAME": ["str", ""],
        # percent-decoded, then the bytes taken as latin-1 (%C3%A9 is two characters)
        "PATH_INFO": ["str", "/env/a b/caf\u00c3\u00a9/x+y"],
        "QUERY_STRING": ["str", "q=a%20b&r=%C3%A9&empty="],          # as sent, not decoded
        "SERVER_PROTOCOL": ["str", "HTTP/1.1"],
        "HTTP_HOST": ["str", "pep3333.test"],
        "HTTP_X_CUSTOM_THING": ["str", "Mixed Case Value"],
        "wsgi.version": ["tuple", [1, 0]],
        "wsgi.url_scheme": ["str", "http"],
        "wsgi.multithread": ["bool", False],
        "wsgi.run_once": ["bool", False],
        "wsgi.input_terminated": ["bool", True],
        "REMOTE_ADDR": ["str", served.src],
        "REMOTE_PORT": ["str", str(local_port)],
    }
    assert {k: env.get(k) for k in expect} == expect
    for key in ("SERVER_NAME", "SERVER_PORT"):
        assert env[key][0] == "str" and env[key][1], (key, env[key])
    assert env["SERVER_PORT"][1].isdigit(), env["SERVER_PORT"]
    assert env["_input_methods"] == ["read", "readline", "readlines", "__iter__"]
    assert env["_errors_methods"] == ["write", "writelines", "flush"]
    assert env["wsgi.input"][0] != "NoneType" and env["wsgi.errors"][0] != "NoneType"
    # No body: no CONTENT_TYPE / CONTENT_LENGTH at all (not even empty), never HTTP_CONTENT_*.
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH", "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH"):
        assert key not in env, (key, env[key])
    for key, described in env.items():
        if "." not in key and not key.startswith("_"):
            assert described[0] == "str", (key, described)   # CGI keys are native strings


def test_environ_multiprocess_true(served):
    # A pre-fork server: several processes serve the same app.
    env, conn = get_env(served)
    conn.close()
    assert env["wsgi.multiprocess"] == ["bool", True]
    assert env["wsgi.multithread"] == ["bool", False]


def test_environ_server_port_is_the_public_port(served):
    # CGI / PEP 3333: the port the request came in on. What the client reached
    # is PORT; the worker's own (NAT target) port means nothing outside.
    # wsgiref.util.request_uri() falls back to it when there is no Host.
    env, conn = get_env(served, "/env", version="HTTP/1.0")
    conn.close()
    assert "HTTP_HOST" not in env
    assert value(env, "SERVER_PORT") == str(PORT)


def test_environ_duplicate_headers_joined(served):
    env, conn = get_env(served, "/env", [("X-Dup", "one"), ("X-Other", "x"), ("X-Dup", "two"),
                                          ("x-dup", "three")])
    conn.close()
    assert value(env, "HTTP_X_DUP") == "one, two, three"
    assert value(env, "HTTP_X_OTHER") == "x"


def test_environ_header_with_underscore_is_dropped(served):
    # X_Forwarded_For and X-Forwarded-For would both be HTTP_X_FORWARDED_FOR:
    # a name with "_" is dropped (as nginx, gunicorn and pywsgi do).
    env, conn = get_env(served, "/env", [("X_Forwarded_For", "6.6.6.6"), ("X-Real", "1")])
    conn.close()
    assert "HTTP_X_FORWARDED_FOR" not in env
    assert value(env, "HTTP_X_REAL") == "1"


def test_environ_duplicate_cookie_headers_joined_with_semicolon(served):
    # Cookie is the exception to ", " (RFC 6265 5.4, RFC 9113 8.2.3): with a
    # comma, werkzeug's parse_cookie would read a="1, b=2".
    env, conn = get_env(served, "/env", [("Cookie", "a=1"), ("Cookie", "b=2; c=3")])
    conn.close()
    assert value(env, "HTTP_COOKIE") == "a=1; b=2; c=3"


@pytest.mark.parametrize("content_type, body", [
    ("text/plain; charset=utf-8", b"hello"),
    (None, b"hello"),                   # a body without Content-Type: no CONTENT_TYPE
    ("application/x-empty", b""),       # Content-Length: 0 is sent, so CONTENT_LENGTH "0"
])
def test_environ_content_keys_when_sent(served, content_type, body):
    headers = [("Content-Type", content_type)] if content_type else []
    env, conn = get_env(served, "/env", headers, body=body, method="POST")
    conn.close()
    assert env["REQUEST_METHOD"] == ["str", "POST"]
    assert env.get("CONTENT_TYPE") == (["str", content_type] if content_type else None)
    assert env["CONTENT_LENGTH"] == ["str", str(len(body))]
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env


def test_environ_chunked_request_has_no_content_length(served):
    env, conn = get_env(served, "/env", [("Transfer-Encoding", "chunked")],
                        body=chunked(b"hello"), method="POST")
    conn.close()
    assert env.get("CONTENT_LENGTH", ["str", ""]) == ["str", ""]
    assert "HTTP_CONTENT_LENGTH" not in env
    assert env["wsgi.input_terminated"] == ["bool", True]


def test_environ_http10(served):
    env, conn = get_env(served, "/env?x=1", version="HTTP/1.0")
    conn.close()
    assert value(env, "SERVER_PROTOCOL") == "HTTP/1.0"
    assert value(env, "QUERY_STRING") == "x=1"


def test_environ_ipv6_client(served):
    env, conn = get_env(served, "/env", v6=True)
    local_port = conn.sock.getsockname()[1]
    conn.close()
    assert value(env, "REMOTE_ADDR") == served.tb.client_ips6[0]      # canonical, no brackets
    assert value(env, "REMOTE_PORT") == str(local_port)


@pytest.mark.parametrize("target, path_info", [
    ("/env", "/env"),
    ("/env/%7Euser/a%2Fb", "/env/~user/a/b"),        # %2F decodes to "/" (CGI semantics)
    ("/env/%FF%00x", "/env/\u00ff\u0000x"),          # any byte, as latin-1
    ("/env/a;b=c", "/env/a;b=c"),
])
def test_path_info_decoding(served, target, path_info):
    env, conn = get_env(served, target)
    conn.close()
    assert value(env, "PATH_INFO") == path_info
    assert value(env, "QUERY_STRING") == ""


# --------------------------------------------------------------------------- #
# wsgi.input
# --------------------------------------------------------------------------- #

BODY = b"first line\nsecond\n\nfourth line is longer than the others\nlast, no newline"


def model(body: bytes, ops: list[str]) -> list:
    """What each op must return, from io.BytesIO (the Python file semantics PEP 3333 cites)."""
    f, out = io.BytesIO(body), []
    for op in ops:
        name, _, arg = op.partition(":")
        n = int(arg) if arg else None
        if name == "read":
            r = f.read(n) if n is not None else f.read()
        elif name == "readline":
            r = f.readline(n) if n is not None else f.readline()
        elif name in ("readlines", "iter"):
            r = [line.decode("latin-1") for line in f.readlines()]
        else:
            raise ValueError(op)
        out.append([op, r if isinstance(r, list) else r.decode("latin-1")])
    return out


def body_request(served: Served, ops: list[str], body: bytes, framing: str,
                 pieces: int = 3) -> Response:
    if framing == "chunked":
        step = max(1, len(body) // pieces)
        parts = [body[i:i + step] for i in range(0, len(body), step)]
        headers, wire = [("Transfer-Encoding", "chunked")], chunked(*parts)
    else:
        headers, wire = [("Content-Length", str(len(body)))], body
    with served.connect() as conn:
        return conn.roundtrip("POST", "/input?ops=" + ",".join(ops), headers, wire)


FRAMINGS = ["content-length", "chunked"]

OP_SEQUENCES = {
    "mixed": ["read:3", "readline", "readline:4", "readline", "readline", "read:7",
              "readline:1000", "readline", "read:5", "read", "read:5", "readline"],
    "read-all": ["read"],
    "read-sized": ["read:10", "read:10", "read:1000", "read:1"],
    "readlines": ["readline", "readlines", "readline"],
    "iterate": ["read:2", "iter", "read:1"],
    "readline-small": ["readline:1", "readline:1", "readline:100", "readline:0", "readline"],
}


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("seq", sorted(OP_SEQUENCES))
def test_wsgi_input_methods(served, framing, seq):
    ops = OP_SEQUENCES[seq]
    resp = body_request(served, ops, BODY, framing)
    assert resp.json() == model(BODY, ops)


@pytest.mark.parametrize("framing", FRAMINGS)
def test_wsgi_input_read_past_end_is_empty(served, framing):
    ops = ["read:1000", "read:1", "read", "readline", "readline:5", "readlines", "iter"]
    resp = body_request(served, ops, b"abc\ndef", framing)
    assert resp.json() == [["read:1000", "abc\ndef"], ["read:1", ""], ["read", ""],
                           ["readline", ""], ["readline:5", ""], ["readlines", []], ["iter", []]]


def test_wsgi_input_without_body_is_empty(served):
    # GET with neither Content-Length nor Transfer-Encoding: an empty stream, never a hang.
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/input?ops=read:10,read,readline,readlines")
        assert resp.json() == [["read:10", ""], ["read", ""], ["readline", ""], ["readlines", []]]
        # and the connection is still good for the next request
        assert conn.roundtrip("GET", "/hello?n=2").body == b"hello 2"


@pytest.mark.parametrize("headers", [
    [("Upgrade", "websocket")],                          # no Connection: upgrade: plain HTTP
    [("Connection", "Upgrade"), ("Upgrade", "h2c")],     # an upgrade the server ignores
], ids=["upgrade-websocket-alone", "upgrade-h2c"])
def test_wsgi_input_ends_at_content_length_with_upgrade_headers(served, headers):
    # Still a request with a body of Content-Length bytes: the stream ends there
    # (never the raw socket, where a read would run into the next request, and
    # never an empty stream). An upgrade the server does not take may also be
    # refused outright (400, Connection: close) rather than served.
    with served.connect() as conn:
        resp = conn.roundtrip("POST", "/input?ops=read:100,read:100", headers, b"hello")
        if resp.status == 400 and headers[0][0] == "Connection":
            assert resp.one("Connection").lower() == "close"
            return
        assert resp.json() == [["read:100", "hello"], ["read:100", ""]]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_wsgi_input_large_body(served, framing):
    body = os.urandom(1 << 20) + b"\nend"
    resp = body_request(served, ["digest:7777"], body, framing, pieces=37)
    assert resp.json() == [["digest:7777", f"{len(body)} {hashlib.sha256(body).hexdigest()}"]]


@pytest.mark.parametrize("framing", FRAMINGS)
def test_wsgi_input_many_lines(served, framing):
    body = b"".join(b"line %d %s\n" % (i, b"x" * (i % 97)) for i in range(5000))
    resp = body_request(served, ["iter"], body, framing, pieces=13)
    assert resp.json() == [["iter", [line.decode() for line in io.BytesIO(body)]]]


# --------------------------------------------------------------------------- #
# wsgi.errors, wsgi.file_wrapper, write(), the body iterable
# --------------------------------------------------------------------------- #

def test_wsgi_errors_reaches_the_log(served):
    start = served.log_size()
    marker = f"pep3333-errors-{token()}"
    with served.connect() as conn:
        assert conn.roundtrip("GET", f"/errors?m={marker}").status == 200
    served.wait_log_since(start, marker)


def file_response(conn: Conn, method: str = "GET", version: str = "HTTP/1.1",
                  **params) -> Response:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return conn.roundtrip(method, f"/file?{query}", version=version)


@pytest.mark.parametrize("kind", ["temp", "bytesio", "counted"])
@pytest.mark.parametrize("size, offset", [(300_000, 0), (300_000, 12_345), (0, 0)])
def test_file_wrapper(served, kind, size, offset):
    with served.connect() as conn:
        resp = file_response(conn, size=size, offset=offset, kind=kind)
        assert resp.status == 200, resp.raw[:300]
        assert resp.one("Content-Length") == str(size - offset)
        assert resp.body == file_bytes(size)[offset:]
        assert conn.roundtrip("GET", "/hello?n=after").body == b"hello after"


def test_file_wrapper_starts_at_the_file_position(served):
    # PEP 3333: transmission begins at the file's current position. The app
    # read 10 bytes through a buffered file: its descriptor is further on.
    with served.connect() as conn:
        resp = file_response(conn, size=100_000, offset=10, readahead=1)
        assert resp.body == file_bytes(100_000)[10:]


@pytest.mark.parametrize("kind", ["temp", "bytesio"])
def test_file_wrapper_without_content_length(served, kind):
    with served.connect() as conn:
        resp = file_response(conn, size=100_000, offset=5, cl="none", kind=kind)
        assert resp.status == 200 and resp.body == file_bytes(100_000)[5:]
        assert conn.roundtrip("GET", "/hello?n=after").body == b"hello after"


@pytest.mark.parametrize("kind", ["temp", "bytesio"])
def test_file_wrapper_sends_no_more_than_content_length(served, kind):
    with served.connect() as conn:
        resp = file_response(conn, size=100_000, cl=1000, kind=kind)
        assert resp.body == file_bytes(1000)
        # Not one byte more: the server may close (the app offered more than
        # it declared), but whatever comes next is a response of its own.
        nxt = conn.next_response_or_close("GET", "/hello?n=after")
        assert nxt is None or (nxt.raw.startswith(b"HTTP/1.1 200 OK\r\n")
                               and nxt.body == b"hello after")


def test_file_wrapper_head(served):
    with served.connect() as conn:
        resp = file_response(conn, "HEAD", size=100_000)
        assert resp.one("Content-Length") == "100000"
        nxt = conn.roundtrip("GET", "/hello?n=after")
        assert nxt.raw.startswith(b"HTTP/1.1 200 OK\r\n") and nxt.body == b"hello after"


def test_file_wrapper_http10(served):
    with served.connect() as conn:
        resp = file_response(conn, version="HTTP/1.0", size=100_000, cl="none")
        assert resp.body == file_bytes(100_000)
        assert conn.closed_by_server()


def test_file_wrapper_closes_the_file(served):
    tok = token()
    with served.connect() as conn:
        resp = file_response(conn, size=50_000, kind="counted", token=tok)
        assert resp.body == file_bytes(50_000)
    assert wait_closes(served, tok) == 1


def test_write_callable(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/write?cl=1")
        assert (resp.status, resp.body, resp.chunked) == (200, b"one-two", False)
        assert resp.one("Content-Length") == "7"
        resp = conn.roundtrip("GET", "/write")
        assert (resp.status, resp.body, resp.chunked) == (200, b"one-two", True)
        assert not resp.has("Content-Length")


def test_write_mixed_with_iterable(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/write-mixed")
        assert (resp.status, resp.body) == (200, b"w1-i1-i2")


def test_close_called_after_response(served):
    tok = token()
    with served.connect() as conn:
        resp = conn.roundtrip("GET", f"/closing?token={tok}")
        assert resp.body == b"closed"
    assert wait_closes(served, tok) == 1
    assert closes(served, tok) == 1          # once, not twice


def test_close_called_for_head(served):
    tok = token()
    with served.connect() as conn:
        resp = conn.roundtrip("HEAD", f"/closing?token={tok}")
        assert resp.one("Content-Length") == "6"
    assert wait_closes(served, tok) == 1


def test_close_called_when_iteration_fails(served):
    tok = token()
    with served.connect() as conn:
        conn.request("GET", f"/closing-error?token={tok}")
        with pytest.raises((EOFError, ConnectionResetError)):
            conn.read_response()                 # the response is cut, never completed
    assert wait_closes(served, tok) == 1


def test_close_called_when_client_disconnects(served):
    tok = token()
    conn = served.connect()
    conn.request("GET", f"/closing-slow?token={tok}")
    conn.read_line()                                  # the status line: the body is streaming
    # An abortive close (RST): the server's next write fails.
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
    assert wait_closes(served, tok) == 1


# --------------------------------------------------------------------------- #
# exc_info
# --------------------------------------------------------------------------- #

def test_exc_info_before_headers_replaces_status(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/exc-before")
        assert resp.status_line == b"HTTP/1.1 500 Handled Error"
        assert resp.body == b"handled"


@pytest.mark.parametrize("sized", [False, True], ids=["chunked", "content-length"])
def test_exc_info_after_headers_reraises_and_closes(served, sized):
    with served.connect() as conn:
        conn.request("GET", "/exc-after?cl=1" if sized else "/exc-after")
        wire = conn.read_to_eof()               # the server must close: bounded by TIMEOUT
    head, sep, body = wire.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 200 OK\r\n"), wire[:500]
    if sized:
        assert b"\r\nContent-Length: 100" in head, head
        assert body == b"partial-", body               # nothing after the partial body
    else:
        assert b"Transfer-Encoding: chunked" in head, head
        # the partial chunk, and no last chunk: the client can tell it was cut
        assert body == b"8\r\npartial-\r\n", body
    assert b"did not re-raise" not in wire and wire.count(b"HTTP/1.") == 1, wire


# --------------------------------------------------------------------------- #
# HEAD, Expect: 100-continue, framing of unsized responses
# --------------------------------------------------------------------------- #

def test_head(served):
    with served.connect() as conn:
        get = conn.roundtrip("GET", "/hello?n=7")
        head = conn.roundtrip("HEAD", "/hello?n=7")
        assert head.status == 200
        assert head.one("Content-Length") == get.one("Content-Length") == "7"
        assert head.one("Content-Type") == "text/plain"
        # No body went out: the next response starts right after the HEAD's headers.
        nxt = conn.roundtrip("GET", "/hello?n=8")
        assert nxt.raw.startswith(b"HTTP/1.1 200 OK\r\n") and nxt.body == b"hello 8"


def test_head_of_unsized_response(served):
    with served.connect() as conn:
        head = conn.roundtrip("HEAD", "/stream")
        assert head.status == 200, head.raw
        nxt = conn.roundtrip("GET", "/hello?n=9")
        assert nxt.raw.startswith(b"HTTP/1.1 200 OK\r\n") and nxt.body == b"hello 9"


def test_expect_100_continue_when_app_reads(served):
    with served.connect() as conn:
        conn.request("POST", "/input?ops=read:100",
                     [("Content-Length", "5"), ("Expect", "100-continue")])
        interim = conn.read_response("POST")
        assert interim.status == 100, interim.raw
        assert interim.status_line == b"HTTP/1.1 100 Continue"
        conn.send(b"hello")
        final = conn.read_response("POST")
        assert final.json() == [["read:100", "hello"]]


def test_no_100_continue_when_app_does_not_read(served):
    with served.connect() as conn:
        conn.request("POST", "/noread", [("Content-Length", "5"), ("Expect", "100-continue")])
        first = conn.read_response("POST")
        assert first.status == 200, first.raw
        assert first.body == b"did not read\n"


def test_unsized_response_http11_is_chunked_and_keeps_alive(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/stream")
        assert resp.status == 200 and resp.chunked and not resp.has("Content-Length")
        assert resp.body == b"abbccc"
        assert resp.raw.endswith(b"\r\n0\r\n\r\n"), resp.raw
        assert conn.roundtrip("GET", "/hello?n=2").body == b"hello 2"


def test_unsized_response_http10_is_raw_and_closes(served):
    with served.connect() as conn:
        conn.request("GET", "/stream", version="HTTP/1.0")
        wire = conn.read_to_eof()
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].split()[1] == b"200", head
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == b"abbccc"


def test_http10_keepalive_with_sized_response(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/hello?n=1", [("Connection", "keep-alive")], version="HTTP/1.0")
        assert resp.body == b"hello 1"
        assert resp.one("Connection").lower() == "keep-alive"
        resp = conn.roundtrip("GET", "/hello?n=2", version="HTTP/1.0")   # no keep-alive: last one
        assert resp.body == b"hello 2"
        assert conn.closed_by_server()


# --------------------------------------------------------------------------- #
# Keep-alive and pipelining
# --------------------------------------------------------------------------- #

def test_keepalive_several_requests(served):
    with served.connect() as conn:
        for n in range(3):
            assert conn.roundtrip("GET", f"/hello?n={n}").body == f"hello {n}".encode()
            resp = conn.roundtrip("POST", "/input?ops=read", body=b"body %d" % n)
            assert resp.json() == [["read", f"body {n}"]]


def test_pipelining(served):
    with served.connect() as conn:
        batch = (b"GET /hello?n=1 HTTP/1.1\r\nHost: p\r\n\r\n"
                 b"POST /input?ops=read HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc"
                 b"GET /hello?n=3 HTTP/1.1\r\nHost: p\r\n\r\n")
        conn.send(batch)
        first, second, third = (conn.read_response() for _ in range(3))
        assert first.body == b"hello 1"
        assert second.json() == [["read", "abc"]]
        assert third.body == b"hello 3"
        assert conn.roundtrip("GET", "/hello?n=4").body == b"hello 4"


# --------------------------------------------------------------------------- #
# Response headers
# --------------------------------------------------------------------------- #

def test_date_and_server_headers(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/hello")
    date = email.utils.parsedate_to_datetime(resp.one("Date"))
    assert date.tzinfo is not None and resp.one("Date").endswith(" GMT")
    assert resp.one("Server")


def test_app_date_and_server_not_duplicated(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/headers?date=1&server=1")
    assert resp.one("Date") == DATE
    assert resp.one("Server") == SERVER


def test_status_line_and_header_names_as_sent(served):
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/headers")
    assert resp.status_line == b"HTTP/1.1 299 Custom Reason"
    assert b"\r\nX-MiXeD-CaSe: Value\r\n" in resp.raw
    assert resp.body == b"custom\n"


def test_non_latin1_header_is_500_and_worker_survives(served):
    before, conn = get_env(served)
    conn.close()
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/non-latin1")
        assert resp.status == 500, resp.raw[:500]
        assert b"never sent" not in resp.raw and "\u20ac".encode() not in resp.raw
    after, conn = get_env(served)
    conn.close()
    assert after["_pid"] == before["_pid"], "the worker died"


# --------------------------------------------------------------------------- #
# wsgiref.validate errors surface
# --------------------------------------------------------------------------- #

def test_validator_errors_surface(served, lint_expected):
    start = served.log_size()
    with served.connect() as conn:
        resp = conn.roundtrip("GET", "/lint-violation")
    assert resp.status == 500, resp.raw[:500]
    log = served.wait_log_since(start, "AssertionError")
    assert "No Content-Type header found" in log, log[-3000:]
