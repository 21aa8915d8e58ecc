#!/usr/bin/env python3
"""Memory per idle connection in ipserve workers: idle WebSockets, idle
keep-alive HTTP connections and held long-polls.

    sudo .venv/bin/python bench/idle_ws.py [-n 5000] [-w 1] [--kind ws --kind keepalive --kind poll]
        [--repeat 3] [--concurrency 256] [--settle 2]
    sudo .venv/bin/python bench/idle_ws.py --scale        # 100,000 idle WebSockets on -w 8

For each kind and repeat a fresh `ipserve bench/apps/ws_idle.py -w W
--keepalive 3600` starts in a server namespace. The client (this process,
one thread, epoll, raw non-blocking sockets: no thread or greenlet per
connection) opens N connections from 4 client namespaces x 16 source
addresses, at most --concurrency of them connecting or handshaking at a time:

  ws         GET /ws with an Upgrade handshake; 101, then silence
  keepalive  GET /, the whole response read, then silence on the connection
  poll       GET /poll, which the app holds (until /release)

The workers' RSS (VmRSS, /proc/<pid>/status) is read before (after a warm-up
and a settle), right after the N are open, and after a settle again. A
settle asks every worker for /stats?gc=1 (gc.collect() and malloc_trim(0) in
the worker), then waits --settle seconds. KiB per connection = the settled
RSS growth of all workers / N.

At the end every connection is checked: still open (a non-blocking MSG_PEEK
finds no EOF and no reset), and a round trip on a sample (--verify, default
1000; all of them with --verify all): a WebSocket echoes a masked text frame,
a keep-alive connection answers a second GET, and after a /release to every
worker each held poll gets its response (all of them, not a sample).

Limits: the open-files limit of this process (and so of ipserve and its
workers, which inherit it and raise soft to hard) is raised to N + 10000 if
lower; nf_conntrack_max (global: the NAT routing tracks every connection) is
raised to N + 65536 if lower and restored at the end; client namespaces get
a wider ip_local_port_range if N per source address needs it. Everything it
changes is printed. See bench/README.md.

Writes bench/results/idle-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import collections
import errno
import hashlib
import os
import random
import select
import signal
import socket
import sys
import time

import common
from common import netns

APP = os.path.join(common.REPO, "bench", "apps", "ws_idle.py") + ":application"
KINDS = ("ws", "keepalive", "poll")
KIND_LABEL = {"ws": "idle WebSocket", "keepalive": "idle keep-alive HTTP connection",
              "poll": "held long-poll"}

WS_KEY = base64.b64encode(b"ipserve-bench-16").decode()
WS_ACCEPT = base64.b64encode(hashlib.sha1(
    (WS_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()

CONNECTING, HANDSHAKE, IDLE, FAILED = range(4)
EP_IN = select.EPOLLIN | select.EPOLLRDHUP


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--connections", type=int, default=None,
                   help="idle connections to open per kind (default 5000; 100000 with --scale)")
    p.add_argument("-w", "--workers", type=int, default=None,
                   help="ipserve workers (default 1; 8 with --scale)")
    p.add_argument("--kind", action="append", choices=KINDS, default=None,
                   help="what to hold idle; repeat for several (default: all three; ws with --scale)")
    p.add_argument("--repeat", type=int, default=None,
                   help="fresh server and measurement per kind this many times (default 3; 1 with --scale)")
    p.add_argument("--scale", action="store_true",
                   help="100,000 idle WebSockets on -w 8 (defaults change as above)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="connections connecting or handshaking at once (default 256; 512 with --scale)")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds to wait after gc.collect() before reading RSS (default 2)")
    p.add_argument("--verify", default="1000",
                   help="round trips on this many connections at the end, or 'all' (default 1000)")
    p.add_argument("--router", default="auto",
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"))
    p.add_argument("--open-timeout", type=float, default=30,
                   help="seconds one connection may take to connect and handshake (default 30)")
    p.add_argument("--ipserve-arg", action="append", default=[],
                   help="extra argument for ipserve (repeatable)")
    args = p.parse_args(argv)
    if args.scale:
        defaults = {"connections": 100_000, "workers": 8, "kind": ["ws"], "repeat": 1,
                    "concurrency": 512}
    else:
        defaults = {"connections": 5000, "workers": 1, "kind": list(KINDS), "repeat": 3,
                    "concurrency": 256}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers < 1 or args.workers > 16 or args.workers & (args.workers - 1):
        p.error("--workers must be a power of two, 1..16 (the client addresses cover 16 slots)")
    if args.verify != "all" and not args.verify.isdigit():
        p.error("--verify takes a count or 'all'")
    return args


# --------------------------------------------------------------------------- #
# The client: one epoll loop over raw non-blocking sockets
# --------------------------------------------------------------------------- #

class Conn:
    __slots__ = ("sock", "fd", "state", "buf", "ns", "src", "dst", "t0", "slot")

    def __init__(self, sock, ns, src, dst, slot):
        self.sock, self.fd = sock, sock.fileno()
        self.ns, self.src, self.dst, self.slot = ns, src, dst, slot
        self.state, self.buf, self.t0 = CONNECTING, b"", time.monotonic()


def parse_head(buf: bytes):
    """(status code, lower-case headers, offset of the body), or None if the
    head is not complete yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    try:
        code = int(parts[1])
    except (IndexError, ValueError):
        code = 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return code, headers, end + 4


def http_response_done(buf: bytes):
    """None while incomplete; else (status code, body)."""
    head = parse_head(buf)
    if head is None:
        return None
    code, headers, start = head
    length = int(headers.get("content-length", "0") or 0)
    if len(buf) < start + length:
        return None
    return code, buf[start:start + length]


def ws_frame(text: bytes) -> bytes:
    """A masked, final text frame (clients must mask)."""
    assert len(text) <= 125
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(text)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(text))


class Client:
    def __init__(self, tb: netns.Testbed, port: int, kind: str, workers: int,
                 concurrency: int, open_timeout: float, targets: list | None = None):
        self.tb, self.port, self.kind = tb, port, kind
        self.workers, self.concurrency, self.open_timeout = workers, concurrency, open_timeout
        self.ep = select.epoll()
        self.pending: dict[int, Conn] = {}
        self.idle: list[Conn] = []
        self.errors: collections.Counter = collections.Counter()
        self.opened_at: float | None = None
        self.started_at: float | None = None
        self.path = {"ws": "/ws", "keepalive": "/", "poll": "/poll"}[kind]
        # Connection i leaves from client namespace i % 4, address (i // 4) % 16:
        # every namespace and address alike, so every slot gets N / workers.
        self.targets = targets or common.all_targets(tb)

    def request(self, dst: str) -> bytes:
        head = f"GET {self.path} HTTP/1.1\r\nHost: {dst}:{self.port}\r\n"
        if self.kind == "ws":
            head += ("Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n")
        return (head + "\r\n").encode()

    # -- opening --
    def _start(self, items: list[tuple]) -> None:
        by_ns = collections.defaultdict(list)
        for c, ip in items:
            by_ns[c.ns].append((c, ip))
        for ns, group in by_ns.items():
            socks = []
            with netns.in_netns(ns):              # sockets belong to ns for life
                for _ in group:
                    try:
                        socks.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    except OSError as exc:
                        self.errors[f"socket: {errno.errorcode.get(exc.errno, exc)}"] += 1
            for sock, (c, ip) in zip(socks, group):
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_IP, netns.IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((ip, 0))
                    err = sock.connect_ex((c.server_ip, self.port))
                    if err not in (0, errno.EINPROGRESS):
                        raise OSError(err, os.strerror(err))
                except OSError as exc:
                    self.errors[f"connect: {errno.errorcode.get(exc.errno, exc)}"] += 1
                    sock.close()
                    continue
                conn = Conn(sock, ns, ip, c.server_ip, int(ip.rsplit(".", 1)[1]) & (self.workers - 1))
                self.pending[conn.fd] = conn
                self.ep.register(conn.fd, select.EPOLLOUT | select.EPOLLIN | select.EPOLLRDHUP)

    def _fail(self, conn: Conn, why: str) -> None:
        self.errors[why] += 1
        conn.state = FAILED
        self.pending.pop(conn.fd, None)
        try:
            self.ep.unregister(conn.fd)
        except OSError:
            pass
        conn.sock.close()

    def _idle(self, conn: Conn) -> None:
        conn.state, conn.buf = IDLE, b""
        self.pending.pop(conn.fd, None)
        self.ep.unregister(conn.fd)              # silence from here on
        self.idle.append(conn)

    def _event(self, conn: Conn, ev: int) -> None:
        if conn.state == CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(conn, f"connect: {errno.errorcode.get(err, err)}")
                return
            if not ev & select.EPOLLOUT:
                return
            try:
                conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.sock.send(self.request(conn.dst))   # < 300 bytes: one send
            except OSError as exc:
                self._fail(conn, f"send: {errno.errorcode.get(exc.errno, exc)}")
                return
            if self.kind == "poll":
                self._idle(conn)                 # the app holds it: nothing comes back
            else:
                conn.state = HANDSHAKE
                self.ep.modify(conn.fd, EP_IN)
            return
        # HANDSHAKE: read the response
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(conn, f"recv: {errno.errorcode.get(exc.errno, exc)}")
            return
        if not data:
            self._fail(conn, "closed by the server during the handshake")
            return
        conn.buf += data
        if self.kind == "ws":
            head = parse_head(conn.buf)
            if head is None:
                return
            code, headers, _ = head
            if code != 101 or headers.get("sec-websocket-accept") != WS_ACCEPT:
                self._fail(conn, f"handshake answered {code} (accept ok: "
                                 f"{headers.get('sec-websocket-accept') == WS_ACCEPT})")
                return
        else:
            done = http_response_done(conn.buf)
            if done is None:
                return
            if done[0] != 200:
                self._fail(conn, f"GET / answered {done[0]}")
                return
        self._idle(conn)

    def open(self, count: int, progress: bool = False) -> float:
        """Open `count` connections; returns the seconds it took."""
        t0 = self.started_at = time.monotonic()
        started = 0
        last_sweep = last_print = t0
        while started < count or self.pending:
            room = min(self.concurrency - len(self.pending), count - started)
            if room > 0:
                self._start([self.targets[(started + i) % len(self.targets)] for i in range(room)])
                started += room
            for fd, ev in self.ep.poll(0.05):
                conn = self.pending.get(fd)
                if conn is not None:
                    self._event(conn, ev)
            now = time.monotonic()
            if now - last_sweep > 1:
                last_sweep = now
                for conn in [c for c in self.pending.values() if now - c.t0 > self.open_timeout]:
                    self._fail(conn, f"no handshake in {self.open_timeout:g}s")
            if progress and now - last_print > 5:
                last_print = now
                print(f"bench:   {len(self.idle)} open, {len(self.pending)} in progress, "
                      f"{sum(self.errors.values())} failed, {now - t0:.0f}s", flush=True)
        self.opened_at = time.monotonic()
        return self.opened_at - t0

    # -- checking --
    def still_open(self) -> dict:
        """Peek at every idle connection without blocking: open, closed or reset."""
        out = collections.Counter()
        for conn in self.idle:
            try:
                data = conn.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                out["open"] += 1
                continue
            except OSError as exc:
                out[f"error {errno.errorcode.get(exc.errno, exc)}"] += 1
                continue
            out["closed by the server" if not data else "unexpected data"] += 1
        return dict(out)

    def round_trips(self, conns: list[Conn], send: bool, deadline: float = 30) -> dict:
        """Send each conn its probe (if `send`) and read the answer. For ws an
        echo of a masked text frame, for keepalive a second GET /, for poll the
        held response (after /release)."""
        expect = {}
        for i, conn in enumerate(conns):
            conn.buf = b""
            payload = f"echo {i} {conn.src}".encode()
            expect[conn.fd] = payload
            self.ep.register(conn.fd, EP_IN)
            if not send:
                continue
            try:
                if self.kind == "ws":
                    conn.sock.send(ws_frame(payload))
                else:
                    conn.sock.send(self.request(conn.dst).replace(b"GET /poll", b"GET /"))
            except OSError as exc:
                self.errors[f"verify send: {errno.errorcode.get(exc.errno, exc)}"] += 1
        left = {c.fd: c for c in conns}
        result = collections.Counter()
        end = time.monotonic() + deadline
        while left and time.monotonic() < end:
            for fd, _ in self.ep.poll(0.2):
                conn = left.get(fd)
                if conn is None:
                    continue
                try:
                    data = conn.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data, why = None, f"error {errno.errorcode.get(exc.errno, exc)}"
                if not data:
                    result[why if data is None else "closed"] += 1
                    del left[fd]
                    continue
                conn.buf += data
                verdict = self._answer(conn, expect[fd])
                if verdict is not None:
                    result[verdict] += 1
                    del left[fd]
        result["no answer"] += len(left)
        for conn in conns:
            try:
                self.ep.unregister(conn.fd)
            except OSError:
                pass
        return {k: v for k, v in result.items() if v}

    def _answer(self, conn: Conn, payload: bytes):
        buf = conn.buf
        if self.kind == "ws":
            if len(buf) < 2:
                return None
            n = buf[1] & 0x7F
            if len(buf) < 2 + n:
                return None
            return "ok" if buf[0] == 0x81 and buf[2:2 + n] == payload else f"bad frame {buf[:16]!r}"
        done = http_response_done(buf)
        if done is None:
            return None
        code, body = done
        if self.kind == "poll":
            return "ok" if code == 200 and body.startswith(b"released") else f"HTTP {code}"
        return "ok" if code == 200 else f"HTTP {code}"

    def close_all(self) -> None:
        for conn in self.idle:
            conn.sock.close()
        for conn in list(self.pending.values()):
            conn.sock.close()
        self.idle, self.pending = [], {}
        self.ep.close()


# --------------------------------------------------------------------------- #
# Client processes: one process may hold only as many sockets as its
# open-files limit allows, and raising the hard limit needs CAP_SYS_RESOURCE
# (a container may not have it). So the client is P forked processes, each
# an epoll loop over its share of the source addresses, driven by the parent
# over a socketpair (one JSON line per command and reply).
# --------------------------------------------------------------------------- #

def shard_handlers(client: Client) -> dict:
    """What one client process answers (common.ChildPool runs it)."""
    def open_(cmd):
        took = client.open(cmd["count"])
        return {"opened": len(client.idle), "errors": dict(client.errors),
                "seconds": took, "started_at": client.started_at}

    def round_trips(cmd):
        conns = client.idle if cmd["k"] is None else random.Random(cmd["seed"]).sample(
            client.idle, min(cmd["k"], len(client.idle)))
        return {"trips": client.round_trips(conns, send=cmd["send"], deadline=cmd["deadline"]),
                "sample": len(conns), "errors": dict(client.errors)}

    return {"open": open_, "still_open": lambda cmd: client.still_open(),
            "round_trips": round_trips, "exit": lambda cmd: client.close_all()}


def shards_of(tb, port, kind, workers, concurrency, open_timeout, processes: int) -> common.ChildPool:
    """P client processes; connection i of the whole goes to process i % P
    (the targets are split the same way, so every slot stays even)."""
    targets = common.all_targets(tb)
    assert len(targets) % processes == 0
    return common.ChildPool(targets, processes, lambda mine: shard_handlers(
        Client(tb, port, kind, workers, max(1, concurrency // processes), open_timeout,
               targets=mine)))


def client_processes(n: int) -> int:
    """How many client processes hold n sockets under this process's soft
    open-files limit (a power of two, at most 16)."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    per = max(1000, soft - 2000)
    p = 1
    while p * per < n and p < 16:
        p *= 2
    return p


# --------------------------------------------------------------------------- #
# The server side
# --------------------------------------------------------------------------- #

def slot_address(tb: netns.Testbed, slot: int) -> tuple[netns.ClientNs, str]:
    """A client address whose low bits pick `slot`: 198.18.0.(16 + slot)."""
    c = tb.clients[0]
    return c, c.ips[slot]


def worker_stats(tb, port: int, workers: int, gc_first: bool) -> list[dict]:
    """/stats from every slot (one short connection each)."""
    out = []
    for slot in range(workers):
        c, ip = slot_address(tb, slot)
        d = netns.http_json(c.ns, ip, c.server_ip, port, "/stats?gc=1" if gc_first else "/stats",
                            timeout=30)
        d["slot"] = slot
        out.append(d)
    return out


def settle(tb, port, workers, seconds) -> list[dict]:
    worker_stats(tb, port, workers, gc_first=True)
    time.sleep(seconds)
    return worker_stats(tb, port, workers, gc_first=False)


def rss_of(pids) -> dict[int, int]:
    return {pid: common.rss_kib(pid) or 0 for pid in pids}


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def sockstat(ns: str) -> str:
    r = netns.call_in(ns, ["cat", "/proc/net/sockstat"], check=False)
    return next((line for line in r.stdout.splitlines() if line.startswith("TCP:")), "")


def listen_drops(ns: str) -> dict:
    r = netns.call_in(ns, ["cat", "/proc/net/netstat"], check=False)
    lines = [line.split() for line in r.stdout.splitlines() if line.startswith("TcpExt:")]
    if len(lines) < 2:
        return {}
    d = dict(zip(lines[0][1:], lines[1][1:]))
    return {k: int(d.get(k, 0)) for k in ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop")}


def wait_server_count(proc, want: int, timeout: float = 20) -> int:
    """Until the workers' heartbeats report `want` connections (or timeout); the last sum."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        try:
            st = proc.status(timeout=10)
            total = sum(w.get("connections") or 0 for w in netns.active_workers(st))
        except netns.IpserveError:
            pass
        if total >= want or time.monotonic() > deadline:
            return total
        time.sleep(0.5)


# --------------------------------------------------------------------------- #
# System limits
# --------------------------------------------------------------------------- #

CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"


class Limits:
    """What this run changed outside its namespaces, to put back."""

    def __init__(self):
        self.conntrack_was: int | None = None
        self.conntrack_checked = False
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"bench: {text}", flush=True)

    def note_once(self, text: str) -> None:
        if text not in self.notes:
            self.note(text)

    def conntrack_at_least(self, need: int) -> None:
        if self.conntrack_checked:
            return
        self.conntrack_checked = True
        try:
            with open(CONNTRACK_MAX) as f:
                cur = int(f.read())
        except OSError:
            self.note("nf_conntrack not loaded (no NAT routing: nothing tracked)")
            return
        if cur >= need:
            self.note(f"net.netfilter.nf_conntrack_max = {cur} (enough for {need}; unchanged)")
            return
        with open(CONNTRACK_MAX, "w") as f:
            f.write(str(need))
        self.conntrack_was = cur
        self.note(f"net.netfilter.nf_conntrack_max raised {cur} -> {need} "
                          "(global, root namespace); restored at the end")

    def restore(self) -> None:
        if self.conntrack_was is not None:
            with open(CONNTRACK_MAX, "w") as f:
                f.write(str(self.conntrack_was))
            print(f"bench: net.netfilter.nf_conntrack_max restored to {self.conntrack_was}", flush=True)
            self.conntrack_was = None


# --------------------------------------------------------------------------- #
# One measurement
# --------------------------------------------------------------------------- #

def measure(tb, args, kind: str, port: int, limits: Limits, rep: int) -> dict:
    n, w = args.connections, args.workers
    label = KIND_LABEL[kind]
    extra = []
    per_worker = -(-n // w) + 1000
    if per_worker > 9000 and common.ipserve_has_option("--worker-connections"):
        # The default (10000) would leave the rest waiting in the kernel's queue.
        extra = ["--worker-connections", str(per_worker)]
        limits.note_once(f"ipserve --worker-connections {per_worker} (N / workers + 1000)")
    code = common.code_fingerprint()
    proc = netns.start_ipserve(tb, [APP, "-w", str(w), "-b", f"0.0.0.0:{port}",
                                    "--router", args.router, "--keepalive", "3600",
                                    "--log-level", "warning", *extra, *args.ipserve_arg])
    shards = None
    try:
        st = proc.wait_ready(w, timeout=90)
        router = st.get("router")
        common.wait_http(tb, port)
        pids = sorted(wk["pid"] for wk in netns.active_workers(st))
        if router != "reuseport":             # NAT: every connection is tracked
            limits.conntrack_at_least(n + 65536)
        # Warm-up: a few of this kind, opened and closed, so lazy imports and
        # first-use allocations are in the baseline.
        warm = Client(tb, port, kind, w, args.concurrency, args.open_timeout)
        warm.open(16 * w)
        if kind == "poll":
            release_all(tb, port, w)
        warm.close_all()
        time.sleep(0.5)
        stats0 = settle(tb, port, w, args.settle)
        seen = sorted(s["pid"] for s in stats0)
        if seen != pids:
            print(f"bench: WARNING: /stats from the {w} slot addresses reached pids {seen}, "
                  f"status lists {pids}", flush=True)
        before = rss_of(pids)
        slab0 = meminfo_kib("Slab")
        drops0 = listen_drops(tb.server_ns)
        nproc = client_processes(n)
        shards = shards_of(tb, port, kind, w, args.concurrency, args.open_timeout, nproc)
        print(f"bench: [{rep + 1}/{args.repeat}] opening {n} x {label} to ipserve -w {w} "
              f"({router}), {args.concurrency} at a time, from {nproc} client process(es)",
              flush=True)
        t0 = time.monotonic()

        def tick():
            held = wait_server_count(proc, 0, timeout=0)
            print(f"bench:   {time.monotonic() - t0:.0f}s: the workers report {held} connections",
                  flush=True)

        counts = [n // nproc + (1 if k < n % nproc else 0) for k in range(nproc)]
        replies = shards.ask([{"op": "open", "count": c} for c in counts], tick=tick)
        took = time.monotonic() - t0
        opened = sum(r["opened"] for r in replies)
        failed = collections.Counter()
        for r in replies:
            failed.update(r["errors"])
        if kind == "poll":
            # Sent is not held: the time to open runs until the app holds them all.
            deadline = time.monotonic() + 60
            while (sum(s["polls"] for s in worker_stats(tb, port, w, gc_first=False)) < opened
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            took = time.monotonic() - t0
        server_count = wait_server_count(proc, opened)
        app_counts = worker_stats(tb, port, w, gc_first=False)
        after = rss_of(pids)
        stats1 = settle(tb, port, w, args.settle)
        settled = rss_of(pids)
        slab1 = meminfo_kib("Slab")
        drops1 = listen_drops(tb.server_ns)
        st1 = proc.status()
        per_worker_conns = {wk["pid"]: wk.get("connections") for wk in netns.active_workers(st1)}
        # Checks at the end: every connection still open, then round trips.
        still = collections.Counter()
        for r in shards.ask({"op": "still_open"}):
            still.update(r)
        if kind == "poll":
            release_all(tb, port, w)
            trip_replies = shards.ask({"op": "round_trips", "k": None, "send": False,
                                       "seed": rep, "deadline": 60})
        else:
            k = None if args.verify == "all" else -(-int(args.verify) // nproc)
            trip_replies = shards.ask({"op": "round_trips", "k": k, "send": True,
                                       "seed": rep, "deadline": 60})
        trips = collections.Counter()
        for r in trip_replies:
            trips.update(r["trips"])
        sample = sum(r["sample"] for r in trip_replies)
        growth = sum(settled.values()) - sum(before.values())
        growth_now = sum(after.values()) - sum(before.values())
        rec = {
            "kind": kind, "repeat": rep + 1, "workers": w, "router": router, "port": port,
            "code_fingerprint": code, "ipserve_extra_args": extra, "client_processes": nproc,
            "wanted": n, "opened": opened, "failed": dict(failed),
            "open_seconds": round(took, 2), "open_per_s": round(opened / took, 1) if took else None,
            "worker_pids": pids,
            "rss_kib_before": before, "rss_kib_after": after, "rss_kib_settled": settled,
            "rss_total_kib_before": sum(before.values()),
            "rss_total_kib_settled": sum(settled.values()),
            "kib_per_conn": round(growth / opened, 2) if opened else None,
            "kib_per_conn_unsettled": round(growth_now / opened, 2) if opened else None,
            "server_connections_reported": server_count,
            "per_worker_connections": per_worker_conns,
            "app_counts": [{k: s[k] for k in ("pid", "slot", "ws", "polls")} for s in app_counts],
            "app_rss_settled": [{k: s[k] for k in ("pid", "rss_kib")} for s in stats1],
            "kernel_slab_growth_kib": slab1 - slab0,
            "server_ns_sockstat": sockstat(tb.server_ns),
            "conntrack": common.conntrack(tb.server_ns),
            "listen_drops": {k: drops1.get(k, 0) - drops0.get(k, 0) for k in drops1},
            "still_open": dict(still), "round_trips": dict(trips), "round_trip_sample": sample,
        }
        report_one(rec)
        return rec
    finally:
        if shards is not None:
            shards.close()
        try:
            proc.stop(signal.SIGINT, timeout=60)      # quick stop: nothing to drain
        except Exception as exc:                # noqa: BLE001
            print(f"bench: stopping ipserve: {exc}", file=sys.stderr)
        proc.cleanup()


def release_all(tb, port: int, workers: int) -> None:
    """/release on every worker: each held /poll answers."""
    for slot in range(workers):
        c, ip = slot_address(tb, slot)
        netns.http_get(c.ns, ip, c.server_ip, port, "/release")


def report_one(r: dict) -> None:
    mib = 1 / 1024
    label = KIND_LABEL[r["kind"]]
    fails = ", ".join(f"{k}: {v}" for k, v in r["failed"].items()) or "none"
    print(f"bench:   {r['opened']} of {r['wanted']} open in {r['open_seconds']:.1f}s "
          f"({r['open_per_s']:.0f}/s); failed: {fails}", flush=True)
    print(f"bench:   workers' RSS {r['rss_total_kib_before'] * mib:.1f} MiB before, "
          f"{sum(r['rss_kib_after'].values()) * mib:.1f} MiB just after, "
          f"{r['rss_total_kib_settled'] * mib:.1f} MiB settled -> "
          f"{r['kib_per_conn']:.2f} KiB per {label} "
          f"({r['kib_per_conn_unsettled']:.2f} before the settle)", flush=True)
    if r["workers"] > 1:
        per = ", ".join(f"{pid}: {r['rss_kib_settled'][pid] * mib:.0f} MiB / "
                        f"{r['per_worker_connections'].get(pid)} conns"
                        for pid in r["worker_pids"])
        print(f"bench:   per worker: {per}", flush=True)
    print(f"bench:   server's own count (heartbeats): {r['server_connections_reported']} connections; "
          f"app: {sum(a['ws'] for a in r['app_counts'])} WebSockets, "
          f"{sum(a['polls'] for a in r['app_counts'])} polls; server ns {r['server_ns_sockstat']}; "
          f"conntrack {r['conntrack'].get('count', '-')} entries; "
          f"listen drops {r['listen_drops']}; kernel slab (whole machine) "
          f"{r['kernel_slab_growth_kib'] * mib:+.1f} MiB", flush=True)
    still = r["still_open"]
    ok = still.get("open", 0) == r["opened"]
    print(f"bench:   at the end: {still.get('open', 0)} of {r['opened']} still open"
          + ("" if ok else f" ({still})")
          + f"; round trips on {r['round_trip_sample']}: {r['round_trips']}", flush=True)


def mmm(values, fmt="{:.2f}") -> str:
    return common.fmt_mmm(common.mmm(values), fmt)


def summary_table(records: list[dict], args) -> str:
    rows = [["kind", "connections", "KiB/conn settled", "KiB/conn unsettled", "open/s",
             "workers' RSS MiB (settled)", "still open", "round trips ok"]]
    codes = list(dict.fromkeys(r["code_fingerprint"] for r in records))
    for code in codes:
        for kind in args.kind:
            rs = [r for r in records if r["kind"] == kind and r["code_fingerprint"] == code]
            if not rs:
                continue
            rows.append([
                KIND_LABEL[kind] + (f" [code {code}]" if len(codes) > 1 else ""),
                mmm([r["opened"] for r in rs], "{:.0f}"),
                mmm([r["kib_per_conn"] for r in rs]),
                mmm([r["kib_per_conn_unsettled"] for r in rs]),
                mmm([r["open_per_s"] for r in rs], "{:.0f}"),
                mmm([r["rss_total_kib_settled"] / 1024 for r in rs], "{:.1f}"),
                "/".join(str(r["still_open"].get("open", 0)) for r in rs),
                "/".join(f"{r['round_trips'].get('ok', 0)} of {r['round_trip_sample']}" for r in rs)])
    head = (f"idle connections, ipserve -w {args.workers} ({records[0]['router'] if records else '?'}), "
            f"{args.connections} per measurement, {args.repeat} fresh server(s) per kind; "
            "min–median–max")
    out = head + "\n" + common.table(rows)
    if len(codes) > 1:
        out += ("\nWARNING: the code under ipserve/ changed during the run; the rows are split "
                "by its fingerprint (each server runs the code it started with)")
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))   # finally: blocks run
    common.preflight(need_gunicorn=False)
    started = time.time()
    machine_at_start = common.machine()
    print(f"bench: {common.describe_code(machine_at_start)}", flush=True)
    need_fds = args.connections + 10000
    soft, hard, why = common.raise_nofile(need_fds)
    limits = Limits()
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = f.read().strip()
    limits.note(f"open files: soft {soft}, hard {hard} for this process, ipserve and its workers "
                f"(they inherit it; fs.nr_open {nr_open})"
                + (f"; {why}" if why else ""))
    per_worker = -(-args.connections // args.workers) + 200
    if per_worker > hard:
        common.die(f"each worker would hold {per_worker} sockets, over the open-files hard limit "
                   f"{hard}: use more workers (-w), or raise the hard limit (ulimit -Hn as root "
                   "with CAP_SYS_RESOURCE, LimitNOFILE= under systemd)")
    nproc = client_processes(args.connections)
    limits.note(f"client: {nproc} process(es), {-(-args.connections // nproc)} sockets each "
                f"(under the soft limit {soft})")
    tb = common.make_testbed(4)
    records = []
    try:
        per_source = -(-args.connections // (len(tb.clients) * len(tb.clients[0].ips)))
        rng = netns.call_in(tb.clients[0].ns, ["sysctl", "-n", "net.ipv4.ip_local_port_range"]).stdout.split()
        if per_source > int(rng[1]) - int(rng[0]) - 1000:
            got = common.tune_clients_for_new_connections(tb)
            limits.note(f"client namespaces: {got}")
        else:
            limits.note(f"client ports: {per_source} per source address "
                                f"(64 addresses), ip_local_port_range {rng[0]}-{rng[1]}: enough")
        somax = netns.call_in(tb.server_ns, ["sysctl", "-n", "net.core.somaxconn"]).stdout.strip()
        limits.note(f"server namespace net.core.somaxconn {somax}, ipserve backlog 2048 "
                            f"(default); at most {args.concurrency} handshakes in flight")
        port = 8200
        for rep in range(args.repeat):
            for kind in args.kind:
                port += 1
                records.append(measure(tb, args, kind, port, limits, rep))
    finally:
        try:
            tb.close()
        finally:
            limits.restore()
    print()
    print(summary_table(records, args))
    path = common.write_json("idle", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": machine_at_start, "args": vars(args), "app": APP,
        "limits": limits.notes, "measurements": records})
    print(f"\nbench: results in {path}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "namespaces, servers and client processes")
