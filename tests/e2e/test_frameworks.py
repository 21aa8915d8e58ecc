"""End-to-end tests with real frameworks, run unchanged under ipserve.

Flask (tests/apps/fw_flask.py), Django (tests/apps/fw_django/: its own WSGI
handler, CSRF middleware on) and Flask-SocketIO in gevent mode
(tests/apps/fw_socketio.py) are served by the real `ipserve` command with
`-w 4` in the testbed's server namespace; clients talk to them from the 16
addresses of the client namespace (198.18.0.16-31: low 2 bits = slot 0..3).

Besides what each framework answers, every test checks stickiness: every
answer names the worker process (pid) that produced it, and every client
address is always answered by the active worker of slot `address & 3`, as
`ipservectl status` shows it, whatever the framework, transport or connection.

This file is also the Socket.IO client script: the tests run
``python tests/e2e/test_frameworks.py sio-client SPEC`` inside the client
namespace (see `sio_client_main`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import sys
import urllib.parse
from collections import defaultdict

import urllib3          # requests' dependency; used for its multipart encoder only

import netns
from backends import routed_workers, slot_of
from netns import HttpClient, http_get, tcp_connect

PORT = 8000
WORKERS = 4
APPS = os.path.join(netns.REPO_ROOT, "tests", "apps")
FLASK_APP = os.path.join(APPS, "fw_flask.py") + ":app"
DJANGO_APP = os.path.join(APPS, "fw_django", "wsgi.py") + ":application"
SOCKETIO_APP = os.path.join(APPS, "fw_socketio.py") + ":application"

UPLOAD_SIZE = 300 * 1024 + 17      # a few hundred KB, not a multiple of any buffer size
WAIT = 15                           # bound of every wait for something that must happen


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def serve(ipserve, app: str) -> tuple[netns.IpserveProcess, dict[int, dict]]:
    """Start ipserve with `app` on -w 4 and wait until every slot is routed to
    its own worker. Returns (process, {slot: worker status})."""
    srv = ipserve([app, "-w", str(WORKERS), "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "5"])
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS) is not None, timeout=60,
                      what=f"{WORKERS} active workers, each routed its own slot")
    table = routed_workers(st, WORKERS)
    assert len({w["pid"] for w in table.values()}) == WORKERS
    return srv, table


def assert_clean_log(srv: netns.IpserveProcess) -> None:
    """Ordinary framework traffic leaves no traceback and no error in the log."""
    bad = [line for line in srv.own_lines() if "Traceback" in line or "[ERROR]" in line]
    assert not bad, "errors in the ipserve log:\n" + "\n".join(bad[:20])


class Pinning:
    """Checks each answer against the slot table, and at the end that every
    source was answered by one pid only, and the slots by distinct pids."""

    def __init__(self, table: dict[int, dict]):
        self.table = table
        self.pids: dict[str, set[int]] = defaultdict(set)

    def check(self, src: str, who: dict, what: str) -> None:
        slot = slot_of(src, WORKERS)
        where = f"{what} from {src} (slot {slot})"
        assert who["remote_addr"] == src, f"{where}: the app saw REMOTE_ADDR {who['remote_addr']}"
        assert who["pid"] == self.table[slot]["pid"], \
            f"{where} answered by pid {who['pid']}; slot {slot}'s worker is {self.table[slot]['pid']}"
        if "worker" in who:
            worker = who["worker"] or {}
            assert (worker.get("slot"), worker.get("pid")) == (slot, who["pid"]), \
                f"{where}: environ['ipserve.worker'] is {who['worker']}"
        self.pids[src].add(who["pid"])

    def finish(self, sources) -> dict[str, int]:
        assert sorted(self.pids) == sorted(sources)
        many = {src: pids for src, pids in self.pids.items() if len(pids) != 1}
        assert not many, f"sources answered by more than one worker: {many}"
        pid_of = {src: next(iter(pids)) for src, pids in self.pids.items()}
        assert len(set(pid_of.values())) == len({slot_of(s, WORKERS) for s in sources})
        return pid_of


def request(client: HttpClient, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, expect: int = 200) -> tuple[dict, bytes]:
    status, hdrs, data = client.request(path, method=method, body=body, headers=headers)
    assert status == expect, f"{method} {path}: HTTP {status} (expected {expect}): {data[:300]!r}"
    return hdrs, data


class RawHttp:
    """A raw HTTP/1.x exchange on one socket: the bytes as the server framed them."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._fill():
                raise AssertionError(f"connection closed before {marker!r}; got {self.buf[:300]!r}")
        head, self.buf = self.buf.split(marker, 1)
        return head

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise AssertionError(f"connection closed after {len(self.buf)} of {n} bytes")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = self.buf, b""
        return data

    def read_head(self) -> tuple[str, int, dict[str, str]]:
        """(version, status, headers with lower-case names)."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            name = name.strip().lower()
            headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
        return version, int(status), headers

    def read_chunk(self) -> bytes:
        """One chunk of a chunked body, strictly framed; b"" for the last chunk
        (its trailer section is consumed too)."""
        size_line = self.read_until(b"\r\n")
        assert re.fullmatch(rb"[0-9A-Fa-f]+(;.*)?", size_line), f"bad chunk size line {size_line!r}"
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            while self.read_until(b"\r\n"):          # trailer fields, up to the empty line
                pass
            return b""
        data = self.read_exact(size)
        assert self.read_exact(2) == b"\r\n", "chunk data not followed by CRLF"
        return data

    def read_chunked_line(self) -> bytes:
        """Chunks until a whole line: the server may frame a block as it likes,
        but must not hold it back."""
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.read_chunk()
            assert chunk, f"chunked body ended inside a line: {line!r}"
            line += chunk
        return line

    def close(self) -> None:
        self.sock.close()


def raw_http(ns: str, src: str, dst: str) -> RawHttp:
    return RawHttp(tcp_connect(ns, src, dst, PORT, timeout=WAIT))


# --------------------------------------------------------------------------- #
# 1. Flask
# --------------------------------------------------------------------------- #

def test_flask_routes_forms_upload_json_pinned(testbed, ipserve):
    """From 16 addresses, on one keep-alive connection each: path and query
    parameters (percent-encoded UTF-8), a urlencoded form with repeated keys,
    a multipart upload of ~300 KB (the app's SHA-256 must match), a JSON body,
    Flask's own 404 and 405; plus a request on a fresh connection. Every
    answer comes from the worker of the source's slot."""
    tb = testbed
    srv, table = serve(ipserve, FLASK_APP)
    pin = Pinning(table)

    for i, src in enumerate(tb.client_ips):
        with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=WAIT) as c:
            # Routes: path parameters (one converted to int) and a query with a repeated key.
            name = f"Jürgen {i}"
            path = (f"/hello/{urllib.parse.quote(name)}/{i * 7}?"
                    + urllib.parse.urlencode([("greeting", "grüß dich"), ("tag", "a"),
                                              ("tag", f"b{i}")]))
            _, body = request(c, "GET", path)
            data = json.loads(body)
            pin.check(src, data, "GET /hello")
            assert (data["name"], data["n"], data["n_type"]) == (name, i * 7, "int"), data
            assert data["greeting"] == "grüß dich" and data["tags"] == ["a", f"b{i}"], data
            assert data["http_version"] == "HTTP/1.1", data

            # A form, application/x-www-form-urlencoded.
            fields = [("who", f"Zoë & co #{i}"), ("tag", "x"), ("tag", "y=z"), ("empty", "")]
            hdrs, body = request(c, "POST", "/form", body=urllib.parse.urlencode(fields).encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
            data = json.loads(body)
            pin.check(src, data, "POST /form")
            assert data["mimetype"] == "application/x-www-form-urlencoded"
            assert data["form"] == {"who": [f"Zoë & co #{i}"], "tag": ["x", "y=z"], "empty": [""]}

            # A file upload, multipart/form-data; the app hashes what it received.
            payload = os.urandom(UPLOAD_SIZE)
            mp_body, mp_type = urllib3.encode_multipart_formdata({
                "note": f"upload {i} ✓",
                "file": (f"data-{i}.bin", payload, "application/octet-stream"),
            })
            _, body = request(c, "POST", "/upload", body=mp_body,
                              headers={"Content-Type": mp_type})
            data = json.loads(body)
            pin.check(src, data, "POST /upload")
            assert data["request_mimetype"] == "multipart/form-data"
            assert (data["filename"], data["file_mimetype"], data["note"]) == \
                (f"data-{i}.bin", "application/octet-stream", f"upload {i} ✓"), data
            assert data["size"] == UPLOAD_SIZE
            assert data["sha256"] == hashlib.sha256(payload).hexdigest()

            # JSON in, JSON out.
            sent = {"text": f"héllo {i}", "numbers": [1, 2, 3.5, i], "nested": {"a": [True, None]}}
            hdrs, body = request(c, "POST", "/json", body=json.dumps(sent).encode(),
                                 headers={"Content-Type": "application/json"})
            assert hdrs["content-type"] == "application/json"
            data = json.loads(body)
            pin.check(src, data, "POST /json")
            assert data["received"] == sent and data["is_json"] is True
            assert data["sum"] == 6.5 + i and data["upper"] == f"HÉLLO {i}"

            # Flask's own errors, on the same connection.
            _, body = request(c, "GET", "/no/such/route", expect=404)
            assert b"Not Found" in body
            _, body = request(c, "GET", "/form", expect=405)
            assert b"Method Not Allowed" in body

            # Still one connection, still the same worker.
            data = json.loads(request(c, "GET", "/hello/again/1")[1])
            pin.check(src, data, "GET /hello (last on the connection)")
            assert c.connects == 1, f"{src}: the server closed the keep-alive connection"

        # A fresh connection from the same address.
        status, _, body = http_get(tb.client_ns, src, tb.server_ip, PORT, "/hello/fresh/0",
                                   timeout=WAIT)
        assert status == 200, body
        pin.check(src, json.loads(body), "GET /hello (fresh connection)")

    pin.finish(tb.client_ips)
    assert_clean_log(srv)


def test_flask_streaming_response(testbed, ipserve):
    """A generator response, from 16 addresses. On HTTP/1.1 it is sent
    chunked, and each chunk as it is produced: the app makes chunk i only
    after the client, having read everything before it, releases it with a
    request on another connection (which must reach the same worker, where the
    stream's gate lives). The connection then serves another request. On
    HTTP/1.0 the same stream comes without chunking, ended by the close. A
    long stream (200 chunks) arrives whole through http.client."""
    tb = testbed
    srv, table = serve(ipserve, FLASK_APP)
    pin = Pinning(table)
    n = 3
    for src in tb.client_ips:
        gate = secrets.token_hex(8)
        conn = raw_http(tb.client_ns, src, tb.server_ip)
        try:
            conn.send(f"GET /stream?n={n}&gate={gate} HTTP/1.1\r\nHost: {tb.server_ip}:{PORT}\r\n"
                      f"\r\n".encode())
            version, status, headers = conn.read_head()
            assert (version, status) == ("HTTP/1.1", 200), headers
            assert headers.get("transfer-encoding") == "chunked", headers
            assert "content-length" not in headers, headers
            assert headers["content-type"].startswith("text/plain"), headers
            pin.check(src, json.loads(conn.read_chunked_line()), "GET /stream (first line)")
            for i in range(n):
                # Nothing more can exist before the release: nothing more was sent.
                assert conn.buf == b"", f"data before release {i}: {conn.buf!r}"
                status, _, body = http_get(tb.client_ns, src, tb.server_ip, PORT,
                                           f"/release?gate={gate}", method="POST", timeout=WAIT)
                released = json.loads(body)
                assert status == 200 and released["released"], \
                    f"release {i} from {src} did not find the stream's gate: {released}"
                pin.check(src, released, "POST /release")
                assert conn.read_chunked_line() == f"chunk {i}\n".encode()
            assert conn.read_chunk() == b"", "no last chunk after the stream ended"
            # The chunked framing left the connection usable: another request on it.
            conn.send(f"GET /hello/after/{n} HTTP/1.1\r\nHost: {tb.server_ip}:{PORT}\r\n"
                      f"Connection: close\r\n\r\n".encode())
            version, status, headers = conn.read_head()
            assert status == 200, headers
            body = conn.read_exact(int(headers["content-length"]))
            data = json.loads(body)
            pin.check(src, data, "GET /hello after the stream, same connection")
            assert data["name"] == "after"
        finally:
            conn.close()

        # HTTP/1.0: no chunked coding; the body ends with the connection.
        conn = raw_http(tb.client_ns, src, tb.server_ip)
        try:
            conn.send(b"GET /stream?n=5 HTTP/1.0\r\n\r\n")
            version, status, headers = conn.read_head()
            assert status == 200 and version in ("HTTP/1.0", "HTTP/1.1"), (version, status)
            assert "chunked" not in headers.get("transfer-encoding", ""), headers
            lines = conn.read_to_eof().decode().splitlines(keepends=True)
            pin.check(src, json.loads(lines[0]), "GET /stream over HTTP/1.0")
            assert lines[1:] == [f"chunk {i}\n" for i in range(5)]
        finally:
            conn.close()

    # A long stream, decoded by http.client.
    src = tb.client_ips[5]
    status, headers, body = http_get(tb.client_ns, src, tb.server_ip, PORT, "/stream?n=200",
                                     timeout=WAIT)
    assert status == 200 and headers.get("transfer-encoding") == "chunked", headers
    lines = body.decode().splitlines(keepends=True)
    pin.check(src, json.loads(lines[0]), "GET /stream?n=200")
    assert lines[1:] == [f"chunk {i}\n" for i in range(200)]
    pin.finish(tb.client_ips)
    assert_clean_log(srv)


# --------------------------------------------------------------------------- #
# 2. Django
# --------------------------------------------------------------------------- #

_TOKEN_INPUT = re.compile(r'<input type="hidden" name="csrfmiddlewaretoken" value="([^"]+)">')
_PID = re.compile(r'<p id="?pid"?>(\d+)</p><p id="?remote"?>([^<]*)</p>')


def _csrf_cookie(headers: dict) -> str:
    cookie = headers.get("set-cookie", "")
    match = re.search(r"csrftoken=([A-Za-z0-9]+)", cookie)
    assert match, f"no csrftoken cookie set: {headers}"
    return match.group(1)


def test_django_pages_and_csrf(testbed, ipserve):
    """Django's WSGI handler from 16 addresses: a page, a JSON view with a path
    parameter and a repeated query key, CommonMiddleware's APPEND_SLASH
    redirect, and a CSRF-protected form: GET sets the csrftoken cookie and
    renders the token; a POST with token and cookie (form field, or the
    X-CSRFToken header) is answered 200 with the value echoed; a POST without
    them, with the cookie only, or with a token that does not match the cookie
    is refused 403 by CsrfViewMiddleware."""
    tb = testbed
    srv, table = serve(ipserve, DJANGO_APP)
    pin = Pinning(table)
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}

    for i, src in enumerate(tb.client_ips):
        with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=WAIT) as c:
            hdrs, body = request(c, "GET", "/")
            assert hdrs["content-type"] == "text/html; charset=utf-8"
            pid, remote = _PID.search(body.decode()).groups()
            pin.check(src, {"pid": int(pid), "remote_addr": remote}, "GET / (django)")

            _, body = request(c, "GET", f"/hello/{urllib.parse.quote(f'Ωmega-{i}')}/?q=1&q=two")
            data = json.loads(body)
            pin.check(src, data, "GET /hello/ (django)")
            assert (data["name"], data["q"], data["method"]) == (f"Ωmega-{i}", ["1", "two"], "GET")

            hdrs, _ = request(c, "GET", "/form", expect=301)
            assert hdrs["location"] == "/form/", hdrs

            # The form: a cookie and a (masked) token in the page.
            hdrs, body = request(c, "GET", "/form/")
            cookie = _csrf_cookie(hdrs)
            page = body.decode()
            match = _TOKEN_INPUT.search(page)
            assert match, f"no CSRF token in the form page: {page}"
            token = match.group(1)
            assert token != cookie                      # Django masks the token per render
            pid, remote = _PID.search(page).groups()
            pin.check(src, {"pid": int(pid), "remote_addr": remote}, "GET /form/ (django)")

            message = f"héllo <{i}> & bye"
            good = urllib.parse.urlencode({"csrfmiddlewaretoken": token,
                                           "message": message}).encode()
            _, body = request(c, "POST", "/form/", body=good,
                              headers={**form_type, "Cookie": f"csrftoken={cookie}"})
            data = json.loads(body)
            pin.check(src, data, "POST /form/ with token (django)")
            assert data["message"] == message

            # The AJAX way: the token in X-CSRFToken.
            _, body = request(c, "POST", "/form/", body=b"message=via+header",
                              headers={**form_type, "Cookie": f"csrftoken={cookie}",
                                       "X-CSRFToken": token})
            assert json.loads(body)["message"] == "via header"

            # Refused by CsrfViewMiddleware.
            plain = urllib.parse.urlencode({"message": message}).encode()
            _, body = request(c, "POST", "/form/", body=plain, headers=form_type, expect=403)
            assert b"CSRF verification failed" in body, body[:300]
            _, body = request(c, "POST", "/form/", body=plain, expect=403,
                              headers={**form_type, "Cookie": f"csrftoken={cookie}"})
            assert b"CSRF verification failed" in body, body[:300]
            other = "A" * len(cookie)
            _, body = request(c, "POST", "/form/", body=good, expect=403,
                              headers={**form_type, "Cookie": f"csrftoken={other}"})
            assert b"CSRF verification failed" in body, body[:300]
            assert c.connects == 1, f"{src}: the server closed the keep-alive connection"

    pin.finish(tb.client_ips)
    assert_clean_log(srv)


# --------------------------------------------------------------------------- #
# 3. Flask-SocketIO
# --------------------------------------------------------------------------- #

# Who chats, from where, over what. Addresses are client_ips[index]; with
# -w 4 the slot is index % 4. Slot 0 has three members over all three ways of
# connecting (long-polling only, WebSocket only, polling upgraded to WebSocket),
# slot 1 two, slots 2 and 3 one each.
POLLING, WEBSOCKET, UPGRADE = ["polling"], ["websocket"], ["polling", "websocket"]
MEMBERS = [("ann", 0, POLLING), ("ben", 4, WEBSOCKET), ("cat", 8, UPGRADE),
           ("dan", 1, WEBSOCKET), ("eve", 5, POLLING),
           ("fay", 2, POLLING), ("gus", 3, UPGRADE)]
ROOM = "lobby"


def test_flask_socketio_chat_pinned(testbed, ipserve):
    """python-socketio's own Client, over long-polling, WebSocket, and polling
    upgraded to WebSocket, from 7 addresses covering every slot, all in one room.

    Checks: every transport connects and is the one the server sees; emit/ack
    round trips; every engine.io HTTP request of a session (polling GETs and
    POSTs, the upgrade) came from the member's address and reached the one
    worker that holds the session -- the stickiness Socket.IO needs with
    several workers; that worker is the slot's, and a second connection from
    the same address lands there again.

    Rooms are per worker: python-socketio's default client manager keeps them
    in the worker's memory, and broadcasting to members held by other workers
    needs a message queue (SocketIO(message_queue="redis://...")), which is out
    of scope here. So a member's message must reach exactly the room members
    on the sender's worker -- the members whose address shares its low 2 bits
    -- and the server's ack lists exactly those."""
    tb = testbed
    srv, table = serve(ipserve, SOCKETIO_APP)
    pin = Pinning(table)
    spec = {"server": tb.server_ip, "port": PORT, "room": ROOM, "wait": WAIT,
            "members": [{"name": name, "src": tb.client_ips[idx], "transports": transports}
                        for name, idx, transports in MEMBERS]}
    proc = netns.call_in(tb.client_ns, [sys.executable, os.path.abspath(__file__), "sio-client",
                                        json.dumps(spec)], check=False, timeout=90)
    assert proc.returncode == 0, f"socket.io client failed ({proc.returncode}):\n{proc.stderr}"
    result = json.loads(proc.stdout)

    src_of = {m["name"]: m["src"] for m in spec["members"]}
    slot_of_member = {name: slot_of(src, WORKERS) for name, src in src_of.items()}
    same_worker = {name: sorted(n for n in src_of if slot_of_member[n] == slot_of_member[name])
                   for name in src_of}

    for member in spec["members"]:
        name, src, transports = member["name"], member["src"], member["transports"]
        got = result[name]
        expected_transport = transports[-1]       # polling+websocket: upgraded
        where = f"{name} ({src}, {'+'.join(transports)})"
        assert got["client_transport"] == expected_transport, where

        # The handshake and everything after it: one worker, the slot's.
        first, last, again = got["whoami"], got["whoami_last"], got["whoami_reconnect"]
        for step, who in (("whoami", first), ("whoami at the end", last),
                          ("whoami on reconnect", again)):
            pin.check(src, who, f"socket.io {step} of {where}")
            assert who["transport"] == expected_transport, f"{where}, {step}: {who}"
        assert first["sid"] == last["sid"] != again["sid"], where
        http = last["http"]
        assert http["addrs"] == [src], f"{where}: engine.io requests came from {http['addrs']}"
        if transports == POLLING:
            # handshake + at least: namespace connect, whoami, join, say... as
            # polling POSTs and GETs, each a separate HTTP request.
            assert http["count"] >= 4 and http["transports"] == ["polling"], f"{where}: {http}"
        elif transports == UPGRADE:
            assert set(http["transports"]) == {"polling", "websocket"}, f"{where}: {http}"
        else:
            assert http["transports"] == ["websocket"], f"{where}: {http}"

        # The room, as the member's worker sees it once everyone joined, and
        # what the member's message reached.
        for step in ("join", "say", "members_at_end"):
            pin.check(src, got[step], f"socket.io {step} ack of {where}")
        assert got["join"]["room"] == ROOM
        assert got["members_at_end"]["members"] == same_worker[name], where
        assert got["say"]["delivered_to"] == same_worker[name], where
        assert not got["missing"], f"{where}: messages never delivered: {got['missing']}"
        heard = sorted((m["from"], m["text"]) for m in got["heard"])
        assert heard == sorted((n, f"hello from {n}") for n in same_worker[name]), where
        assert all(m["pid"] == first["pid"] and m["room"] == ROOM for m in got["heard"]), where

    pin.finish([m["src"] for m in spec["members"]])
    assert_clean_log(srv)


def sio_client_main(spec: dict) -> dict:
    """The Socket.IO client side, run inside the client namespace (``ip netns
    exec``: the whole process, every thread python-socketio starts included).
    Each member connects FROM its own address of the namespace
    (sio_clients.bound_client); the app reports the REMOTE_ADDR of every
    request, so the server side checks that it worked. Reconnection is off: a
    member that loses its connection shows up as an error, not as a silent
    second session.
    """
    import threading

    import socketio
    from sio_clients import bound_client

    wait = spec["wait"]

    heard: dict[str, list[dict]] = defaultdict(list)
    arrived = threading.Condition()

    def make_client(name: str, src: str) -> socketio.Client:
        client = bound_client(src, wait)

        @client.on("said")
        def said(message):
            with arrived:
                heard[name].append(message)
                arrived.notify_all()
        return client

    def wait_heard(name: str, text: str) -> bool:
        with arrived:
            return arrived.wait_for(lambda: any(m["text"] == text for m in heard[name]), wait)

    url = f"http://{spec['server']}:{spec['port']}"
    room = spec["room"]
    members = spec["members"]
    out: dict[str, dict] = {m["name"]: {"missing": []} for m in members}
    clients: dict[str, socketio.Client] = {}
    try:
        for m in members:
            client = clients[m["name"]] = make_client(m["name"], m["src"])
            client.connect(url, transports=m["transports"], wait_timeout=wait)
            out[m["name"]]["client_transport"] = client.transport()
            out[m["name"]]["whoami"] = client.call("whoami", timeout=wait)
        for m in members:
            out[m["name"]]["join"] = clients[m["name"]].call(
                "join", {"room": room, "name": m["name"]}, timeout=wait)
        for m in members:
            text = f"hello from {m['name']}"
            ack = clients[m["name"]].call("say", {"room": room, "text": text}, timeout=wait)
            out[m["name"]]["say"] = ack
            for receiver in ack["delivered_to"]:
                if receiver not in out or not wait_heard(receiver, text):
                    out.setdefault(receiver, {"missing": []})["missing"].append(text)
        for m in members:
            name = m["name"]
            out[name]["members_at_end"] = clients[name].call("members", {"room": room},
                                                                 timeout=wait)
            out[name]["whoami_last"] = clients[name].call("whoami", timeout=wait)
            with arrived:
                out[name]["heard"] = list(heard[name])
    finally:
        for client in clients.values():
            client.disconnect()
    # A second connection from the same address: the same worker again.
    for m in members:
        client = make_client(m["name"], m["src"])
        try:
            client.connect(url, transports=m["transports"], wait_timeout=wait)
            out[m["name"]]["whoami_reconnect"] = client.call("whoami", timeout=wait)
        finally:
            client.disconnect()
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "sio-client":
        print(json.dumps(sio_client_main(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} sio-client SPEC_JSON")
