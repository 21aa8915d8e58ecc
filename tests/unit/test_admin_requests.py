"""The admin endpoint (ipserve/master/admin.py): request heads, the bearer
token, the routing decision, the bytes served; the listening socket (unix
and TCP); and a server on loopback, with its bounds. Plus the refusal of a
non-loopback admin_bind without a token (ipserve/config.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import threading
from http import HTTPStatus

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipserve import cli, config, metrics
from ipserve.config import UnixAddress, parse_admin_bind
from ipserve.errors import UsageError
from ipserve.master import admin
from ipserve.master.admin import BadRequest, Route

TOKEN = "s3cret-token-0123456789"
LOG = logging.getLogger("test_admin")


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def request(method: str = "GET", target: str = "/", **headers: str) -> admin.Request:
    return admin.parse_head(head(f"{method} {target} HTTP/1.1", "Host: x",
                                 *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())))


# --------------------------------------------------------------------------- #
# Request heads
# --------------------------------------------------------------------------- #

def test_head_length_waits_for_the_whole_head():
    data = head("GET / HTTP/1.1", "Host: x")
    for cut in range(len(data)):
        assert admin.head_length(data[:cut]) is None, cut
    assert admin.head_length(data) == len(data)
    assert admin.head_length(data + b"extra") == len(data)


@pytest.mark.parametrize("data", [b"\x16\x03\x01\x02\x00\x01", b"\r\n", b" GET", b"GET\t/",
                                  b"GET / HTTP/1.1\nHost: x\n\n", b"GET / HTTP/1.1\r\nHost: x\n"],
                         ids=["tls-hello", "empty-line", "leading-space", "tab", "bare-lf",
                              "bare-lf-partial"])
def test_head_length_refuses_what_cannot_be_a_request_at_once(data):
    with pytest.raises(BadRequest) as caught:
        admin.head_length(data)
    assert caught.value.status is HTTPStatus.BAD_REQUEST


def sized_head(size: int) -> bytes:
    """A complete head of exactly `size` bytes."""
    start = b"GET / HTTP/1.1\r\nX-Fill: "
    return start + b"a" * (size - len(start) - 4) + b"\r\n\r\n"


def test_head_size_limit():
    fits = sized_head(admin.MAX_HEAD)
    assert admin.head_length(fits) == admin.MAX_HEAD
    too_big = sized_head(admin.MAX_HEAD + 1)
    for data in (too_big, sized_head(admin.MAX_HEAD + 10)[:-4],
                 b"GET / HTTP/1.1\r\n" + b"a" * admin.MAX_HEAD):
        with pytest.raises(BadRequest) as caught:
            admin.head_length(data)
        assert caught.value.status is HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def test_parse_head():
    req = admin.parse_head(head("GET /metrics?x=1 HTTP/1.1", "Host: a", "Accept:  text/plain ",
                                "accept: */*", "Empty:"))
    assert (req.method, req.target, req.path) == ("GET", "/metrics?x=1", "/metrics")
    assert req.headers == {"host": ("a",), "accept": ("text/plain", "*/*"), "empty": ("",)}
    assert admin.parse_head(head("HEAD / HTTP/1.0")).method == "HEAD"


@pytest.mark.parametrize("lines", [
    ["GET  / HTTP/1.1"], ["GET / HTTP/1.1 "], ["GET /"], ["GET / HTTP/1.1 extra"],
    ["GET http://x/ HTTP/1.1"], ["GET * HTTP/1.1"], ["GET / HTTP/2.0"], ["GET / http/1.1"],
    ["GET / HTTP/1.10"], ["G@T / HTTP/1.1"], ["GET /a\x7fb HTTP/1.1"], ["GET /\xe9 HTTP/1.1"],
    ["GET / HTTP/1.1", " folded"], ["GET / HTTP/1.1", "Host : x"], ["GET / HTTP/1.1", "NoColon"],
    ["GET / HTTP/1.1", ": empty-name"], ["GET / HTTP/1.1", "X: a\x00b"],
    ["GET / HTTP/1.1", "X: a\x1bb"], ["GET / HTTP/1.1", "X: a\rb"], ["GET / HTTP/1.1", ""],
])
def test_parse_head_is_strict(lines):
    with pytest.raises(BadRequest) as caught:
        admin.parse_head(head(*lines))
    assert caught.value.status is HTTPStatus.BAD_REQUEST


# --------------------------------------------------------------------------- #
# The token, and what is answered
# --------------------------------------------------------------------------- #

def test_no_token_needs_no_authorization():
    assert admin.authorized(request(), None)
    assert admin.authorized(request(Authorization="Bearer whatever"), None)


@pytest.mark.parametrize("value,ok", [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"BEARER  {TOKEN}", True),
    (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False), ("Bearer ", False),
    (TOKEN, False), (f"Basic {TOKEN}", False), (f"Bearer{TOKEN}", False), ("", False),
])
def test_bearer_token(value, ok):
    assert admin.authorized(request(Authorization=value), TOKEN) is ok


def test_token_missing_or_given_twice():
    assert not admin.authorized(request(), TOKEN)
    twice = admin.parse_head(head("GET / HTTP/1.1", f"Authorization: Bearer {TOKEN}",
                                  f"Authorization: Bearer {TOKEN}"))
    assert not admin.authorized(twice, TOKEN)


@pytest.mark.parametrize("method,target,token,status,route", [
    ("GET", "/", None, HTTPStatus.OK, Route.DASHBOARD),
    ("GET", "/status.json", None, HTTPStatus.OK, Route.STATUS),
    ("GET", "/series.json?since=1", None, HTTPStatus.OK, Route.SERIES),
    ("GET", "/metrics", None, HTTPStatus.OK, Route.METRICS),
    ("HEAD", "/metrics", None, HTTPStatus.OK, Route.METRICS),
    ("GET", "/metrics/", None, HTTPStatus.NOT_FOUND, None),
    ("GET", "/status.json/../metrics", None, HTTPStatus.NOT_FOUND, None),
    ("POST", "/metrics", None, HTTPStatus.METHOD_NOT_ALLOWED, None),
    ("DELETE", "/nowhere", None, HTTPStatus.METHOD_NOT_ALLOWED, None),
    # Without the token nothing is told but the page (it holds no data, and a
    # browser cannot add a header to the address it opens): not even what exists.
    ("GET", "/", TOKEN, HTTPStatus.OK, Route.DASHBOARD),
    ("HEAD", "/?token=x", TOKEN, HTTPStatus.OK, Route.DASHBOARD),
    ("POST", "/", TOKEN, HTTPStatus.UNAUTHORIZED, None),
    ("GET", "/metrics", TOKEN, HTTPStatus.UNAUTHORIZED, None),
    ("GET", "/status.json", TOKEN, HTTPStatus.UNAUTHORIZED, None),
    ("GET", "/series.json", TOKEN, HTTPStatus.UNAUTHORIZED, None),
    ("GET", "/nowhere", TOKEN, HTTPStatus.UNAUTHORIZED, None),
    ("POST", "/metrics", TOKEN, HTTPStatus.UNAUTHORIZED, None),
])
def test_decide(method, target, token, status, route):
    answer = admin.decide(request(method, target), token)
    assert (answer.status, answer.route) == (status, route)
    assert answer.head_only is (method == "HEAD")


def test_decide_with_the_token():
    answer = admin.decide(request("GET", "/metrics", Authorization=f"Bearer {TOKEN}"), TOKEN)
    assert (answer.status, answer.route) == (HTTPStatus.OK, Route.METRICS)


def split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    top, _, body = raw.partition(b"\r\n\r\n")
    first, *fields = top.decode("latin-1").split("\r\n")
    return first, dict(f.split(": ", 1) for f in fields), body


def test_response_head_and_body():
    first, fields, body = split(admin.response(HTTPStatus.OK, b"hello", "text/plain"))
    assert first == "HTTP/1.1 200 OK" and body == b"hello"
    assert fields["Content-Length"] == "5" and fields["Content-Type"] == "text/plain"
    assert fields["Cache-Control"] == "no-store" and fields["Connection"] == "close"
    first, fields, body = split(admin.response(HTTPStatus.OK, b"hello", "text/plain", head_only=True))
    assert body == b"" and fields["Content-Length"] == "5"


@pytest.mark.parametrize("status,header", [(HTTPStatus.UNAUTHORIZED, "WWW-Authenticate"),
                                           (HTTPStatus.METHOD_NOT_ALLOWED, "Allow"),
                                           (HTTPStatus.SERVICE_UNAVAILABLE, "Retry-After")])
def test_error_responses_say_what_to_do(status, header):
    first, fields, body = split(admin.error_response(status))
    assert first.startswith(f"HTTP/1.1 {status.value} ") and header in fields
    assert body == f"{status.value} {status.phrase}\n".encode()
    if status is HTTPStatus.UNAUTHORIZED:
        assert fields[header].startswith("Bearer")


# --------------------------------------------------------------------------- #
# Snapshots and bodies
# --------------------------------------------------------------------------- #

STATUS = {"name": "web", "router": "nft", "master": {"pid": 1, "generation": 2},
          "workers": [{"pid": 7, "slot": 0, "generation": 2, "state": "active", "rss": 10,
                       "connections": 1, "websockets": 0, "lag_ms": 1.0, "requests": 3}]}
SERIES = {"interval_s": 2.0, "workers": {"7": {"rss": [1, 2], "lag_ms": [0.5, 0.25]}}}


def test_snapshot_serves_the_published_documents():
    status, series = json.loads(json.dumps(STATUS)), json.loads(json.dumps(SERIES))
    snap = admin.Snapshot(status, series)
    status["name"] = "changed later by the loop"
    assert json.loads(snap.status_json) == STATUS
    assert snap.status_json == json.dumps(STATUS).encode()
    assert json.loads(snap.series_json()) == SERIES
    assert snap.metrics() == metrics.render(STATUS)


def test_snapshot_renders_once():
    snap = admin.Snapshot(STATUS, SERIES)
    assert snap.metrics() is snap.metrics()
    assert snap.series_json() is snap.series_json()


def test_body_for():
    snap = admin.Snapshot(STATUS, SERIES)
    assert admin.body_for(Route.DASHBOARD, None, b"<html>") == (b"<html>", "text/html; charset=utf-8")
    for route in (Route.STATUS, Route.SERIES, Route.METRICS):
        assert admin.body_for(route, None, b"") is None       # nothing published yet: 503
    assert admin.body_for(Route.METRICS, snap, b"")[1] == metrics.CONTENT_TYPE
    assert admin.body_for(Route.STATUS, snap, b"") == (snap.status_json, "application/json")


def test_dashboard_placeholder_when_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(admin.importlib.resources, "files", lambda package: tmp_path)
    assert admin.load_dashboard() == admin.PLACEHOLDER
    (tmp_path / "dashboard.html").write_bytes(b"<!doctype html>dash")
    assert admin.load_dashboard() == b"<!doctype html>dash"


# --------------------------------------------------------------------------- #
# Settings: a non-loopback admin_bind needs a token
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("bind", ["0.0.0.0:9000", "198.18.0.1:9000", "[::]:9000"])
def test_non_loopback_admin_bind_without_token_is_refused(bind):
    with pytest.raises(config.ConfigError) as caught:
        config.resolve({"app": "x:y", "admin_bind": bind}, environ={})
    assert "admin_token" in str(caught.value) and bind in str(caught.value)
    cfg = config.resolve({"app": "x:y", "admin_bind": bind, "admin_token": TOKEN}, environ={})
    assert str(cfg.admin_bind) == bind


@pytest.mark.parametrize("bind", ["127.0.0.1:9000", "[::1]:9000", "unix:/run/ipserve-admin.sock"])
def test_loopback_or_unix_admin_bind_needs_no_token(bind):
    cfg = config.resolve({"app": "x:y", "admin_bind": bind}, environ={})
    assert str(cfg.admin_bind) == bind and cfg.admin_token is None
    assert "admin_token" not in cfg.to_json()


def test_refused_admin_bind_is_exit_2_and_one_line(monkeypatch, capsys):
    for key in list(os.environ):
        if key.startswith("IPSERVE_"):
            monkeypatch.delenv(key)
    with pytest.raises(SystemExit) as caught:
        cli.main(["x:y", "--admin-bind", "0.0.0.0:9000"])
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("ipserve: error: admin_bind") and "admin_token" in err


# --------------------------------------------------------------------------- #
# The listening socket
# --------------------------------------------------------------------------- #

@pytest.fixture
def sock_dir():
    # A short path: unix socket paths are limited to 107 bytes.
    import tempfile
    path = tempfile.mkdtemp(prefix="ips-adm-")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


def test_unix_socket_is_0600_and_removed_at_close(sock_dir):
    path = os.path.join(sock_dir, "admin.sock")
    listener = admin.open_listener(UnixAddress(path))
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert admin.held_by(os.getpid(), UnixAddress(path))
    listener.close()
    assert not os.path.lexists(path)
    listener.close()          # idempotent


def test_unix_stale_socket_of_ours_is_replaced(sock_dir):
    path = os.path.join(sock_dir, "admin.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()             # the file stays, nobody listens: a dead master's
    listener = admin.open_listener(UnixAddress(path))
    listener.close()


def test_unix_socket_in_use_is_refused(sock_dir):
    path = os.path.join(sock_dir, "admin.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    try:
        with pytest.raises(admin.BindError) as caught:
            admin.open_listener(UnixAddress(path))
        assert caught.value.in_use and "already in use" in str(caught.value)
        assert os.path.lexists(path)
    finally:
        live.close()


def test_unix_path_that_is_not_a_socket_is_refused(sock_dir):
    path = os.path.join(sock_dir, "admin.sock")
    with open(path, "w") as fh:
        fh.write("precious")
    with pytest.raises(admin.BindError) as caught:
        admin.open_listener(UnixAddress(path))
    assert not caught.value.in_use and "not a socket" in str(caught.value)
    assert "\n" not in str(caught.value)
    with open(path) as fh:
        assert fh.read() == "precious"


def test_unix_socket_of_another_uid_is_refused(sock_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to make a socket file of another uid")
    path = os.path.join(sock_dir, "admin.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(path)
    other.close()
    os.chown(path, 65534, 65534)
    with pytest.raises(admin.BindError):
        admin.open_listener(UnixAddress(path))
    assert os.path.lexists(path)


def test_tcp_in_use_is_refused_with_one_line():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        address = parse_admin_bind(f"127.0.0.1:{holder.getsockname()[1]}")
        with pytest.raises(admin.BindError) as caught:
            admin.open_listener(address)
        assert caught.value.in_use and "already in use" in str(caught.value)
        assert isinstance(caught.value, UsageError) and "\n" not in str(caught.value)
        assert admin.held_by(os.getpid(), address)
    finally:
        holder.close()
    assert not admin.held_by(os.getpid(), address)


def test_tcp_not_an_address_of_this_host():
    with pytest.raises(admin.BindError) as caught:
        admin.open_listener(parse_admin_bind("203.0.113.7:9000"))
    assert not caught.value.in_use and "not an address of this host" in str(caught.value)


# --------------------------------------------------------------------------- #
# A server on loopback
# --------------------------------------------------------------------------- #

@pytest.fixture
def server():
    servers = []

    def start(token: str | None = None, publish: bool = True) -> admin.AdminServer:
        listener = admin.open_listener(config.Bind("127.0.0.1", 0, socket.AF_INET))
        srv = admin.AdminServer(listener, token, b"<html>dash</html>", LOG)
        if publish:
            srv.publish(STATUS, SERIES)
        srv.start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def connect(srv: admin.AdminServer) -> socket.socket:
    # The timeout only keeps a broken server from hanging the test.
    return socket.create_connection(srv.listener.sock.getsockname(), timeout=30)


def exchange(srv: admin.AdminServer, data: bytes) -> bytes:
    with connect(srv) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def get(srv, target: str, method: str = "GET", *extra: str) -> tuple[str, dict, bytes]:
    return split(exchange(srv, head(f"{method} {target} HTTP/1.1", "Host: x", *extra)))


def test_routes_over_a_socket(server):
    srv = server()
    first, fields, body = get(srv, "/")
    assert first == "HTTP/1.1 200 OK" and body == b"<html>dash</html>"
    first, fields, body = get(srv, "/status.json")
    assert json.loads(body) == STATUS and fields["Content-Type"] == "application/json"
    assert json.loads(get(srv, "/series.json")[2]) == SERIES
    first, fields, body = get(srv, "/metrics")
    assert fields["Content-Type"] == metrics.CONTENT_TYPE
    assert "ipserve_worker_rss_bytes" in {f.name for f in text_string_to_metric_families(body.decode())}
    first, fields, body = get(srv, "/metrics", "HEAD")
    assert first == "HTTP/1.1 200 OK" and body == b"" and int(fields["Content-Length"]) > 0
    assert get(srv, "/metrics", "POST")[0].startswith("HTTP/1.1 405")
    assert get(srv, "/nowhere")[0].startswith("HTTP/1.1 404")
    assert split(exchange(srv, b"\x16\x03\x01\x00\xa5\x01\x00"))[0].startswith("HTTP/1.1 400")
    assert split(exchange(srv, b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n"))[0] \
        .startswith("HTTP/1.1 431")


def test_before_the_first_publish_documents_are_503(server):
    srv = server(publish=False)
    assert get(srv, "/status.json")[0].startswith("HTTP/1.1 503")
    assert get(srv, "/")[0] == "HTTP/1.1 200 OK"
    srv.publish(STATUS, SERIES)
    assert get(srv, "/status.json")[0] == "HTTP/1.1 200 OK"


def test_token_over_a_socket(server):
    srv = server(token=TOKEN)
    first, fields, _ = get(srv, "/metrics")
    assert first.startswith("HTTP/1.1 401") and fields["WWW-Authenticate"].startswith("Bearer")
    assert get(srv, "/metrics", "GET", "Authorization: Bearer wrong-token-0123456789")[0] \
        .startswith("HTTP/1.1 401")
    assert get(srv, "/metrics", "GET", f"Authorization: Bearer {TOKEN}")[0] == "HTTP/1.1 200 OK"


def test_connections_beyond_the_cap_are_closed_at_once(server, monkeypatch):
    monkeypatch.setattr(admin, "HEAD_WITHIN", 600.0)     # the silent ones stay for the test
    srv = server()
    silent = []
    try:
        for _ in range(admin.MAX_CONNECTIONS):
            silent.append(connect(srv))
            silent[-1].sendall(b"G")
        # Every one of those is being served (its first byte read or not):
        # one more is accepted and closed without an answer.
        extra = connect(srv)
        with extra:
            assert read_all(extra) == b""
    finally:
        for sock in silent:
            sock.close()
    # Once they are gone, requests are answered again.
    wait_for(lambda: not srv.active)
    assert get(srv, "/status.json")[0] == "HTTP/1.1 200 OK"


def test_a_trickling_client_does_not_extend_the_deadline(server, monkeypatch):
    """One byte at a time, never finishing its head: 408, though bytes keep coming."""
    monkeypatch.setattr(admin, "HEAD_WITHIN", 0.3)
    srv = server()
    trickle = b"GET / HTTP/1.1\r\nX-Slow: " + b"a" * 5000
    stop = threading.Event()
    with connect(srv) as sock:
        def drip() -> None:
            for byte in trickle:
                if stop.wait(0.01):
                    return
                try:
                    sock.send(bytes([byte]))
                except OSError:
                    return
        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        try:
            answer = read_all(sock)
        finally:
            stop.set()
            dripper.join(30)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]


def test_close_stops_accepting_and_frees_the_port(server):
    srv = server()
    address = srv.listener.sock.getsockname()
    assert get(srv, "/status.json")[0] == "HTTP/1.1 200 OK"
    srv.close()
    assert not srv.acceptor.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=30).close()
    again = admin.open_listener(parse_admin_bind(f"127.0.0.1:{address[1]}"))
    again.close()


def test_close_cuts_connections_in_progress(server, monkeypatch):
    monkeypatch.setattr(admin, "HEAD_WITHIN", 600.0)
    srv = server()
    with connect(srv) as sock:
        sock.sendall(b"GET / HT")
        wait_for(lambda: srv.active)
        srv.close()
        with contextlib.suppress(ConnectionResetError):
            assert read_all(sock) == b""


def wait_for(predicate, tries: int = 3000) -> None:
    """Poll, bounded (a broken server fails the test instead of hanging it)."""
    event = threading.Event()
    for _ in range(tries):
        if predicate():
            return
        event.wait(0.01)
    raise AssertionError("condition never held")
