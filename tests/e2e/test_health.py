"""End-to-end tests of limits and health (issue 5).

The real `ipserve` command runs in the testbed's server namespace with the nft
router; clients in the client namespace (198.18.0.16-31: low 4 bits 0..15)
reach it through the real kernel. Nothing is mocked: memory is real RSS (the
probe app's /leak touches every page), hub lag is a real busy loop (/block),
a hung worker is a real SIGSTOP, hostile clients are raw sockets.

With two workers, slot = address & 1: even last octets go to slot 0, odd ones
to slot 1. Assertions never compare durations: waits are bounded polls of
`ipservectl status --json`, and what is asserted is state (pids, routes,
states, log lines, status codes), memory bounds and counts.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import psutil
import pytest

import netns
from backends import routed_workers, slot_of
from netns import HttpClient, http_get, tcp_connect, ws_connect, ws_ending

PORT = 8000
MIB = 1 << 20
NOBODY = 65534
LEAK_MB = 20


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


pytestmark = pytest.mark.skipif(not _which("nft"), reason="nft is not installed")


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def slot_addrs(tb, slot: int, workers: int = 2) -> list[str]:
    return [a for a in tb.client_ips if slot_of(a, workers) == slot]





def wait_routed(srv, workers: int = 2, timeout: float = 30, predicate=lambda table: True,
                what: str | None = None) -> dict[int, dict]:
    st = srv.wait_for(lambda st: (t := routed_workers(st, workers)) is not None and predicate(t),
                      timeout=timeout, interval=0.05,
                      what=what or f"{workers} active workers, each routed its own slot")
    return routed_workers(st, workers)


def serve(ipserve, workers: int = 2, extra=(), **kwargs):
    """Start ipserve (nft router, probe app) and wait until every slot is
    routed to its own worker. Returns (process, {slot: worker status})."""
    args = [kwargs.pop("app", netns.PROBE_APP), "-w", str(workers), "--router", "nft",
            "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "3", *map(str, extra)]
    srv = ipserve(args, **kwargs)
    return srv, wait_routed(srv, workers)


def worker(st: dict, pid: int) -> dict | None:
    for w in st.get("workers") or []:
        if w["pid"] == pid:
            return w
    return None


def get(tb, src: str, path: str = "/", timeout: float = 10, **kw):
    return http_get(tb.client_ns, src, tb.server_ip, PORT, path, timeout=timeout, **kw)


def get_json(tb, src: str, path: str = "/", timeout: float = 10) -> dict:
    status, _, body = get(tb, src, path, timeout=timeout)
    assert status == 200, f"GET {path} from {src}: HTTP {status} {body[:200]!r}"
    return json.loads(body)


def wait_exited(srv, pid: int, timeout: float = 30) -> None:
    srv.note_worker_pid(pid)
    srv.wait_workers_gone(timeout, pids=[pid])


class Bg(threading.Thread):
    """Run fn() in a thread; .result or .error afterwards."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as exc:        # noqa: BLE001 - reported by value()
            self.error = exc

    def value(self, timeout: float = 30):
        self.join(timeout)
        assert not self.is_alive(), "background request did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wait_spinning(pid: int, since: float, cpu: float = 0.3, timeout: float = 10) -> None:
    """Wait until `pid` has burnt `cpu` CPU seconds more than `since`: the busy
    loop of /block is running (an idle worker uses next to none)."""
    deadline = time.monotonic() + timeout
    while cpu_seconds(pid) - since < cpu:
        assert time.monotonic() < deadline, f"worker {pid} never started spinning"
        time.sleep(0.02)


# --------------------------------------------------------------------------- #
# Memory: worker_memory and cluster_memory
# --------------------------------------------------------------------------- #

def leak_until_replaced(srv, tb, pid: int, src: str, limit: int, max_leaks: int = 12) -> int:
    """/leak 20 MiB at a time into worker `pid` (from `src`, a fresh connection
    each time) until the master, which measures RSS itself, starts replacing
    it. After each leak, waits for the master's measurement to show it; while
    that RSS is at or under `limit` the worker must not be replaced.
    Returns the number of leaks."""
    for leaks in range(1, max_leaks + 1):
        before = worker(srv.status(), pid)["rss"]
        data = get_json(tb, src, f"/leak?mb={LEAK_MB}")
        assert data["pid"] == pid and data["mb"] == leaks * LEAK_MB, data
        st = srv.wait_for(lambda st: worker(st, pid)["rss"] >= before + (LEAK_MB - 2) * MIB,
                          timeout=10, what=f"the master to measure leak {leaks} in pid {pid}")
        w = worker(st, pid)
        if w["rss"] > limit:
            srv.wait_for(lambda st: worker(st, pid)["replacing"] or worker(st, pid)["state"] != "active",
                         timeout=10, what=f"pid {pid} (RSS above the limit) to be replaced")
            return leaks
        assert w["replacing"] is None and w["state"] == "active", \
            f"pid {pid} replaced at RSS {w['rss'] >> 20} MiB, limit {limit >> 20} MiB: {w}"
    raise AssertionError(f"{max_leaks} leaks of {LEAK_MB} MiB never pushed pid {pid} over "
                         f"{limit >> 20} MiB")


def test_worker_memory_replaces_worker_and_old_one_drains(testbed, ipserve):
    limit = 100 * MIB
    srv, table = serve(ipserve, extra=["--worker-memory", "100MiB"])
    old, other = table[0], table[1]
    src, ws_src, later = slot_addrs(testbed, 0)[:3]

    # A WebSocket pinned to the old worker: it must survive the replacement.
    ws = ws_connect(testbed.client_ns, ws_src, testbed.server_ip, PORT, timeout=10)
    try:
        ws.send("before")
        assert ws.recv() == "before"
        leaks = leak_until_replaced(srv, testbed, old["pid"], src, limit)

        # A fresh worker takes slot 0; the old one retires holding the WebSocket.
        table = wait_routed(srv, predicate=lambda t: t[0]["pid"] != old["pid"],
                            what="a new worker routed for slot 0")
        new = table[0]
        assert table[1]["pid"] == other["pid"], "slot 1's worker was replaced too"
        st = srv.wait_for(lambda st: (w := worker(st, old["pid"])) is not None
                          and w["state"] == "retiring" and w["connections"] >= 1,
                          timeout=10, what="the old worker retiring with its WebSocket")
        assert worker(st, new["pid"])["rss"] < limit
        assert any(f"replacing worker pid {old['pid']} (slot 0): RSS" in line
                   and "worker_memory" in line for line in srv.own_lines()), srv.log_tail()

        # New connections of the slot reach the new worker ...
        for a in (src, later):
            assert get_json(testbed, a)["pid"] == new["pid"]
        # ... while the old one still serves what it holds (it drains).
        ws.send("while retiring")
        assert ws.recv() == "while retiring"
        assert netns._is_alive(old["pid"])
    finally:
        ws.close()
    # Its last connection closed: the old worker exits.
    wait_exited(srv, old["pid"])
    st = srv.status()
    assert worker(st, old["pid"]) is None
    assert routed_workers(st, 2)[0]["pid"] == new["pid"]
    print(f"worker_memory 100MiB: replaced after {leaks} leaks of {LEAK_MB} MiB")


def test_cluster_memory_ends_retiring_workers_first(testbed, ipserve):
    # The limits depend on a worker's baseline RSS here: measure it first.
    # (Read with psutil, as the master does, after each worker served a
    # request: a status taken right after start-up may show a booting worker.)
    probe, table = serve(ipserve)
    for slot in (0, 1):
        assert get_json(testbed, slot_addrs(testbed, slot)[0])["pid"] == table[slot]["pid"]
    base = max(psutil.Process(w["pid"]).memory_info().rss for w in table.values())
    probe.stop(timeout=15)

    # Worker A is replaced after 5 leaks (base + 100 MiB > base + 90 MiB).
    # Then A (retiring, held by a WebSocket), its successor and worker B total
    # about 3*base + 100 MiB: 1/0.875 of that is the cluster limit, so the
    # total sits between 80% and 95% of it (asks retiring workers to exit),
    # and under 100% while A is still active and its successor boots (so no
    # active worker is replaced for the cluster's sake).
    worker_memory = base + 90 * MIB
    total = 3 * base + 5 * LEAK_MB * MIB
    cluster = int(total / 0.875)
    srv, table = serve(ipserve, extra=["--worker-memory", worker_memory,
                                       "--cluster-memory", cluster,
                                       "--health-retire-interval", "0"])
    a, b = table[0], table[1]
    src, ws_src = slot_addrs(testbed, 0)[:2]
    ws = ws_connect(testbed.client_ns, ws_src, testbed.server_ip, PORT, timeout=10)
    try:
        ws.send("hold")
        assert ws.recv() == "hold"
        leak_until_replaced(srv, testbed, a["pid"], src, worker_memory)
        table = wait_routed(srv, predicate=lambda t: t[0]["pid"] != a["pid"],
                            what="a new worker routed for slot 0")
        a2 = table[0]
        # Without memory pressure A would wait for its WebSocket forever (no
        # retired_timeout); above 80% of cluster_memory the master ends it.
        lines = srv.wait_log(rf"cluster_memory above (80|95)%: .* retiring worker pid {a['pid']}\b")
        wait_exited(srv, a["pid"])
        # Asked to exit (80%), it closes its WebSocket with 1001 (going away);
        # killed (95%), the connection is cut. Either way the server ended it.
        ending = ws_ending(ws)
        assert ending in ("close 1001", "cut"), ending
    finally:
        ws.close()

    st = srv.status()
    assert worker(st, a["pid"]) is None
    table = routed_workers(st, 2)
    # Only the retiring worker paid: the active ones are the same processes.
    assert table is not None and table[0]["pid"] == a2["pid"] and table[1]["pid"] == b["pid"], st
    assert all(w["replacing"] is None for w in st["workers"]), st
    log = "\n".join(srv.own_lines())
    assert f"replacing worker pid {b['pid']}" not in log
    assert f"replacing worker pid {a2['pid']}" not in log
    assert "largest worker while cluster_memory" not in log
    print(f"baseline RSS {base / MIB:.1f} MiB, worker_memory {worker_memory / MIB:.0f} MiB, "
          f"cluster_memory {cluster / MIB:.0f} MiB: {lines[0].split('] ', 3)[-1]}")


# --------------------------------------------------------------------------- #
# Hub lag: lag_ms, too_busy, block_report, shed_load
# --------------------------------------------------------------------------- #

def test_blocked_hub_reports_lag_too_busy_and_stack(testbed, ipserve):
    srv, table = serve(ipserve, extra=["--block-report", "1s"])
    a, b = table[0], table[1]
    block_src, *busy_srcs = slot_addrs(testbed, 0)[:4]
    idle = get_json(testbed, busy_srcs[0], "/busy")
    assert idle["pid"] == a["pid"] and idle["too_busy_env"] is False and idle["too_busy_fn"] is False

    cpu0 = cpu_seconds(a["pid"])
    block = Bg(lambda: get_json(testbed, block_src, "/block?s=3", timeout=30))
    wait_spinning(a["pid"], cpu0)
    # Sent while the hub is blocked: they wait in the accept queue and are
    # answered after the block, when the worker knows it is too busy.
    busy = [Bg(lambda s=s: get_json(testbed, s, "/busy", timeout=30)) for s in busy_srcs]
    # The other worker is not affected.
    assert get_json(testbed, slot_addrs(testbed, 1)[0])["pid"] == b["pid"]

    seen = []

    def lagging(st):
        w = worker(st, a["pid"])
        seen.append(w["lag_ms"])
        return w["lag_ms"] > 2000

    srv.wait_for(lagging, timeout=20, interval=0.05, what="lag_ms above 2000 for the blocked worker")
    assert block.value()["spins"] > 0
    answers = [t.value() for t in busy]
    assert all(r["pid"] == a["pid"] for r in answers), answers
    assert all(r["too_busy_env"] is True and r["too_busy_fn"] is True for r in answers), answers

    # gevent's monitor thread named the blocking code in the worker's log.
    srv.wait_log(r"Blocked Stack")
    text = "\n".join(srv.own_lines())
    report = text[text.index("Blocked Stack"):]
    assert re.search(r'probe\.py", line \d+, in _block_hub', report), srv.log_tail(80)

    # The lag passes: too_busy goes back to false; the worker was not replaced
    # (busy_retire_after is 45 s).
    deadline = time.monotonic() + 15
    while (r := get_json(testbed, busy_srcs[0], "/busy"))["too_busy_env"]:
        assert time.monotonic() < deadline, r
        time.sleep(0.1)
    assert r["pid"] == a["pid"] and r["too_busy_fn"] is False
    print(f"lag_ms seen in status: max {max(seen):.0f} ({len(seen)} polls)")


def test_shed_load_answers_503_while_blocked(testbed, ipserve):
    srv, table = serve(ipserve, extra=["--shed-load", "true"])
    a = table[0]
    block_src, ws_src, *srcs = slot_addrs(testbed, 0)[:7]
    ws = ws_connect(testbed.client_ns, ws_src, testbed.server_ip, PORT, timeout=30)
    try:
        ws.send("before")
        assert ws.recv() == "before"
        cpu0 = cpu_seconds(a["pid"])
        block = Bg(lambda: get_json(testbed, block_src, "/block?s=3", timeout=30))
        wait_spinning(a["pid"], cpu0)
        ws.send("during")                   # queued in the socket, echoed after the block
        plain = [Bg(lambda s=s: get(testbed, s, "/whoami", timeout=30)) for s in srcs]
        # The other worker is not busy and sheds nothing.
        assert get_json(testbed, slot_addrs(testbed, 1)[0])["pid"] == table[1]["pid"]
        assert block.value()["pid"] == a["pid"]
        answers = [t.value() for t in plain]
        codes = [status for status, _, _ in answers]
        assert set(codes) <= {200, 503}, answers
        shed = [(status, headers) for status, headers, _ in answers if status == 503]
        # Shedding is probabilistic ((lag - busy_lag) / busy_lag): right after
        # a 3 s block it is certain, and these requests are handled then.
        assert shed, f"no request was shed: {codes}"
        assert all(h.get("retry-after", "").isdigit() for _, h in shed), shed
        # Open WebSockets are never shed or dropped.
        assert ws.recv() == "during"
        ws.send("after")
        assert ws.recv() == "after"
    finally:
        ws.close()
    # The lag passes and plain requests are served again, by the same worker.
    deadline = time.monotonic() + 15
    while (r := get(testbed, srcs[0], "/whoami"))[0] != 200:
        assert r[0] == 503 and time.monotonic() < deadline, r
        time.sleep(0.1)
    assert json.loads(r[2])["pid"] == a["pid"]
    print(f"shed_load: {codes.count(503)} of {len(codes)} requests queued during the block got 503")


# --------------------------------------------------------------------------- #
# Hung worker: SIGSTOP
# --------------------------------------------------------------------------- #

def whoami(tb, src: str, timeout: float = 10) -> tuple[int | None, str | None]:
    """(pid, None) for a 200 from /whoami, else (None, what went wrong)."""
    try:
        status, _, body = get(tb, src, "/whoami", timeout=timeout)
    except Exception as exc:                # noqa: BLE001 - reported by the caller
        return None, repr(exc)
    if status != 200:
        return None, f"HTTP {status}"
    return json.loads(body)["pid"], None


def stop_worker(srv, pid: int) -> int:
    """SIGSTOP `pid` through a pidfd; returns the pidfd (readable once it exits)."""
    fd = os.pidfd_open(pid)
    srv.note_worker_pid(pid)
    signal.pidfd_send_signal(fd, signal.SIGSTOP)
    return fd


def exited(pidfd: int) -> bool:
    return bool(select.select([pidfd], [], [], 0)[0])


def test_stopped_worker_is_replaced_and_its_addresses_served(testbed, ipserve):
    """A SIGSTOPped worker is found silent after `timeout` and replaced on its
    own sockets. Its clients wait in their slot's queue and are answered by
    the replacement, never by the other slot's worker; the other slot is
    served throughout."""
    srv, table = serve(ipserve, extra=["--timeout", "3s"])
    a, b = table[0], table[1]
    slot0, slot1 = slot_addrs(testbed, 0), slot_addrs(testbed, 1)
    stopped = stop_worker(srv, a["pid"])
    try:
        # Until the master notices the silence, slot 0's connections wait in
        # its queue (the stopped worker's listener): nothing can answer them
        # before the master acts; that wait is what `timeout` bounds. They are
        # sent (one per slot-0 address) but not counted here; the next test
        # checks their fate. Slot 1 is unaffected meanwhile.
        caught = [Bg(lambda s=s: whoami(testbed, s, timeout=60)) for s in slot0]
        before: list[tuple[str, int | None, str | None]] = []
        while True:
            w = worker(srv.status(), a["pid"])
            if w is None or w["state"] == "hung":
                break
            before += [(src, *whoami(testbed, src)) for src in slot1]
            assert len(before) < 16 * 200, "the master never noticed the stopped worker"
        # From the moment the master has noticed, every request from all 16
        # addresses must succeed, each answered by its own slot's worker: slot
        # 0's wait in their queue for the replacement. Rounds over every
        # address until the stopped worker is gone and its replacement active,
        # then one more.
        after: list[tuple[str, int | None, str | None]] = []
        done = False
        deadline = time.monotonic() + 60
        while True:
            after += [(src, *whoami(testbed, src, timeout=30)) for src in testbed.client_ips]
            if done:
                break
            assert time.monotonic() < deadline, "the stopped worker was not replaced"
            table = routed_workers(srv.status(), 2)
            done = bool(table and table[0]["pid"] != a["pid"] and exited(stopped))
    finally:
        os.close(stopped)

    a2 = table[0]
    assert table[1]["pid"] == b["pid"]
    assert [r for r in before if r[2] is not None or r[1] != b["pid"]] == []
    failures = [r for r in after if r[2] is not None]
    assert failures == [], f"{len(failures)} of {len(after)} requests failed after the switch: {failures[:8]}"
    for src in testbed.client_ips:
        pids = {pid for s, pid, _ in after if s == src}
        assert pids == {table[slot_of(src, 2)]["pid"]}, (src, pids, "served by another slot")
    assert any(f"worker pid {a['pid']} (slot 0) sent no heartbeat" in line for line in srv.own_lines())
    print(f"SIGSTOP: {len(before)} slot-1 requests before the master noticed, {len(after)} requests "
          f"from all 16 addresses after it, none failed, slot 0's all answered by pid {a2['pid']}")
    for t in caught:
        t.join(0)                           # their fate is the next test's business


def test_requests_caught_by_stopped_worker_are_not_stranded(testbed, ipserve):
    """Requests the kernel queued for a stopped worker before the master
    noticed end once that worker is gone: served by its replacement (the
    master holds the worker's listening sockets) or refused, never left
    waiting in a backlog no process accepts from."""
    srv, table = serve(ipserve, extra=["--timeout", "3s"])
    a = table[0]
    stopped = stop_worker(srv, a["pid"])
    try:
        caught = [Bg(lambda s=s: whoami(testbed, s, timeout=60)) for s in slot_addrs(testbed, 0)[:4]]
        wait_routed(srv, predicate=lambda t: t[0]["pid"] != a["pid"] and exited(stopped),
                    what="the stopped worker gone and its replacement routed")
    finally:
        os.close(stopped)
    # A hang detector, not a timing: once the worker is gone, each of these
    # has an answer or a refusal at once; 5 s is a lot of slack.
    deadline = time.monotonic() + 5
    for t in caught:
        t.join(max(0.0, deadline - time.monotonic()))
    hanging = sum(t.is_alive() for t in caught)
    outcomes = [t.result for t in caught if not t.is_alive()]
    print(f"caught by the stopped worker: {outcomes}, {hanging} still waiting")
    assert hanging == 0, f"{hanging} of {len(caught)} requests still wait on a dead worker's backlog"


# --------------------------------------------------------------------------- #
# Hostile clients
# --------------------------------------------------------------------------- #

LIMITS = ["--limit-request-line", "512", "--limit-request-fields", "20",
          "--limit-request-field-size", "1024"]
HOST = b"Host: example\r\n"


def _chunked(body: bytes, path: bytes = b"/echo") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n" + body)


# name -> (request bytes, what may come back: statuses, and CLOSED for a
# connection closed without an answer). Where the server stops reading at a
# limit, it closes with request bytes unread, which may reset the connection
# before its answer is read: there a bare close is acceptable too.
CLOSED = None
CORPUS: dict[str, tuple[bytes, set]] = {
    "request line over limit_request_line":
        (b"GET /" + b"a" * 700 + b" HTTP/1.1\r\n" + HOST + b"\r\n", {414, CLOSED}),
    "more headers than limit_request_fields":
        (b"GET / HTTP/1.1\r\n" + HOST + b"".join(b"X-%d: y\r\n" % i for i in range(30)) + b"\r\n",
         {431, CLOSED}),
    "header line over limit_request_field_size":
        (b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 1500 + b"\r\n\r\n", {431, CLOSED}),
    "chunk size not hex": (_chunked(b"zz\r\nhello\r\n0\r\n\r\n"), {400}),
    "chunk data longer than its size": (_chunked(b"5\r\nhelloXX\r\n0\r\n\r\n"), {400}),
    "chunk size overflow": (_chunked(b"f" * 40 + b"\r\nx\r\n0\r\n\r\n"), {400}),
    "chunk extension too long": (_chunked(b"5;" + b"e" * 10000 + b"\r\nhello\r\n0\r\n\r\n"),
                                 {400, CLOSED}),
    "body ends inside a chunk": (_chunked(b"10\r\nshort"), {400}),
    "header without colon": (b"GET / HTTP/1.1\r\n" + HOST + b"NoColonHere\r\n\r\n", {400}),
    "whitespace before colon": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A : b\r\n\r\n", {400}),
    "header name not a token": (b"GET / HTTP/1.1\r\n" + HOST + b"Bad[Name]: b\r\n\r\n", {400}),
    "obs-fold continuation line": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\r\n  folded\r\n\r\n",
                                   {400}),
    "NUL in header value": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\x00c\r\n\r\n", {400}),
    "NUL in header name": (b"GET / HTTP/1.1\r\n" + HOST + b"X\x00A: b\r\n\r\n", {400}),
    "bare CR in header": (b"GET / HTTP/1.1\r\n" + HOST + b"X-A: b\rX-B: c\r\n\r\n", {400}),
    "NUL in request line": (b"GET /\x00\x00 HTTP/1.1\r\n" + HOST + b"\r\n", {400}),
    "invalid HTTP version": (b"GET / HTTP/9.9\r\n" + HOST + b"\r\n", {400, 505}),
    "non-numeric HTTP version": (b"GET / HTTP/1.x\r\n" + HOST + b"\r\n", {400, 505}),
    "not HTTP": (b"GET / FOO/1.1\r\n" + HOST + b"\r\n", {400, 505}),
    "HTTP/0.9 request line": (b"GET /\r\n", {400, 505}),
    "request line of four words": (b"GET / HTTP/1.1 extra\r\n" + HOST + b"\r\n", {400}),
    "method only": (b"GET\r\n\r\n", {400}),
    "bare CR line ends": (b"GET / HTTP/1.1\rHost: x\r\r\n", {400}),
    "negative Content-Length": (b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: -5\r\n\r\n",
                                {400}),
    "non-numeric Content-Length": (b"POST /echo HTTP/1.1\r\n" + HOST
                                   + b"Content-Length: abc\r\n\r\n", {400}),
    "conflicting Content-Lengths": (b"POST /echo HTTP/1.1\r\n" + HOST
                                    + b"Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
                                    {400}),
    "Content-Length with chunked": (b"POST /echo HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    "Transfer-Encoding not chunked": (b"POST /echo HTTP/1.1\r\n" + HOST
                                      + b"Transfer-Encoding: gzip\r\n\r\n0\r\n\r\n", {400, 501}),
    "Transfer-Encoding twice": (b"POST /echo HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
                                b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400, 501}),
    "body shorter than Content-Length": (b"POST /echo HTTP/1.1\r\n" + HOST
                                         + b"Content-Length: 10\r\n\r\nabc", {400}),
    "HEAD with a body": (b"HEAD / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n\r\nabcde", {400}),
    "bare LF garbage": (b"\n\n\n\n\n", {400}),
    "binary garbage (TLS hello)": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
                                   {400}),
    "NUL bytes only": (b"\x00" * 64 + b"\r\n\r\n", {400}),
    "EOF inside the headers": (b"GET / HTTP/1.1\r\n" + HOST, {400}),
}
HALF_CLOSE = {"EOF inside the headers", "body ends inside a chunk",
              "body shorter than Content-Length"}


def send_raw(tb, src: str, payload: bytes, half_close: bool = False,
             timeout: float = 3.0) -> tuple[int | None, str]:
    """Send `payload` on a fresh connection and read what comes back.

    Returns (status, how): status None when the server closed without an
    answer. `how` says how the exchange ended: "closed" (EOF or reset after
    the answer, or instead of one), "open" (a complete keep-alive answer),
    or "hang" (nothing within `timeout`)."""
    sock = tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=timeout)
    try:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                             # it may have answered before closing: read on
        resp = http.client.HTTPResponse(sock)
        try:
            resp.begin()
            resp.read()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None, "closed"
        except (socket.timeout, TimeoutError):
            return None, "hang"
        if not resp.will_close:
            return resp.status, "open"
        try:
            rest = sock.recv(4096)
        except ConnectionResetError:
            rest = b""
        except (socket.timeout, TimeoutError):
            return resp.status, "hang"
        return resp.status, "closed" if rest == b"" else f"more data after close: {rest[:80]!r}"
    finally:
        sock.close()


def check_outcome(name: str, outcome: tuple[int | None, str]) -> str | None:
    """None if `outcome` is acceptable for corpus entry `name`, else why not."""
    status, how = outcome
    allowed = CORPUS[name][1]
    if how == "hang":
        return f"{name}: no answer and no close within the timeout"
    if how not in ("closed", "open"):
        return f"{name}: {how}"
    if status is None:
        return None if CLOSED in allowed else f"{name}: closed without an answer"
    if not 400 <= status < 500 or status not in allowed:
        return f"{name}: HTTP {status}, expected {sorted(a for a in allowed if a)}"
    return None


def test_invalid_requests_get_4xx_or_close_and_leave_rss_flat(testbed, ipserve):
    srv, table = serve(ipserve, workers=1, extra=[*LIMITS, "--header-timeout", "10s"])
    pid = table[0]["pid"]
    srcs = testbed.client_ips

    # Requests at the limits are fine (the limits are not off by a lot).
    ok = b"GET /" + b"a" * 400 + b" HTTP/1.1\r\n" + HOST + b"".join(
        b"X-%d: %s\r\n" % (i, b"v" * 900 if i == 0 else b"y") for i in range(18)) + b"\r\n"
    assert send_raw(testbed, srcs[0], ok) == (404, "open")

    problems = []
    for name, (payload, _) in CORPUS.items():
        outcome = send_raw(testbed, srcs[1], payload, half_close=name in HALF_CLOSE)
        if (why := check_outcome(name, outcome)) is not None:
            problems.append(why)
    assert problems == [], "\n".join(problems)
    st = srv.status()
    assert routed_workers(st, 1)[0]["pid"] == pid, "the worker was replaced"
    assert get_json(testbed, srcs[2])["pid"] == pid
    assert "Traceback" not in srv.log_text(), srv.log_tail(80)

    # Memory: warm up, then 1,000 more invalid requests. The master measures
    # RSS once a second: wait for a fresh measurement each time.
    names = list(CORPUS)

    def hammer(n: int) -> None:
        for i in range(n):
            name = names[i % len(names)]
            outcome = send_raw(testbed, srcs[i % len(srcs)], CORPUS[name][0],
                               half_close=name in HALF_CLOSE)
            assert check_outcome(name, outcome) is None, (i, check_outcome(name, outcome))

    def fresh_rss() -> int:
        time.sleep(1.2)
        return worker(srv.status(), pid)["rss"]

    hammer(200)
    rss_before = fresh_rss()
    hammer(1000)
    rss_after = fresh_rss()
    assert routed_workers(srv.status(), 1)[0]["pid"] == pid
    assert get_json(testbed, srcs[3])["pid"] == pid
    growth = rss_after - rss_before
    print(f"RSS before {rss_before / MIB:.2f} MiB, after 1000 invalid requests "
          f"{rss_after / MIB:.2f} MiB ({growth / 1024:+.0f} KiB)")
    # A bound, not a timing: ~20 KiB is what 1,000 requests cost here. One
    # traceback chain kept per refused request (with its handler frames) was
    # ~4 KiB per request, several MiB per thousand.
    assert growth < 2 * MIB, f"RSS grew {growth / MIB:.1f} MiB over 1000 invalid requests"


def dribble(sock: socket.socket, data: bytes) -> tuple[int, bytes, str]:
    """Send `data` one byte a second until the server answers or closes.
    Returns (bytes sent, what the server sent, how it ended)."""
    sent = 0
    sock.settimeout(1.0)
    for byte in (data[i:i + 1] for i in range(len(data))):
        try:
            sock.sendall(byte)
        except (BrokenPipeError, ConnectionResetError) as exc:
            return sent, b"", f"send failed: {exc!r}"
        sent += 1
        try:
            got = sock.recv(4096)
        except (socket.timeout, TimeoutError):
            continue
        except ConnectionResetError:
            return sent, b"", "reset"
        if not got:
            return sent, b"", "eof"
        rest = got
        sock.settimeout(5.0)
        try:
            while chunk := sock.recv(4096):
                rest += chunk
        except (socket.timeout, TimeoutError, ConnectionResetError):
            return sent, rest, "answered, not closed"
        return sent, rest, "answered and closed"
    return sent, b"", "never closed"


def test_slowloris_closed_after_header_timeout(testbed, ipserve):
    srv, table = serve(ipserve, workers=1, extra=["--header-timeout", "2s"])
    pid = table[0]["pid"]
    cases = {                           # name -> (sent at once, then one byte a second)
        "request line": (b"", b"GET /whoami HTTP/1.1\r\n" + HOST + b"\r\n"),
        "headers": (b"GET /whoami HTTP/1.1\r\n" + HOST,
                    b"".join(b"X-Padding-%d: some value\r\n" % i for i in range(10)) + b"\r\n"),
    }

    def attack(prefix: bytes, trickle: bytes, src: str):
        sock = tcp_connect(testbed.client_ns, src, testbed.server_ip, PORT, timeout=5)
        try:
            if prefix:
                sock.sendall(prefix)
            return (len(trickle), *dribble(sock, trickle))
        finally:
            sock.close()

    srcs = testbed.client_ips
    attacks = {name: Bg(lambda p=p, t=t, s=s: attack(p, t, s))
               for (name, (p, t)), s in zip(cases.items(), srcs)}
    # A connection that sends nothing at all is also closed.
    silent = tcp_connect(testbed.client_ns, srcs[5], testbed.server_ip, PORT, timeout=30)
    try:
        silent_got = b""
        while chunk := silent.recv(4096):
            silent_got += chunk
    finally:
        silent.close()
    for name, t in attacks.items():
        total, sent, got, how = t.value(timeout=60)
        assert how in ("eof", "reset", "answered and closed") or how.startswith("send failed"), \
            f"{name}: {how} after {sent} bytes"
        assert sent < total, f"{name}: the whole request was sent before the server closed"
        if got:
            assert got.startswith(b"HTTP/1.1 408 "), (name, got)
    assert silent_got == b"" or silent_got.startswith(b"HTTP/1.1 408 "), silent_got
    # The worker is unharmed.
    assert get_json(testbed, srcs[6])["pid"] == pid
    assert routed_workers(srv.status(), 1)[0]["pid"] == pid


def test_keepalive_idle_connection_closed(testbed, ipserve):
    srv, table = serve(ipserve, workers=1, extra=["--keepalive", "1s", "--header-timeout", "60s"])
    pid = table[0]["pid"]
    src, fresh_src = testbed.client_ips[:2]
    # A connection that has sent no request yet is governed by header_timeout
    # (60 s here), not by keepalive: it must outlive the idle keep-alive one.
    fresh = tcp_connect(testbed.client_ns, fresh_src, testbed.server_ip, PORT, timeout=5)
    try:
        with HttpClient(testbed.client_ns, src, testbed.server_ip, PORT, timeout=10) as client:
            for _ in range(3):          # back to back: one connection serves them all
                assert client.json("/whoami")["pid"] == pid
            assert client.connects == 1
            sock = client.sock
            sock.settimeout(20)
            # Idle: the server ends the connection (a plain close, no 408).
            assert sock.recv(4096) == b""
            with pytest.raises(ConnectionError):
                client.get("/whoami")
        fresh.setblocking(False)
        with pytest.raises(BlockingIOError):
            fresh.recv(1)           # still open, nothing sent: header_timeout not reached
        fresh.setblocking(True)
        fresh.settimeout(10)
        fresh.sendall(b"GET /whoami HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        resp = http.client.HTTPResponse(fresh)
        resp.begin()
        assert resp.status == 200 and json.loads(resp.read())["pid"] == pid
    finally:
        fresh.close()


# --------------------------------------------------------------------------- #
# --user, max_requests
# --------------------------------------------------------------------------- #

def readable_by(uid: int, path: str) -> bool:
    gid = netns._primary_gid(uid)
    return subprocess.run([netns.SETPRIV, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           "test", "-r", path], capture_output=True).returncode == 0


def test_user_nobody_runs_workers_as_nobody(testbed, ipserve):
    if os.geteuid() != 0:
        pytest.skip("--user needs the master to start as root")
    # Workers (uid 65534) must read the app and reach the control socket:
    # a private runtime directory the harness would make is 0700 root.
    shared = tempfile.mkdtemp(prefix="ips-user-")
    testbed.add_path(shared)
    os.chmod(shared, 0o755)
    runtime = os.path.join(shared, "run")
    os.mkdir(runtime, 0o755)
    app = netns.PROBE_APP_PATH
    if not readable_by(NOBODY, app):
        app = os.path.join(shared, "probe.py")
        shutil.copy(netns.PROBE_APP_PATH, app)
        os.chmod(app, 0o644)
    if not readable_by(NOBODY, os.path.join(netns.REPO_ROOT, "ipserve", "worker", "main.py")):
        pytest.skip("the ipserve package is not readable by nobody here")
    srv, table = serve(ipserve, workers=4, extra=["--user", "nobody"],
                       app=app + ":application", runtime_dir=runtime)

    assert psutil.Process(srv.pid).uids().real == 0      # the master stays root
    for slot, w in table.items():
        proc = psutil.Process(w["pid"])
        assert tuple(proc.uids()) == (NOBODY, NOBODY, NOBODY), (slot, proc.uids())
        assert proc.gids().real == netns._primary_gid(NOBODY)
        ps = subprocess.run(["ps", "-o", "user=,uid=", "-p", str(w["pid"])], capture_output=True,
                            text=True, check=True).stdout.split()
        assert ps == ["nobody", str(NOBODY)], ps
        with open(f"/proc/{w['pid']}/status") as fh:
            fields = dict(line.split(":", 1) for line in fh)
        assert fields["Groups"].split() == [], fields["Groups"]
        assert int(fields["CapEff"], 16) == 0
    # Routing still pins every address to its slot's worker.
    for src in testbed.client_ips:
        data = get_json(testbed, src)
        assert data["remote_addr"] == src
        assert data["pid"] == table[slot_of(src, 4)]["pid"], (src, data)


def test_max_requests_replaces_worker(testbed, ipserve):
    srv, table = serve(ipserve, extra=["--max-requests", "5"])
    a, b = table[0], table[1]
    srcs = slot_addrs(testbed, 0)
    for i in range(5):
        assert get_json(testbed, srcs[i % len(srcs)])["pid"] == a["pid"]
    table = wait_routed(srv, predicate=lambda t: t[0]["pid"] != a["pid"],
                        what="a new worker for slot 0 after 5 requests")
    assert table[1]["pid"] == b["pid"], "slot 1's worker served nothing and must stay"
    wait_exited(srv, a["pid"])
    assert any(f"replacing worker pid {a['pid']} (slot 0): served" in line
               and "max_requests" in line for line in srv.own_lines()), srv.log_tail()
    assert get_json(testbed, srcs[0])["pid"] == table[0]["pid"]
