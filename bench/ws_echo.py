#!/usr/bin/env python3
"""WebSocket echo throughput: ipserve's own frame code (ipserve/http/websocket.py)
against gevent-websocket's (gunicorn -k geventwebsocket.gunicorn.workers.
GeventWebSocketWorker), same app, same worker count, one run.

    sudo .venv/bin/python bench/ws_echo.py [--rounds 5] [--duration 5] [-c 200]
        [--size 32:text --size 16k:binary] [--workers 2] [--client-procs 2]
        [--router auto] [--warmup 1] [--ipserve-arg=...]

Both servers run bench/apps/ws_echo.py (a plain loop: ws.receive(), then
ws.send() of the same message) with -w 2, on different ports of one server
namespace, for the whole run. For every measurement the client opens C
WebSockets (connection i from client namespace i % 4, source address
(i // 4) % 16: every namespace, address and ipserve slot alike), then every
connection does round trips as fast as it can for --duration seconds: one
masked message in flight per connection, the next sent as soon as the echo is
complete. Then the connections are closed (close frame, then EOF).

The client is P forked processes (--client-procs, default 2), each a single
epoll loop over raw sockets, with the client frames precomputed (16 payload
variants per size, each with its own mask; a connection rotates through
them). Every echo is compared byte for byte with the frame the server must
send back (unmasked, same opcode, one frame): a server that echoed a stale
buffer, the wrong opcode or a fragmented message would count as bad.

Rounds interleave the servers (the order rotates every round); within a round
every size is measured on both. Reported per size and server, min-median-max
over the rounds: messages/s (round trips completed within the window / its
length), server CPU ms per 1000 messages (utime + stime from /proc of the
master and every worker, over the window and the drain of the last messages,
divided by every echo received), the client's CPU (same unit; it shares the 2
cores with the servers), and the per-round ratios ipserve / gunicorn.

Writes bench/results/ws_echo-<time>.json.
"""

from __future__ import annotations

import argparse
import base64
import collections
import errno
import hashlib
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import time

import common
from common import netns

APPS_DIR = os.path.join(common.REPO, "bench", "apps")
APP = os.path.join(APPS_DIR, "ws_echo.py") + ":application"   # ipserve: path form
GUNICORN_APP = "ws_echo:application"                          # gunicorn: --pythonpath bench/apps
WS_WORKER = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"

WS_KEY = base64.b64encode(b"ipserve-echo-key").decode()
WS_ACCEPT = base64.b64encode(hashlib.sha1(
    (WS_KEY + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
VARIANTS = 16                                     # payloads per size (a power of two)


def parse_size(text: str) -> tuple[int, bool]:
    """'32:text', '16k:binary' -> (bytes, binary?)."""
    n, _, kind = text.partition(":")
    kind = kind or "text"
    if kind not in ("text", "binary"):
        raise argparse.ArgumentTypeError(f"{text!r}: the kind is text or binary")
    mult = 1024 if n[-1:].lower() == "k" else 1
    try:
        size = int(n[:-1] if mult > 1 else n) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SIZE[k]:text|binary") from None
    if not 1 <= size <= 1 << 20:
        raise argparse.ArgumentTypeError(f"{text!r}: 1 byte to 1 MiB")
    return size, kind == "binary"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--duration", type=float, default=5, help="seconds per measurement (default 5)")
    p.add_argument("-c", "--connections", type=int, default=200,
                   help="WebSockets per measurement, over the 4 client namespaces x 16 "
                        "source addresses (default 200)")
    p.add_argument("--size", action="append", type=parse_size, default=None,
                   help="message size and kind, SIZE[k]:text|binary; repeat for several "
                        "(default: 32:text and 16k:binary)")
    p.add_argument("--workers", "-w", type=int, default=2, help="workers of each server (default 2)")
    p.add_argument("--client-procs", type=int, default=2, choices=(1, 2, 4, 8, 16),
                   help="client processes, one epoll loop each (default 2)")
    p.add_argument("--router", default="auto",
                   choices=("auto", "nft", "iptables", "iptc", "reuseport"),
                   help="ipserve's router (default auto)")
    p.add_argument("--warmup", type=float, default=1,
                   help="seconds of unmeasured echo per server and size before the rounds (default 1)")
    p.add_argument("--ipserve-arg", action="append", default=[],
                   help="extra argument for ipserve (repeatable)")
    p.add_argument("--gunicorn-arg", action="append", default=[],
                   help="extra argument for gunicorn (repeatable)")
    args = p.parse_args(argv)
    args.size = args.size or [(32, False), (16384, True)]
    if args.connections < args.client_procs:
        p.error("--connections must be at least --client-procs")
    return args


def size_label(size: int, binary: bool) -> str:
    n = f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"
    return f"{n} {'binary' if binary else 'text'}"


# --------------------------------------------------------------------------- #
# Frames, precomputed before the client processes fork
# --------------------------------------------------------------------------- #

def _header(opcode: int, n: int, masked: bool) -> bytes:
    bit = 0x80 if masked else 0
    if n <= 125:
        return bytes([0x80 | opcode, bit | n])
    if n <= 0xFFFF:
        return bytes([0x80 | opcode, bit | 126]) + struct.pack(">H", n)
    return bytes([0x80 | opcode, bit | 127]) + struct.pack(">Q", n)


def _mask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def make_frames(size: int, binary: bool, seed: int) -> tuple[list[bytes], list[bytes]]:
    """(client frames: final, masked; the server frames that must come back:
    final, unmasked, same opcode and payload), VARIANTS of each."""
    opcode = 0x2 if binary else 0x1
    sends, expects = [], []
    for v in range(VARIANTS):
        rng = random.Random(seed * 1000 + v)
        if binary:
            payload = rng.randbytes(size)
        else:
            letters = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            payload = bytes(rng.choice(letters) for _ in range(size))
        mask = rng.randbytes(4)
        sends.append(_header(opcode, size, True) + mask + _mask(payload, mask))
        expects.append(_header(opcode, size, False) + payload)
    return sends, expects


CLOSE_FRAME = bytes([0x88, 0x82]) + b"\x11\x22\x33\x44" + _mask(struct.pack(">H", 1000), b"\x11\x22\x33\x44")


# --------------------------------------------------------------------------- #
# A client process: one epoll loop over raw sockets
# --------------------------------------------------------------------------- #

class Conn:
    __slots__ = ("sock", "fd", "idx", "state", "head", "buf", "view", "got", "k", "ns", "src")

    def __init__(self, sock, idx, ns, src):
        self.sock, self.fd, self.idx, self.ns, self.src = sock, sock.fileno(), idx, ns, src
        self.state, self.head, self.got, self.k = "connecting", b"", 0, 0
        self.buf = self.view = None


class EchoClient:
    def __init__(self, targets: list[tuple], frames: list):
        self.targets, self.frames = targets, frames
        self.ep = select.epoll()
        self.conns: dict[int, Conn] = {}
        self.errors: collections.Counter = collections.Counter()

    def _err(self, what: str, exc) -> str:
        code = exc.errno if isinstance(exc, OSError) else exc
        return f"{what}: {errno.errorcode.get(code, exc)}"

    def _drop(self, c: Conn, why: str | None) -> None:
        if why:
            self.errors[why] += 1
        self.conns.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()

    def open(self, port: int, count: int, timeout: float = 20) -> dict:
        self.errors.clear()
        by_ns = collections.defaultdict(list)
        for i in range(count):
            c, ip = self.targets[i % len(self.targets)]
            by_ns[c.ns].append((i, c, ip))
        pending: dict[int, Conn] = {}
        for ns, group in by_ns.items():
            with netns.in_netns(ns):                   # the socket belongs to ns for life
                socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in group]
            for sock, (i, c, ip) in zip(socks, group):
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_IP, netns.IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.bind((ip, 0))
                    err = sock.connect_ex((c.server_ip, port))
                    if err not in (0, errno.EINPROGRESS):
                        raise OSError(err, os.strerror(err))
                except OSError as exc:
                    self.errors[self._err("connect", exc)] += 1
                    sock.close()
                    continue
                conn = Conn(sock, i, ns, ip)
                conn.head = (f"GET /ws HTTP/1.1\r\nHost: {c.server_ip}:{port}\r\n"
                             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                             f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
                pending[conn.fd] = conn
                self.ep.register(conn.fd, select.EPOLLOUT | select.EPOLLIN)
        end = time.monotonic() + timeout
        while pending and time.monotonic() < end:
            for fd, ev in self.ep.poll(0.1):
                c = pending.get(fd)
                if c is None:
                    continue
                if c.state == "connecting":
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        pending.pop(fd)
                        self._drop(c, self._err("connect", err))
                        continue
                    if not ev & select.EPOLLOUT:
                        continue
                    try:
                        c.sock.send(c.head)           # < 200 bytes: one send
                    except OSError as exc:
                        pending.pop(fd)
                        self._drop(c, self._err("handshake send", exc))
                        continue
                    c.state, c.head = "handshake", b""
                    self.ep.modify(fd, select.EPOLLIN)
                    continue
                try:
                    data = c.sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    pending.pop(fd)
                    self._drop(c, self._err("handshake recv", exc))
                    continue
                if not data:
                    pending.pop(fd)
                    self._drop(c, "closed during the handshake")
                    continue
                c.head += data
                end_head = c.head.find(b"\r\n\r\n")
                if end_head < 0:
                    continue
                pending.pop(fd)
                lines = c.head[:end_head].decode("latin-1").split("\r\n")
                hdrs = {k.strip().lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in lines[1:])}
                if " 101 " not in lines[0] + " " or hdrs.get("sec-websocket-accept") != WS_ACCEPT:
                    self._drop(c, f"handshake answered {lines[0]!r}")
                    continue
                if len(c.head) > end_head + 4:
                    self._drop(c, "data after the 101")
                    continue
                c.sock.setblocking(True)   # sendall() of a big frame; reads use MSG_DONTWAIT
                c.state = "open"
                self.conns[fd] = c
        for c in list(pending.values()):
            self._drop(c, f"no handshake in {timeout:g}s")
        return {"opened": len(self.conns), "errors": dict(self.errors)}

    def run(self, start: float, duration: float, size_index: int) -> dict:
        sends, expects = self.frames[size_index]
        length = len(expects[0])
        mask = VARIANTS - 1
        self.errors.clear()
        conns = list(self.conns.values())
        for c in conns:
            c.buf = bytearray(length)
            c.view = memoryview(c.buf)
            c.got = 0
            c.k = c.idx & mask
        by_fd = self.conns
        poll = self.ep.poll
        dontwait = socket.MSG_DONTWAIT
        monotonic = time.monotonic
        delay = start - monotonic()
        if delay > 0:
            time.sleep(delay)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = monotonic()
        end = start + duration
        sent = echoed = bad = 0
        in_window = None
        bad_sample = None
        for c in conns:
            try:
                c.sock.sendall(sends[c.k])
                sent += 1
            except OSError as exc:
                self._drop(c, self._err("send", exc))
        outstanding = sent
        sending = True
        drain_end = None
        while outstanding:
            events = poll(0.2)
            now = monotonic()
            if sending and now >= end:
                sending = False
                in_window = echoed
                drain_end = now + 5
            elif drain_end is not None and now > drain_end:
                break
            for fd, _ in events:
                c = by_fd.get(fd)
                if c is None:
                    continue
                try:
                    n = c.sock.recv_into(c.view[c.got:] if c.got else c.view, 0, dontwait)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._drop(c, self._err("recv", exc))
                    outstanding -= 1
                    continue
                if not n:
                    self._drop(c, "closed by the server")
                    outstanding -= 1
                    continue
                c.got += n
                if c.got < length:
                    continue
                c.got = 0
                echoed += 1
                if c.buf != expects[c.k]:
                    bad += 1
                    if bad_sample is None:
                        bad_sample = {"got": bytes(c.buf[:24]).hex(),
                                      "want": expects[c.k][:24].hex(), "src": c.src}
                if sending:
                    c.k = (c.k + 1) & mask
                    try:
                        c.sock.sendall(sends[c.k])
                        sent += 1
                    except OSError as exc:
                        self._drop(c, self._err("send", exc))
                        outstanding -= 1
                else:
                    outstanding -= 1
        t1 = monotonic()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        if in_window is None:                 # nothing left in flight before the end
            in_window = echoed
        return {"in_window": in_window, "echoed": echoed, "sent": sent, "bad": bad,
                "lost": outstanding, "bad_sample": bad_sample, "errors": dict(self.errors),
                "connections": len(self.conns), "seconds": t1 - t0,
                "cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)}

    def close_all(self, timeout: float = 3) -> dict:
        """A close frame on every connection, then wait for the server's EOF."""
        left = dict(self.conns)
        for c in list(left.values()):
            try:
                c.sock.sendall(CLOSE_FRAME)
            except OSError:
                left.pop(c.fd)
        end = time.monotonic() + timeout
        while left and time.monotonic() < end:
            for fd, _ in self.ep.poll(0.1):
                c = left.get(fd)
                if c is None:
                    continue
                try:
                    data = c.sock.recv(65536, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    left.pop(fd)
        not_closed = len(left)
        for c in list(self.conns.values()):
            self._drop(c, None)
        return {"server_did_not_close": not_closed}


def echo_handlers(client: EchoClient) -> dict:
    """What one client process answers (common.ChildPool runs it)."""
    return {"open": lambda cmd: client.open(cmd["port"], cmd["count"]),
            "run": lambda cmd: client.run(cmd["start"], cmd["duration"], cmd["size"]),
            "close": lambda cmd: client.close_all()}


def echo_clients(tb: netns.Testbed, frames: list, processes: int) -> common.ChildPool:
    """P forked client processes; process k takes targets[k::P] (whole client
    namespaces and all 16 of their addresses: every ipserve slot alike)."""
    return common.ChildPool(common.all_targets(tb), processes,
                            lambda mine: echo_handlers(EchoClient(mine, frames)), exit_within=5.0)


# --------------------------------------------------------------------------- #
# Servers and measurements
# --------------------------------------------------------------------------- #

class Target:
    def __init__(self, label, kind, port, handle, pids, stop):
        self.label, self.kind, self.port = label, kind, port
        self.handle, self.pids, self.stop = handle, pids, stop
        self.rounds: dict[int, list[dict]] = collections.defaultdict(list)


def preflight() -> str:
    if os.geteuid() != 0:
        common.die("run as root (the benchmark creates network namespaces)")
    gunicorn = os.path.join(common.VENV_BIN, "gunicorn")
    if not os.access(gunicorn, os.X_OK):
        common.die(f"gunicorn not found next to {sys.executable} (.venv/bin/pip install gunicorn)")
    import importlib.util
    if importlib.util.find_spec("geventwebsocket") is None:
        common.die("gevent-websocket is not installed in this venv")
    netns.sweep_stale()
    return gunicorn


def measure(clients: common.ChildPool, t: Target, args, size_index: int, duration: float) -> dict:
    per = [args.connections // len(clients.kids)
           + (1 if k < args.connections % len(clients.kids) else 0) for k in range(len(clients.kids))]
    opened = clients.ask([{"op": "open", "port": t.port, "count": n} for n in per])
    open_errors = collections.Counter()
    for r in opened:
        open_errors.update(r["errors"])
    pids = t.pids()
    cpu0 = common.cpu_seconds(pids)
    sys0 = common.system_cpu()
    start = time.monotonic() + 0.05
    runs = clients.ask({"op": "run", "start": start, "duration": duration, "size": size_index})
    cpu = common.cpu_seconds(pids) - cpu0
    wall = time.monotonic() - start
    busy = common.system_busy(sys0, common.system_cpu())
    closed = clients.ask({"op": "close"})
    errors = collections.Counter(open_errors)
    for r in runs:
        errors.update(r["errors"])
    echoed = sum(r["echoed"] for r in runs)
    in_window = sum(r["in_window"] for r in runs)
    client_cpu = sum(r["cpu_s"] for r in runs)
    return {
        "connections": sum(r["opened"] for r in opened), "msgs_per_s": round(in_window / duration, 1),
        "in_window": in_window, "echoed": echoed, "sent": sum(r["sent"] for r in runs),
        "bad": sum(r["bad"] for r in runs), "lost": sum(r["lost"] for r in runs),
        "bad_sample": next((r["bad_sample"] for r in runs if r["bad_sample"]), None),
        "errors": dict(errors), "server_pids": pids,
        "server_cpu_s": round(cpu, 3), "server_cores": round(cpu / wall, 2) if wall > 0 else None,
        "cpu_ms_per_1k": round(1e6 * cpu / echoed, 2) if echoed else None,
        "client_cpu_s": round(client_cpu, 3), "client_cores": round(client_cpu / wall, 2),
        "client_cpu_ms_per_1k": round(1e6 * client_cpu / echoed, 2) if echoed else None,
        "per_client_process_msgs": [r["in_window"] for r in runs],
        "server_did_not_close": sum(r["server_did_not_close"] for r in closed),
        "machine_busy": busy["busy"], "machine_steal": busy["steal"], "seconds": round(wall, 2)}


def mmm(values, fmt="{:.0f}") -> str:
    return common.fmt_mmm(common.mmm(values), fmt)


def summarize(targets: list[Target], sizes, args) -> tuple[str, dict]:
    ips = next(t for t in targets if t.kind == "ipserve")
    gun = next(t for t in targets if t.kind == "gunicorn")
    rows = [["size", "server", "msgs/s", "server CPU ms/1k msgs", "server cores",
             "client CPU ms/1k msgs", "client cores", "echoes checked", "bad", "lost",
             "conn errors"]]
    summary: dict = {}
    notes = []
    for si, (size, binary) in enumerate(sizes):
        label = size_label(size, binary)
        summary[label] = {}
        for t in targets:
            rs = t.rounds[si]
            errs = collections.Counter()
            for r in rs:
                errs.update(r["errors"])
            rows.append([label, t.label, mmm([r["msgs_per_s"] for r in rs]),
                         mmm([r["cpu_ms_per_1k"] for r in rs], "{:.1f}"),
                         mmm([r["server_cores"] for r in rs], "{:.2f}"),
                         mmm([r["client_cpu_ms_per_1k"] for r in rs], "{:.1f}"),
                         mmm([r["client_cores"] for r in rs], "{:.2f}"),
                         str(sum(r["echoed"] for r in rs)), str(sum(r["bad"] for r in rs)),
                         str(sum(r["lost"] for r in rs)), str(sum(errs.values()))])
            summary[label][t.label] = {
                "msgs_per_s": [r["msgs_per_s"] for r in rs],
                "cpu_ms_per_1k": [r["cpu_ms_per_1k"] for r in rs],
                "client_cpu_ms_per_1k": [r["client_cpu_ms_per_1k"] for r in rs],
                "echoed": sum(r["echoed"] for r in rs), "bad": sum(r["bad"] for r in rs),
                "lost": sum(r["lost"] for r in rs), "errors": dict(errs)}
            for r in rs:
                if r["bad_sample"]:
                    notes.append(f"{label} {t.label}: first bad echo {r['bad_sample']}")
                    break
        pairs = list(zip(ips.rounds[si], gun.rounds[si]))
        rate = [a["msgs_per_s"] / b["msgs_per_s"] for a, b in pairs if b["msgs_per_s"]]
        cost = [a["cpu_ms_per_1k"] / b["cpu_ms_per_1k"] for a, b in pairs
                if a["cpu_ms_per_1k"] and b["cpu_ms_per_1k"]]
        summary[label]["ratio_msgs_per_s"] = [round(x, 3) for x in rate]
        summary[label]["ratio_cpu_per_msg"] = [round(x, 3) for x in cost]
        notes.append(f"{label}: ipserve / gunicorn per round: msgs/s {mmm(rate, '{:.2f}')}, "
                     f"server CPU per message {mmm(cost, '{:.2f}')}")
    head = (f"WebSocket echo, -w {args.workers} each, {args.connections} connections "
            f"(4 client namespaces x 16 addresses), {args.rounds} rounds x {args.duration:g} s, "
            f"{args.client_procs} client process(es); min–median–max over the rounds")
    return head + "\n" + common.table(rows) + "\n" + "\n".join(notes), summary


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))   # finally: blocks run
    gunicorn = preflight()
    started = time.time()
    machine_at_start = common.machine()
    code_at_start = machine_at_start["code_fingerprint"]
    print(f"bench: {common.describe_code(machine_at_start)}", flush=True)
    frames = [make_frames(size, binary, seed=i + 1) for i, (size, binary) in enumerate(args.size)]
    tb = common.make_testbed(4)
    clients = None
    targets: list[Target] = []
    try:
        port = 8300
        proc = netns.start_ipserve(
            tb, [APP, "-w", str(args.workers), "-b", f"0.0.0.0:{port}", "--router", args.router,
                 "--log-level", "warning", *args.ipserve_arg])
        targets.append(Target(f"ipserve --router {args.router}", "ipserve", port, proc,
                              lambda p=proc: sorted({p.pid, *common.ipserve_worker_pids(p)}),
                              lambda p=proc: (p.stop(timeout=15), p.cleanup())))
        port += 1
        g = common.Gunicorn(tb, gunicorn, GUNICORN_APP, port, workers=args.workers,
                            worker_class=WS_WORKER,
                            extra=["--pythonpath", APPS_DIR, "--log-level", "warning",
                                   *args.gunicorn_arg])
        targets.append(Target("gunicorn GeventWebSocketWorker", "gunicorn", port, g,
                              lambda g=g: sorted({g.pid, *common.descendants_of(g.pid)}), g.stop))
        for t in targets:
            if t.kind == "ipserve":
                st = t.handle.wait_ready(args.workers, timeout=60)
                if st["router"] not in t.label:
                    t.label += f" ({st['router']})"
            common.wait_http(tb, t.port)
        # Fork after the servers: the client processes hold no server handles.
        clients = echo_clients(tb, frames, args.client_procs)
        sizes = ", ".join(size_label(*s) for s in args.size)
        n_meas = len(targets) * len(args.size)
        est = n_meas * (args.rounds * (args.duration + 0.8) + args.warmup + 0.8)
        print(f"bench: {len(targets)} servers x sizes {sizes}; {args.connections} connections, "
              f"one message in flight each; {args.rounds} rounds x {args.duration:g} s; "
              f"about {est / 60:.1f} min", flush=True)
        for t in targets:
            print(f"bench: {t.label}: port {t.port}, pids {t.pids()}", flush=True)
        if args.warmup > 0:
            for t in targets:
                for si in range(len(args.size)):
                    r = measure(clients, t, args, si, args.warmup)
                    print(f"bench: warm-up {t.label} {size_label(*args.size[si])}: "
                          f"{r['msgs_per_s']:.0f} msgs/s, {r['connections']} connections, "
                          f"bad {r['bad']}, errors {r['errors'] or 0}", flush=True)
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for si, size in enumerate(args.size):
                for t in order:
                    r = measure(clients, t, args, si, args.duration)
                    r["round"] = rnd + 1
                    t.rounds[si].append(r)
                    print(f"bench: round {rnd + 1} {size_label(*size):<12} {t.label:<32} "
                          f"{r['msgs_per_s']:8.0f} msgs/s  server {r['cpu_ms_per_1k']} ms/1k "
                          f"({r['server_cores']:.2f} cores)  client {r['client_cpu_ms_per_1k']} "
                          f"ms/1k ({r['client_cores']:.2f} cores)  machine busy "
                          f"{100 * r['machine_busy']:.0f}% steal {100 * r['machine_steal']:.0f}%  "
                          f"conns {r['connections']} bad {r['bad']} lost {r['lost']}"
                          + (f" errors {r['errors']}" if r["errors"] else ""), flush=True)
        for t in targets:
            if t.kind == "gunicorn" and not t.handle.running():
                print(f"bench: WARNING: gunicorn exited:\n{t.handle.log_tail()}", flush=True)
    finally:
        if clients is not None:
            clients.close()
        common.stop_all(targets, tb)

    text, summary = summarize(targets, args.size, args)
    print()
    print(text)
    if common.code_fingerprint() != code_at_start:
        print(f"bench: NOTE: the code under ipserve/ changed during the run; the server ran "
              f"what it started with ({code_at_start})")
    path = common.write_json("ws_echo", {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": machine_at_start, "args": {**vars(args), "size": [list(s) for s in args.size]},
        "app": APP, "gunicorn_worker": WS_WORKER, "summary": summary,
        "rounds": {t.label: {size_label(*args.size[si]): rs for si, rs in t.rounds.items()}
                   for t in targets}})
    print(f"\nbench: results in {path}")
    return 0


if __name__ == "__main__":
    common.run_main(main, "namespaces, servers and client processes")
