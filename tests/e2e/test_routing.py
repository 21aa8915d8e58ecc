"""End-to-end tests of sticky routing (issues 2 and 3).

The real `ipserve` command runs in the testbed's server namespace; clients in
the client namespace (198.18.0.16-31, fd00:1e:5e::10-1f: low 4 bits 0..15)
and local clients in the server namespace (127.0.0.16-31) talk to it through
the real kernel: NAT rules (nft, iptables, iptc) or a SO_REUSEPORT group with
a BPF program (reuseport). Nothing is mocked.

Every request is checked against `ipservectl status --json`: the worker that
answers (probe app: pid, REMOTE_ADDR, worker slot) must be the active worker
of slot `address & (workers - 1)`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

import netns
from backends import backend_unavailable, routed_workers, slot_of, which
from netns import active_workers, call_in, http_json, tcp_connect, ws_connect

PORT = 8000
WORKERS = 4
NOBODY = 65534
BACKENDS = ["nft", "iptables", "iptc", "reuseport"]
NAT_BACKENDS = ("nft", "iptables", "iptc")
LOCAL_SOURCES = [f"127.0.0.{i}" for i in range(16, 32)]   # low 4 bits 0..15
IPTABLES_TOOLS = ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy")


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #

@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    why = backend_unavailable(request.param)
    if why:
        pytest.skip(why)
    return request.param


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #







def wait_routed(srv, workers: int = WORKERS, timeout: float = 30,
                predicate=lambda table: True) -> dict[int, dict]:
    st = srv.wait_for(lambda st: (t := routed_workers(st, workers)) is not None and predicate(t),
                      timeout=timeout, what=f"{workers} active workers, each routed its own slot")
    return routed_workers(st, workers)


def serve(ipserve, router: str, *, workers: int = WORKERS, binds=("0.0.0.0:8000",),
          extra=(), **kwargs):
    """Start ipserve with the probe app and wait until every slot is routed to
    its own worker. Returns (process, {slot: worker status})."""
    args = [netns.PROBE_APP, "-w", str(workers), "--router", router, "--graceful-timeout", "5"]
    for b in binds:
        args += ["-b", b]
    srv = ipserve([*args, *extra], **kwargs)
    return srv, wait_routed(srv, workers)


def assert_pinned(table: dict[int, dict], ns: str, sources, dst: str, *, workers: int = WORKERS,
                  rounds: int = 3) -> dict[str, int]:
    """`rounds` requests per source, each on a fresh connection: every answer
    comes from the active worker of the source's slot, with REMOTE_ADDR the
    source. Returns source -> pid."""
    answered: dict[str, set[int]] = {}
    for _ in range(rounds):
        for src in sources:
            data = http_json(ns, src, dst, PORT, timeout=5)
            slot = slot_of(src, workers)
            where = f"request from {src} (slot {slot}) to {dst}:{PORT}"
            assert data["remote_addr"] == src, where
            assert data["worker"]["slot"] == slot, f"{where} answered by slot {data['worker']}"
            assert data["pid"] == data["worker"]["pid"] == table[slot]["pid"], \
                f"{where} answered by pid {data['pid']}, slot {slot}'s worker is {table[slot]['pid']}"
            answered.setdefault(src, set()).add(data["pid"])
    assert all(len(pids) == 1 for pids in answered.values()), answered
    pid_of = {src: pids.pop() for src, pids in answered.items()}
    # Different low bits, different workers: every worker got its own slot's clients.
    slots_seen = {slot_of(src, workers) for src in sources}
    assert len({pid_of[src] for src in sources}) == len(slots_seen)
    return pid_of


def wait_exit(srv, timeout: float = 30) -> int:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise srv.error(f"ipserve did not exit within {timeout}s") from None


def kernel_rules(ns: str) -> dict[str, str]:
    """What the firewall holds in `ns`: the nft ruleset and every iptables nat listing."""
    out = {}
    if which("nft"):
        out["nft"] = call_in(ns, [which("nft"), "list", "ruleset"]).stdout
    for tool in IPTABLES_TOOLS:
        path = which(tool)
        if path:
            proc = call_in(ns, [path, "-w", "-t", "nat", "-S"], check=False)
            out[tool] = proc.stdout + proc.stderr
    # Comments only: iptables warns of legacy tables once anything (this very
    # listing included) has instantiated them.
    return {k: "\n".join(line for line in v.splitlines() if not line.startswith("#"))
            for k, v in out.items()}


def assert_no_ipserve_rules(ns: str) -> None:
    rules = kernel_rules(ns)
    assert "ipserve" not in rules.get("nft", ""), rules["nft"]
    for tool in IPTABLES_TOOLS:
        assert "IPS-" not in rules.get(tool, ""), f"{tool} -t nat -S:\n{rules[tool]}"


def assert_own_rules_present(ns: str, backend: str, name: str) -> None:
    """Sanity check of the rule checks: while running, our rules are visible."""
    rules = kernel_rules(ns)
    if backend == "nft":
        assert f"table ip ipserve_{name}" in rules["nft"], rules["nft"]
    elif backend == "iptables":
        assert f"-N IPS-{name}" in rules["iptables"].splitlines(), rules["iptables"]
    elif backend == "iptc":
        assert f"-N IPS-{name}" in rules["iptables-legacy"].splitlines(), rules["iptables-legacy"]
    else:
        assert "ipserve" not in rules.get("nft", "") and not any(
            "IPS-" in rules.get(t, "") for t in IPTABLES_TOOLS), "reuseport wrote firewall rules"


def assert_refused(ns: str, src: str, dst: str) -> None:
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(ns, src, dst, PORT, timeout=2).close()


def pidfd_kill(pid: int, sig: int = signal.SIGKILL) -> int:
    """Signal `pid` through a pidfd; returns the pidfd (caller closes it)."""
    fd = os.pidfd_open(pid)
    signal.pidfd_send_signal(fd, sig)
    return fd


def proc_ids(pid: int) -> tuple[int, int]:
    """(real uid, effective capability mask) of a live process."""
    uid = cap = None
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("CapEff:"):
                cap = int(line.split()[1], 16)
    return uid, cap


class Hammer(threading.Thread):
    """Requests from every source in turn, each on a fresh connection, until
    stopped (or `limit` seconds: the loop is always bounded). Counts every
    failure: refused, reset, timed out, non-200.

    pause(before=...) returns once no request is in flight, right before a
    request from one of `before`; after resume() that request is the first.
    `sent` counts requests connected and written, `attempts` finished ones."""

    def __init__(self, ns: str, sources, dst: str, limit: float = 60.0, timeout: float = 15.0):
        super().__init__(daemon=True)
        self.ns, self.sources, self.dst = ns, list(sources), dst
        self.limit, self.timeout = limit, timeout
        self.halt = threading.Event()
        self._pause = threading.Event()
        self._paused = threading.Event()
        self._resume = threading.Event()
        self._pause_before: set[str] = set()
        self.ok = 0
        self.sent = 0
        self.attempts = 0
        self.rounds = 0
        self.failures: list[str] = []
        self.answers: list[tuple[str, int]] = []     # (source, pid)

    def pause(self, before=(), timeout: float = 15) -> None:
        self._pause_before = set(before)
        self._resume.clear()
        self._pause.set()
        assert self._paused.wait(timeout), "hammer did not pause"

    def resume(self) -> None:
        self._pause.clear()
        self._paused.clear()
        self._resume.set()

    def _request(self, src: str) -> tuple[int, bytes]:
        conn = netns.NsHTTPConnection(self.ns, src, self.dst, PORT, timeout=self.timeout)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            self.sent += 1
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < deadline:
            for src in self.sources:
                if self._pause.is_set() and (not self._pause_before or src in self._pause_before):
                    self._paused.set()
                    self._resume.wait(max(0.0, deadline - time.monotonic()))
                try:
                    status, body = self._request(src)
                    if status == 200:
                        self.answers.append((src, json.loads(body)["pid"]))
                        self.ok += 1
                    else:
                        self.failures.append(f"{src}: HTTP {status} {body[:100]!r}")
                except Exception as exc:        # noqa: BLE001 - counted, reported
                    self.failures.append(f"{src}: {exc!r}")
                finally:
                    self.attempts += 1
            self.rounds += 1

    def wait_progress(self, timeout: float = 15) -> None:
        """Until one more request is written (it may wait for an answer) or finished."""
        sent, attempts = self.sent, self.attempts
        deadline = time.monotonic() + timeout
        while (self.sent == sent and self.attempts == attempts and self.is_alive()
               and time.monotonic() < deadline):
            time.sleep(0.001)

    def wait_rounds(self, n: int, timeout: float = 30) -> None:
        target = self.rounds + n
        deadline = time.monotonic() + timeout
        while self.rounds < target and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def finish(self) -> None:
        self.halt.set()
        self.resume()
        self.join(30)
        assert not self.is_alive(), "hammer thread did not stop"


# --------------------------------------------------------------------------- #
# Issue 2: every backend
# --------------------------------------------------------------------------- #

def test_remote_clients_pinned_by_low_bits(testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    assert srv.last_status["router"] == backend
    assert len({w["pid"] for w in table.values()}) == WORKERS
    pid_of = assert_pinned(table, tb.client_ns, tb.client_ips, tb.server_ip)
    # Addresses sharing their low bits share the worker; the 16 addresses
    # cover each of the 4 slots 4 times.
    for a in tb.client_ips:
        for b in tb.client_ips:
            assert (pid_of[a] == pid_of[b]) == (slot_of(a, WORKERS) == slot_of(b, WORKERS))
    # Keep-alive: many requests on one connection stay with the same worker.
    src = tb.client_ips[6]
    with netns.HttpClient(tb.client_ns, src, tb.server_ip, PORT) as c:
        pids = {c.json("/")["pid"] for _ in range(5)}
        assert pids == {table[slot_of(src, WORKERS)]["pid"]} and c.connects == 1


def test_local_clients_pinned(testbed, ipserve, backend):
    """Clients inside the server namespace, from 127.0.0.x to 127.0.0.1 (nat
    OUTPUT for the NAT backends, the reuseport group's wildcard otherwise)."""
    srv, table = serve(ipserve, backend, binds=("0.0.0.0:8000",))
    assert_pinned(table, testbed.server_ns, LOCAL_SOURCES, "127.0.0.1")


def test_websocket_echo_through_routing(testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    sources = (tb.client_ips[1], tb.client_ips[2])          # slots 1 and 2
    sockets = []
    try:
        for src in sources:
            ws = ws_connect(tb.client_ns, src, tb.server_ip, PORT, "/ws")
            sockets.append(ws)
            assert ws.sock.getsockname()[0] == src
            for msg in ("hello", "x" * 70000):
                ws.send(msg)
                assert ws.recv() == msg
            ws.send_binary(b"\x00\x01\xff")
            assert ws.recv() == b"\x00\x01\xff"
        # Each upgrade is held by the worker of its source's slot (heartbeats
        # carry the connection counts).
        slots = {slot_of(src, WORKERS) for src in sources}
        st = srv.wait_for(lambda st: {w["slot"] for w in active_workers(st)
                                      if w["connections"] >= 1} >= slots,
                          timeout=10, what=f"slots {sorted(slots)} to count their WebSocket")
        assert {w["slot"]: w["connections"] for w in active_workers(st)} == \
               {slot: int(slot in slots) for slot in range(WORKERS)}
    finally:
        for ws in sockets:
            ws.close()


class RequestsRefused(AssertionError):
    """Connections refused while a worker was replaced."""


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_sigkill_worker_respawned_none_refused(testbed, ipserve, backend):
    """Requests from all 16 addresses in a loop while slot 1's worker is
    SIGKILLed and replaced: none fails.

    The master is stopped (SIGSTOP) from just before the kill until a request
    from one of the victim's addresses has been made, so that request lands
    in the window between the worker's death and the master's reaction for
    certain, not by luck of timing."""
    tb = testbed
    srv, table = serve(ipserve, backend)
    victim = table[1]
    victim_addrs = [ip for ip in tb.client_ips if slot_of(ip, WORKERS) == 1]
    hammer = Hammer(tb.client_ns, tb.client_ips, tb.server_ip)
    hammer.start()
    fd = None
    try:
        hammer.wait_rounds(1)                          # load is flowing before the kill
        hammer.pause(before=victim_addrs)              # nothing in flight to the victim
        srv.send_signal(signal.SIGSTOP)
        try:
            fd = pidfd_kill(victim["pid"])
            assert not netns._wait_pidfds([fd], 10), "the victim survived SIGKILL"
            hammer.resume()
            hammer.wait_progress()                     # refused at once, or waiting for the slot
        finally:
            srv.send_signal(signal.SIGCONT)
        new = wait_routed(srv, predicate=lambda t: t[1]["pid"] != victim["pid"])
        hammer.wait_rounds(2)                          # and it goes on after the replacement
    finally:
        hammer.finish()
        if fd is not None:
            os.close(fd)
    assert hammer.ok > 0
    refused = [f for f in hammer.failures if "ConnectionRefusedError" in f]
    if refused:
        raise RequestsRefused(f"{len(refused)} of {hammer.attempts} requests refused around the "
                              f"respawn: {refused[:10]}")
    assert hammer.failures == [], (f"{len(hammer.failures)} of {hammer.attempts} requests failed "
                                   f"around the respawn: {hammer.failures[:10]}")
    assert not netns._is_alive(victim["pid"])
    assert {s: w["pid"] for s, w in new.items() if s != 1} == \
           {s: w["pid"] for s, w in table.items() if s != 1}
    # Every answer came from the victim (before the kill), its replacement, or
    # a live neighbour covering slot 1 meanwhile (NAT backends).
    allowed = {w["pid"] for w in table.values()} | {new[1]["pid"]}
    assert {pid for _, pid in hammer.answers} <= allowed
    assert_pinned(new, tb.client_ns, tb.client_ips, tb.server_ip, rounds=1)


def test_term_removes_rules_and_workers(testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    assert_own_rules_present(tb.server_ns, backend, srv.name)
    assert http_json(tb.client_ns, tb.client_ips[3], tb.server_ip, PORT)["pid"] == table[3]["pid"]
    rc = srv.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, srv.log_tail()
    assert srv.live_worker_pids() == []
    assert netns.ns_pids(tb.server_ns) == [], "processes left in the server namespace"
    assert_no_ipserve_rules(tb.server_ns)
    # Nothing listens and nothing redirects: the public port is closed.
    assert_refused(tb.client_ns, tb.client_ips[0], tb.server_ip)
    assert_refused(tb.server_ns, LOCAL_SOURCES[0], "127.0.0.1")
    assert not os.path.exists(os.path.join(srv.runtime_dir, srv.name + ".sock"))


def test_bad_input_exits_2_without_touching_rules(testbed, ipserve, backend, tmp_path):
    tb = testbed
    before = kernel_rules(tb.server_ns)
    conf = tmp_path / "ipserve.toml"
    cases = [   # (config file, environment, words the one line must hold)
        ("workers = 3\n", None, ["workers", "3", str(conf)]),
        ('workers = 4\nwrokers = 4\nbind = "0.0.0.0:8000"\n', None, ["wrokers", str(conf)]),
        ("workers = 4\n", {"IPSERVE_WORKERS": "6"}, ["workers", "6", "IPSERVE_WORKERS"]),
    ]
    for text, env, words in cases:
        conf.write_text(text)
        srv = ipserve([netns.PROBE_APP, "--router", backend, "-c", str(conf)], env=env)
        assert wait_exit(srv) == 2, srv.log_tail()
        lines = srv.own_lines()
        assert len(lines) == 1, lines
        for word in words:
            assert word in lines[0], lines
    # A bad APP, named in the one line.
    srv = ipserve(["no_such_module_4711:application", "-w", "2", "--router", backend])
    assert wait_exit(srv) == 2, srv.log_tail()
    lines = srv.own_lines()
    assert len(lines) == 1 and "no_such_module_4711" in lines[0], lines
    # No process was left and no rule was created.
    assert netns.ns_pids(tb.server_ns) == []
    assert kernel_rules(tb.server_ns) == before
    assert_refused(tb.client_ns, tb.client_ips[0], tb.server_ip)


# --------------------------------------------------------------------------- #
# Issue 3: IPv6 on every backend
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("binds", [("[::]:8000",), ("0.0.0.0:8000", "[::]:8000")],
                         ids=["v6", "v4+v6"])
def test_ipv6_clients_pinned_by_low_bits(testbed, ipserve, backend, binds):
    if backend == "iptc" and len(binds) > 1:
        pytest.skip("iptc refuses mixed IPv4 + IPv6 binds by design (use nft or iptables)")
    tb = testbed
    srv, table = serve(ipserve, backend, binds=binds)
    assert srv.last_status["bind"] == list(binds)
    pid6 = assert_pinned(table, tb.client_ns, tb.client_ips6, tb.server_ip6)
    if len(binds) > 1:
        pid4 = assert_pinned(table, tb.client_ns, tb.client_ips, tb.server_ip, rounds=1)
        # The slot is the low bits of the client's own address, in each family.
        for a4, a6 in zip(tb.client_ips, tb.client_ips6):
            assert slot_of(a4, WORKERS) == slot_of(a6, WORKERS)
            assert pid4[a4] == pid6[a6]
    else:
        assert_refused(tb.client_ns, tb.client_ips[0], tb.server_ip)   # v6 only
    assert srv.stop(timeout=30) == 0
    assert_no_ipserve_rules(tb.server_ns)


# --------------------------------------------------------------------------- #
# Issue 3: without privilege (uid 65534, no capabilities)
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("router", ["reuseport", "auto"])
def test_unprivileged_clients_pinned(testbed, ipserve, router):
    tb = testbed
    before = kernel_rules(tb.server_ns)
    srv, table = serve(ipserve, router, binds=("0.0.0.0:8000", "[::]:8000"), run_as=NOBODY)
    st = srv.last_status
    assert st["router"] == "reuseport"
    # Status shows each slot's socket, for every bind.
    assert sorted((sk["address"], sk["slot"]) for sk in st["routing"]["sockets"]) == sorted(
        (addr, slot) for addr in ("0.0.0.0:8000", "[::]:8000") for slot in range(WORKERS))
    for pid in [srv.pid, *(w["pid"] for w in table.values())]:
        assert proc_ids(pid) == (NOBODY, 0), f"pid {pid} is not uid {NOBODY} without capabilities"
    if router == "auto":
        first = srv.own_lines()[0]
        assert "reuseport" in first and "CAP_NET_ADMIN" in first, first
    assert_pinned(table, tb.client_ns, tb.client_ips, tb.server_ip)
    assert_pinned(table, tb.client_ns, tb.client_ips6, tb.server_ip6, rounds=1)
    assert_pinned(table, tb.server_ns, LOCAL_SOURCES, "127.0.0.1", rounds=1)
    assert srv.stop(timeout=30) == 0
    assert netns.ns_pids(tb.server_ns) == []
    assert kernel_rules(tb.server_ns) == before
    assert_refused(tb.client_ns, tb.client_ips[0], tb.server_ip)


@pytest.mark.parametrize("router", ["reuseport", "auto"])
def test_unprivileged_port_80_exits_2_saying_why(testbed, ipserve, router):
    srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", router, "-b", "0.0.0.0:80"],
                  run_as=NOBODY)
    assert wait_exit(srv) == 2, srv.log_tail()
    text = "\n".join(srv.own_lines())
    error = [line for line in srv.own_lines() if "error" in line]
    assert len(error) == 1, text
    # Why (privileged port, missing capability) and what to do (a port >= 1024, or grant it).
    for word in (":80", "privileged", "CAP_NET_BIND_SERVICE", "1024"):
        assert word in error[0], error[0]
    assert netns.ns_pids(testbed.server_ns) == []


def test_unprivileged_reuseport_sigkill_requests_answered_late(testbed, ipserve):
    """A dead worker's socket stays open in the master: connections for its
    slot wait in the backlog and the replacement serves them. The master is
    stopped (SIGSTOP) across the kill, so the requests are certainly made
    before any replacement exists."""
    tb = testbed
    srv, table = serve(ipserve, "reuseport", run_as=NOBODY)
    victim = table[1]
    sources = [ip for ip in tb.client_ips if slot_of(ip, WORKERS) == 1]
    results: dict[str, object] = {}
    sent = threading.Barrier(len(sources) + 1, timeout=20)

    def request(src: str) -> None:
        try:
            conn = netns.NsHTTPConnection(tb.client_ns, src, tb.server_ip, PORT, timeout=30)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})   # connected, sent
                sent.wait()
                resp = conn.getresponse()
                results[src] = (resp.status, json.loads(resp.read()))
            finally:
                conn.close()
        except Exception as exc:        # noqa: BLE001 - reported below
            results[src] = exc
            sent.abort()

    threads = [threading.Thread(target=request, args=(src,), daemon=True) for src in sources]
    srv.send_signal(signal.SIGSTOP)
    fd = None
    try:
        fd = pidfd_kill(victim["pid"])
        netns._wait_pidfds([fd], 10)
        assert not netns._is_alive(victim["pid"])
        for t in threads:
            t.start()
        try:
            sent.wait()                 # every request is connected and sent, no worker for slot 1
        except threading.BrokenBarrierError:
            pass
    finally:
        srv.send_signal(signal.SIGCONT)
        if fd is not None:
            os.close(fd)
    for t in threads:
        t.join(40)
    new = wait_routed(srv, predicate=lambda t: t[1]["pid"] != victim["pid"])
    for src in sources:
        result = results.get(src)
        assert isinstance(result, tuple), f"request from {src} failed: {result!r}"
        status, data = result
        assert status == 200
        assert data["pid"] == new[1]["pid"] and data["worker"]["slot"] == 1, data
        assert data["remote_addr"] == src
    assert_pinned(new, tb.client_ns, tb.client_ips, tb.server_ip, rounds=1)
