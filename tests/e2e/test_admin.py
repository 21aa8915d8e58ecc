"""End-to-end tests of the master's admin endpoint (issue 10): /metrics,
/status.json, the bearer token, refusals at start, hostile admin clients,
a unix socket, and a takeover.

The real `ipserve` runs in the testbed's server namespace with the nft
router and `--admin-bind 127.0.0.1:ADMIN_PORT` (or unix:/path); admin
clients connect from inside that namespace, application clients from the
client namespace. What is checked is what a scraper or a browser sees, what
`ipservectl status --json` says, exit codes and the one line of a refusal.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import selectors
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Self

import netns
import pytest
from backends import backend_unavailable, routed_workers, which
from netns import call_in, http_get, http_json, tcp_connect
from prometheus_client.parser import text_string_to_metric_families

PORT = 8000
ADMIN_PORT = 9100
WORKERS = 2
TOKEN = "e2e-admin-token-5f1c2a9b"
MAX_ADMIN_CONNECTIONS = 64          # ipserve.master.admin.MAX_CONNECTIONS


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

@pytest.fixture(autouse=True)
def _nft():
    why = backend_unavailable("nft")
    if why:
        pytest.skip(why)


def serve(ipserve, *, admin: str | None = f"127.0.0.1:{ADMIN_PORT}", extra=(), env=None,
          **kwargs):
    """ipserve (nft, WORKERS workers) with its admin endpoint on `admin`,
    waited for until every slot is routed and the endpoint answers."""
    args = [netns.PROBE_APP, "-w", str(WORKERS), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
            "--graceful-timeout", "5", *extra]
    if admin is not None:
        args += ["--admin-bind", admin]
    srv = ipserve(args, env=env, **kwargs)
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS) is not None, timeout=60,
                      what=f"{WORKERS} slots routed to their own active workers")
    return srv, routed_workers(st, WORKERS)


def admin_get(ns: str, target: str, method: str = "GET", headers: dict | None = None,
              port: int = ADMIN_PORT) -> tuple[int, dict, bytes]:
    return http_get(ns, None, "127.0.0.1", port, target, timeout=30, headers=headers,
                    method=method)


def admin_json(ns: str, target: str = "/status.json", headers: dict | None = None) -> dict:
    status, _, body = admin_get(ns, target, headers=headers)
    assert status == 200, (target, status, body[:300])
    return json.loads(body)


def wait_admin_json(ns: str, predicate, what: str, timeout: float = 60) -> dict:
    """/status.json, polled until predicate(document) holds."""
    def check():
        doc = admin_json(ns)
        return doc if predicate(doc) else None
    return wait_until(check, timeout, what)


def metric_families(ns: str, headers: dict | None = None) -> dict:
    status, fields, body = admin_get(ns, "/metrics", headers=headers)
    assert status == 200, (status, body[:300])
    assert fields["content-type"].startswith("text/plain; version="), fields
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def values(family, suffix: str = "", key: str | None = None) -> dict:
    """{label value of `key` (or all labels): sample value} of name+suffix samples."""
    return {(s.labels.get(key) if key else frozenset(s.labels.items())): s.value
            for s in family.samples if s.name == family.name + suffix}


def wait_until(predicate, timeout: float, what: str):
    """Poll predicate() until it returns something true; an admin request that
    fails meanwhile (refused, closed, not 200 yet) counts as not yet."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (OSError, AssertionError, http.client.HTTPException, ValueError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: "
                                 f"{last!r})")
        time.sleep(0.1)


def wait_exit(srv, timeout: float = 60) -> int:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise srv.error(f"ipserve did not exit within {timeout}s") from None


def error_lines(srv) -> list[str]:
    return [line for line in srv.own_lines() if line.startswith("ipserve: error:")]


def nft_objects(ns: str) -> list[dict]:
    out = call_in(ns, [which("nft"), "-j", "list", "ruleset"]).stdout
    return [obj for obj in json.loads(out)["nftables"] if "metainfo" not in obj]


def runtime_files(srv) -> list[str]:
    return sorted(f for f in os.listdir(srv.runtime_dir) if f.startswith(srv.name + "."))


def assert_refused_before_anything(tb, srv, before, *words: str) -> str:
    """Exit 2, one line holding `words`, no process left, firewall and files as they were."""
    assert wait_exit(srv) == 2, srv.log_tail()
    lines = srv.own_lines()
    assert len(lines) == 1 and lines[0].startswith("ipserve: error:"), lines
    for word in words:
        assert word in lines[0], lines
    assert "Traceback" not in srv.log_text()
    assert netns.ns_pids(tb.server_ns) == [], "processes left in the server namespace"
    assert nft_objects(tb.server_ns) == before
    assert [f for f in runtime_files(srv) if not f.endswith(".lock")] == []
    return lines[0]


class PortHolder:
    """Another program listening on host:port in `ns` (a socket of this process)."""

    def __init__(self, ns: str, host: str, port: int):
        with netns.in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(8)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raw_exchange(sock: socket.socket, data: bytes) -> bytes:
    """Send `data`, read until the server closes; the bytes it answered."""
    with sock:
        sock.settimeout(30)
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def parse_raw(raw: bytes) -> tuple[int, dict, bytes]:
    top, _, body = raw.partition(b"\r\n\r\n")
    first, *fields = top.decode("latin-1").split("\r\n")
    return int(first.split()[1]), {k.lower(): v for k, v in
                                   (f.split(": ", 1) for f in fields)}, body


def master_threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    raise AssertionError(f"no thread count for pid {pid}")


# --------------------------------------------------------------------------- #
# What is served
# --------------------------------------------------------------------------- #

def test_metrics_and_status_json_match_ipservectl(testbed, ipserve):
    """/status.json has ipservectl's structure and workers; /metrics has a series per worker."""
    tb = testbed
    srv, _ = serve(ipserve)
    ctl = srv.status()
    pids = {w["pid"] for w in ctl["workers"]}
    doc = wait_admin_json(tb.server_ns, lambda d: {w["pid"] for w in d["workers"]} == pids,
                          "/status.json showing the workers ipservectl shows")
    assert set(doc) == set(ctl)
    assert set(doc["master"]) == set(ctl["master"]) and doc["master"]["pid"] == srv.pid
    assert doc["name"] == srv.name and doc["router"] == "nft"
    for mine, theirs in zip(sorted(doc["workers"], key=lambda w: w["pid"]),
                            sorted(ctl["workers"], key=lambda w: w["pid"])):
        assert set(mine) == set(theirs) and mine["pid"] == theirs["pid"]

    families = metric_families(tb.server_ns)
    for family in families.values():
        assert family.documentation.strip(), family.name
    pids = {str(w["pid"]) for w in doc["workers"]}
    for name in ("ipserve_worker_rss_bytes", "ipserve_worker_connections",
                 "ipserve_worker_websockets", "ipserve_requests"):
        suffix = "_total" if name == "ipserve_requests" else ""
        assert set(values(families[name], suffix, "pid")) == pids, name
    assert values(families["ipserve_workers"], key="state")["active"] == WORKERS
    rss = values(families["ipserve_worker_rss_bytes"], key="pid")
    assert all(v > 0 for v in rss.values()), rss

    # The dashboard (or its placeholder) is HTML, and nothing is cached.
    status, fields, body = admin_get(tb.server_ns, "/")
    assert status == 200 and fields["content-type"].startswith("text/html") and body
    assert fields["cache-control"] == "no-store"


def test_client_requests_raise_the_counters(testbed, ipserve):
    """Requests from clients raise ipserve_requests_total and ipserve_responses_total{code="2xx"}."""
    tb = testbed
    serve(ipserve)

    def totals() -> tuple[float, float]:
        families = metric_families(tb.server_ns)
        requests = sum(values(families["ipserve_requests"], "_total").values())
        ok = values(families["ipserve_responses"], "_total", "code")["2xx"]
        return requests, ok

    requests0, ok0 = totals()
    n = 0
    for src in tb.client_ips:
        for _ in range(3):
            assert http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=10)["pid"]
            n += 1
    def counted() -> bool:
        requests, ok = totals()
        return requests >= requests0 + n and ok >= ok0 + n
    wait_until(counted, 60, f"the counters to count {n} more requests")
    families = metric_families(tb.server_ns)
    duration = families["ipserve_request_duration_seconds"]
    buckets = values(duration, "_bucket", "le")
    assert buckets["+Inf"] == values(duration, "_count")[frozenset()] >= n
    assert list(buckets.values()) == sorted(buckets.values())      # cumulative


def test_head_post_unknown_path_and_garbage(testbed, ipserve):
    """HEAD: the GET head without a body; POST: 405; unknown path: 404; garbage: 400/431."""
    tb = testbed
    srv, _ = serve(ipserve)
    _, get_fields, _ = admin_get(tb.server_ns, "/metrics")
    status, fields, body = admin_get(tb.server_ns, "/metrics", method="HEAD")
    assert status == 200 and body == b"" and int(fields["content-length"]) > 0
    assert fields["content-type"] == get_fields["content-type"]
    status, fields, _ = admin_get(tb.server_ns, "/metrics", method="POST")
    assert status == 405 and fields["allow"] == "GET, HEAD"
    status, fields, _ = admin_get(tb.server_ns, "/nowhere")
    assert status == 404 and fields["connection"] == "close" and fields["cache-control"] == "no-store"
    garbage = {
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03": 400,          # a TLS ClientHello
        b"GET / HTTP/1.1\nHost: x\n\n": 400,                           # bare LF
        b"GET / HTTP/2.0\r\n\r\n": 400,
        b"GET  /  HTTP/1.1\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n": 400,
        b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n": 431,
    }
    for data, expected in garbage.items():
        sock = tcp_connect(tb.server_ns, None, "127.0.0.1", ADMIN_PORT, timeout=30)
        status, fields, _ = parse_raw(raw_exchange(sock, data))
        assert status == expected and fields["connection"] == "close", (data[:40], status)
    assert srv.status()["master"]["pid"] == srv.pid


# --------------------------------------------------------------------------- #
# The token
# --------------------------------------------------------------------------- #

def test_token(testbed, ipserve):
    """With admin_token: 401 (WWW-Authenticate: Bearer) without it or with a wrong one,
    200 with it; only the page itself (no data in it) is served without it."""
    tb = testbed
    srv, _ = serve(ipserve, env={"IPSERVE_ADMIN_TOKEN": TOKEN})
    for headers in (None, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        status, fields, body = admin_get(tb.server_ns, "/", headers=headers)
        assert status == 200 and fields["content-type"].startswith("text/html")
        assert TOKEN.encode() not in body
        for target in ("/metrics", "/status.json", "/series.json", "/nowhere"):
            status, fields, body = admin_get(tb.server_ns, target, headers=headers)
            assert status == 401 and fields["www-authenticate"].startswith("Bearer"), \
                (headers, target, status)
            assert TOKEN.encode() not in body
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert metric_families(tb.server_ns, headers=good)["ipserve_workers"]
    status, _, body = admin_get(tb.server_ns, "/status.json", headers=good)
    assert status == 200 and TOKEN.encode() not in body
    assert TOKEN not in srv.log_text()


# --------------------------------------------------------------------------- #
# Refused at start
# --------------------------------------------------------------------------- #

def test_non_loopback_admin_bind_without_token_exits_2(testbed, ipserve):
    """A non-loopback admin_bind without admin_token: exit 2, one line, nothing started."""
    tb = testbed
    before = nft_objects(tb.server_ns)
    srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", "nft", "-b", f"0.0.0.0:{PORT}",
                   "--admin-bind", f"{tb.server_ip}:{ADMIN_PORT}"])
    assert_refused_before_anything(tb, srv, before, "admin_bind", "admin_token")


@pytest.mark.parametrize("case", ["in-use", "not-local"])
def test_admin_address_refused_exits_2(testbed, ipserve, case):
    """The admin address in use by another program, or not of this host: exit 2, one line, nothing started."""
    tb = testbed
    with contextlib.ExitStack() as stack:
        if case == "in-use":
            stack.enter_context(PortHolder(tb.server_ns, "127.0.0.1", ADMIN_PORT))
            address, words = f"127.0.0.1:{ADMIN_PORT}", ("already in use",)
        else:
            address, words = f"203.0.113.7:{ADMIN_PORT}", ("not an address of this host",)
        before = nft_objects(tb.server_ns)
        srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", "nft", "-b", f"0.0.0.0:{PORT}",
                       "--admin-bind", address], env={"IPSERVE_ADMIN_TOKEN": TOKEN})
        assert_refused_before_anything(tb, srv, before, address, *words)


# --------------------------------------------------------------------------- #
# Hostile admin clients never delay the loop
# --------------------------------------------------------------------------- #

GARBAGE = [b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64),
           b"\x00" * 64 + b"\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
           b"BREW /pot HTCPCP/1.0\r\n\r\n", os.urandom(512)]


class Siege:
    """Hostile admin clients in `ns`, kept up until stop(): `silent`
    connections that never send a byte (reopened whenever the server closes
    one), a slowloris trickling a head one byte at a time (reconnecting after
    each answer), and a loop of garbage requests."""

    def __init__(self, ns: str, port: int, silent: int = 200):
        self.ns, self.port, self.silent = ns, port, silent
        self.halt = threading.Event()
        self.counts: collections.Counter = collections.Counter()
        self.lock = threading.Lock()
        self.held = threading.Event()          # all `silent` connections made once
        self.threads = [threading.Thread(target=self.guarded, args=(fn,), daemon=True)
                        for fn in (self.hold_silent, self.trickle, self.garbage)]
        self.errors: list[BaseException] = []
        for t in self.threads:
            t.start()

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def guarded(self, fn) -> None:
        try:
            fn()
        except BaseException as exc:        # noqa: BLE001 - reported by stop()
            self.errors.append(exc)

    def connect(self) -> socket.socket | None:
        try:
            return tcp_connect(self.ns, None, "127.0.0.1", self.port, timeout=10)
        except OSError:
            self.count("connect failed")
            return None

    def hold_silent(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            while len(sel.get_map()) < self.silent and not self.halt.is_set():
                sock = self.connect()
                if sock is not None:
                    sel.register(sock, selectors.EVENT_READ)
            self.held.set()
            while not self.halt.is_set():
                for key, _ in sel.select(0.1):
                    sel.unregister(key.fileobj)
                    key.fileobj.close()          # closed or answered by the server: again
                    self.count("silent reopened")
                    sock = self.connect()
                    if sock is not None:
                        sel.register(sock, selectors.EVENT_READ)
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def trickle(self) -> None:
        head = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100000
        while not self.halt.is_set():
            sock = self.connect()
            if sock is None:
                continue
            with sock:
                sock.setblocking(False)
                for byte in head:
                    if self.halt.wait(0.05):
                        return
                    try:
                        sock.recv(1024, socket.MSG_PEEK)      # an answer, or the end
                        self.count("trickle answered")
                        break
                    except BlockingIOError:
                        pass                                 # nothing yet: one more byte
                    except OSError:
                        break
                    try:
                        sock.send(bytes([byte]))
                    except OSError:
                        break

    def garbage(self) -> None:
        while not self.halt.is_set():
            for data in GARBAGE:
                sock = self.connect()
                if sock is None:
                    continue
                try:
                    raw = raw_exchange(sock, data)
                except OSError:
                    raw = b""
                self.count("garbage answered" if raw else "garbage closed")
                if self.halt.wait(0.01):
                    return

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(60)
        if self.errors:
            raise self.errors[0]


def test_hostile_admin_clients_do_not_delay_the_master(testbed, ipserve):
    """200 silent admin connections, a slowloris and garbage, all kept up: meanwhile
    ipservectl answers, clients are served, and a HUP reload completes."""
    tb = testbed
    srv, _ = serve(ipserve)
    siege = Siege(tb.server_ns, ADMIN_PORT)
    try:
        assert siege.held.wait(120), "the silent connections could not all be made"
        for _ in range(3):
            st = srv.status(timeout=30)
            assert st["master"]["pid"] == srv.pid
            for src in tb.client_ips[:WORKERS]:
                assert http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=30)["pid"]
            # Bounded: at most MAX_ADMIN_CONNECTIONS connection threads, whatever comes.
            assert master_threads(srv.pid) <= MAX_ADMIN_CONNECTIONS + 16
        srv.send_signal(signal.SIGHUP)
        st = srv.wait_for(lambda st: routed_workers(st, WORKERS, generation=2) is not None,
                          timeout=120, what="every slot routed to generation 2")
        assert st["master"]["generation"] == 2
        for src in tb.client_ips[:WORKERS]:
            assert http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=30)["worker"][
                "generation"] == 2
        # Past the head deadline of the connections held: the slowloris is cut
        # off (408) however it trickles, and the master still answers.
        wait_until(lambda: siege.counts["trickle answered"] >= 1, 120, "the slowloris cut off")
        assert srv.status(timeout=30)["master"]["generation"] == 2
        assert srv.running()
    finally:
        siege.stop()
    # The siege did reach the endpoint; once it ends the endpoint answers again.
    assert siege.counts["silent reopened"] > 0, siege.counts
    assert "Traceback" not in srv.log_text() and "unexpected error" not in srv.log_text()
    doc = wait_admin_json(tb.server_ns, lambda d: d["master"]["generation"] == 2,
                          "/status.json showing generation 2")
    assert doc["master"]["pid"] == srv.pid


# --------------------------------------------------------------------------- #
# unix:/path
# --------------------------------------------------------------------------- #

def unix_exchange(path: str, data: bytes) -> tuple[int, dict, bytes]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return parse_raw(raw_exchange(sock, data))


def test_unix_socket_admin(testbed, ipserve):
    """admin_bind unix:/path: a socket file 0600 of the master's uid, serving; removed at stop."""
    tb = testbed
    top = tempfile.mkdtemp(prefix="ips-adm-")
    tb.add_path(top)
    path = os.path.join(top, "admin.sock")
    srv, _ = serve(ipserve, admin=f"unix:{path}")
    st = os.lstat(path)
    assert (st.st_mode & 0o7777, st.st_uid) == (0o600, os.geteuid()), oct(st.st_mode)
    def status_json():
        status, _, body = unix_exchange(path, b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
        return json.loads(body) if status == 200 else None
    assert wait_until(status_json, 30, "/status.json over the unix socket")["master"]["pid"] \
        == srv.pid
    status, _, body = unix_exchange(path, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and b"ipserve_workers" in body
    assert srv.stop(timeout=60) == 0
    assert not os.path.lexists(path)


# --------------------------------------------------------------------------- #
# Takeover
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_takeover_moves_the_admin_endpoint_to_the_new_master(testbed, ipserve, kind):
    """A new master of the same name takes over: it serves the admin address
    (the same port, or the same socket path) once the old one has let go."""
    tb = testbed
    if kind == "tcp":
        address = f"127.0.0.1:{ADMIN_PORT}"

        def status_json() -> dict:
            return admin_json(tb.server_ns)
    else:
        top = tempfile.mkdtemp(prefix="ips-adm-")
        tb.add_path(top)
        path = os.path.join(top, "admin.sock")
        address = f"unix:{path}"

        def status_json() -> dict:
            status, _, body = unix_exchange(path, b"GET /status.json HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 200, status
            return json.loads(body)

    def served_by(master) -> dict:
        return wait_until(lambda: (doc := status_json())["master"]["pid"] == master.pid and doc,
                          60, f"/status.json from master pid {master.pid}")

    old, _ = serve(ipserve, admin=address)
    served_by(old)
    new, _ = serve(ipserve, admin=address, name=old.name, runtime_dir=old.runtime_dir)
    assert wait_exit(old) == 0, old.log_tail()
    doc = served_by(new)
    assert doc["name"] == old.name
    assert "serving without the admin endpoint" not in new.log_text()
    assert "Traceback" not in old.log_text() + new.log_text()
    if kind == "unix":
        st = os.lstat(path)
        assert st.st_mode & 0o7777 == 0o600
        assert new.stop(timeout=60) == 0
        assert not os.path.lexists(path)


def test_takeover_refused_when_another_program_holds_the_admin_port(testbed, ipserve):
    """The old master has no admin endpoint, another program holds the port: the
    newcomer exits 2 with one line and the old master keeps serving."""
    tb = testbed
    old, table = serve(ipserve, admin=None)
    with PortHolder(tb.server_ns, "127.0.0.1", ADMIN_PORT):
        new = ipserve([netns.PROBE_APP, "-w", str(WORKERS), "--router", "nft", "-b",
                       f"0.0.0.0:{PORT}", "--admin-bind", f"127.0.0.1:{ADMIN_PORT}"],
                      name=old.name, runtime_dir=old.runtime_dir)
        assert wait_exit(new) == 2, new.log_tail()
        errors = error_lines(new)
        assert len(errors) == 1 and "already in use" in errors[0], new.own_lines()
    st = old.status()
    assert st["master"]["pid"] == old.pid and routed_workers(st, WORKERS) is not None
    assert {w["pid"] for w in table.values()} == {w["pid"] for w in st["workers"]}
    for src in tb.client_ips[:WORKERS]:
        assert http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=10)["pid"]
