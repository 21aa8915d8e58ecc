"""End-to-end tests of binding like a server, the capacity refusal and the
instance lock (issue 8, items 3, 4 and 5).

The real `ipserve` command runs in the testbed's server namespace with a NAT
router (nft or iptables); clients connect from the client namespace
(198.18.0.16-31) or from 127.0.0.x inside the server namespace. What is
checked is what the kernel and the process table hold: exit codes, the one
line a refusal prints, `nft -j list ruleset` / `iptables -t nat -S`, which
worker pid answers (the probe app returns its pid), live processes and files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import subprocess
import tempfile
import threading
import time

import pytest

import netns
from backends import backend_unavailable, routed_workers, slot_of, which
from netns import call_in, http_json, tcp_connect

PORT = 8000
WORKERS = 2
MIB = 1 << 20
BIG_APP = os.path.join(netns.REPO_ROOT, "tests", "apps", "bind_big.py") + ":application"
BIG_APP_MIB = 200            # what tests/apps/bind_big.py keeps resident from import on
BIG_WORKERS = 256


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def require(router: str) -> None:
    why = backend_unavailable(router)
    if why:
        pytest.skip(why)


def error_lines(srv) -> list[str]:
    return [line for line in srv.own_lines() if line.startswith("ipserve: error:")]


def wait_exit(srv, timeout: float = 60) -> int:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise srv.error(f"ipserve did not exit within {timeout}s") from None


def nft_objects(ns: str) -> list[dict]:
    """`nft -j list ruleset` in `ns`: every table, chain, map and rule object."""
    out = call_in(ns, [which("nft"), "-j", "list", "ruleset"]).stdout
    return [obj for obj in json.loads(out)["nftables"] if "metainfo" not in obj]


def nft_tables(ns: str) -> set[tuple[str, str]]:
    return {(o["table"]["family"], o["table"]["name"]) for o in nft_objects(ns) if "table" in o}


def nft_table_objects(ns: str, table: str) -> list[dict]:
    """Every object (table, map, chains, rules) belonging to nft table `table`, any family."""
    out = []
    for obj in nft_objects(ns):
        (kind, body), = obj.items()
        if body.get("table", body.get("name") if kind == "table" else None) == table:
            out.append(obj)
    return out


def iptables_nat(ns: str) -> str:
    """`iptables -t nat -S` and `ip6tables -t nat -S` in `ns`, comments dropped."""
    text = ""
    for tool in ("iptables", "ip6tables"):
        path = which(tool)
        if path:
            proc = call_in(ns, [path, "-w", "-t", "nat", "-S"], check=False)
            text += proc.stdout + proc.stderr
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def firewall(ns: str) -> tuple[list[dict], str]:
    """Everything the firewall of `ns` holds (nft objects, iptables nat listing)."""
    return (nft_objects(ns) if which("nft") else []), iptables_nat(ns)


def runtime_files(srv) -> list[str]:
    """The instance's files in its runtime directory (the .lock file is kept by design)."""
    return sorted(f for f in os.listdir(srv.runtime_dir)
                  if f.startswith(srv.name + ".") and not f.endswith(".lock"))


def serve(ipserve, router: str = "nft", *, workers: int = WORKERS, port: int = PORT,
          app: str = netns.PROBE_APP, extra=(), **kwargs):
    """Start ipserve and wait until every slot is routed to its own worker.
    Returns (process, {slot: worker status})."""
    srv = ipserve([app, "-w", str(workers), "--router", router, "-b", f"0.0.0.0:{port}",
                   "--graceful-timeout", "5", *extra], **kwargs)
    return srv, wait_routed(srv, workers)


def wait_routed(srv, workers: int = WORKERS, timeout: float = 60) -> dict[int, dict]:
    st = srv.wait_for(lambda st: routed_workers(st, workers) is not None, timeout=timeout,
                      what=f"{workers} slots routed to their own active workers")
    return routed_workers(st, workers)


def assert_served_by(tb, table: dict[int, dict], port: int = PORT, workers: int = WORKERS) -> None:
    """A request from each of the first 4 client addresses reaches its slot's worker."""
    for src in tb.client_ips[:4]:
        data = http_json(tb.client_ns, src, tb.server_ip, port, timeout=10)
        assert data["pid"] == table[slot_of(src, workers)]["pid"], (src, data, table)


def bind_error(ns: str, host: str, port: int, *, reuseaddr: bool = False,
               reuseport: bool = False, listen: bool = False) -> int | None:
    """Try to bind (and optionally listen on) host:port in `ns` as a third program
    would; the errno it got, or None if it succeeded."""
    with netns.in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if reuseaddr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen()
        return None
    except OSError as exc:
        return exc.errno
    finally:
        sock.close()


class PortHolder:
    """Another program's server: a plain listening socket on host:port in `ns`
    (made by this process, so no pid of it is in the namespace) that answers
    every connection with b"holder\\n" and closes it."""

    def __init__(self, ns: str, host: str, port: int):
        with netns.in_netns(ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as servers do
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.served = 0
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.halt.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                self.served += 1          # before answering: the client may check at once
                with contextlib.suppress(OSError):
                    conn.sendall(b"holder\n")

    def close(self) -> None:
        self.halt.set()
        self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> "PortHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_line(ns: str, src: str, dst: str, port: int) -> bytes:
    sock = tcp_connect(ns, src, dst, port, timeout=10)
    try:
        return sock.makefile("rb").readline()
    finally:
        sock.close()


def assert_nothing_started(tb, srv, before) -> None:
    """No process left in the server namespace, the firewall as it was, no files."""
    assert netns.ns_pids(tb.server_ns) == [], "processes left in the server namespace"
    assert firewall(tb.server_ns) == before
    assert runtime_files(srv) == []


# --------------------------------------------------------------------------- #
# Binding like a server
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("router", ["nft", "iptables"])
def test_port_in_use_by_another_program_exits_2(testbed, ipserve, router):
    """A port in use by another program: exit 2, one error line, nothing created, its clients unharmed."""
    require(router)
    tb = testbed
    with PortHolder(tb.server_ns, "0.0.0.0", PORT) as holder:
        assert read_line(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT) == b"holder\n"
        before = firewall(tb.server_ns)
        srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", router, "-b", f"0.0.0.0:{PORT}"])
        assert wait_exit(srv) == 2, srv.log_tail()
        errors = error_lines(srv)
        assert len(errors) == 1, srv.own_lines()
        assert f"0.0.0.0:{PORT}" in errors[0] and "already in use" in errors[0], errors
        assert "Traceback" not in srv.log_text()
        assert_nothing_started(tb, srv, before)
        # Its clients, remote and local, still reach the other program.
        for src in tb.client_ips[:4]:
            assert read_line(tb.client_ns, src, tb.server_ip, PORT) == b"holder\n"
        assert read_line(tb.server_ns, "127.0.0.16", "127.0.0.1", PORT) == b"holder\n"
        assert holder.served == 6


@pytest.mark.parametrize("router", ["nft", "iptables"])
def test_address_not_on_host_exits_2(testbed, ipserve, router):
    """A bind address the host does not have: exit 2, one error line, nothing created."""
    require(router)
    tb = testbed
    before = firewall(tb.server_ns)
    srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", router, "-b", "203.0.113.7:8000"])
    assert wait_exit(srv) == 2, srv.log_tail()
    errors = error_lines(srv)
    assert len(errors) == 1, srv.own_lines()
    assert "203.0.113.7" in errors[0] and "not an address of this host" in errors[0], errors
    assert "Traceback" not in srv.log_text()
    assert_nothing_started(tb, srv, before)


@pytest.mark.parametrize("bind", ["in-use", "not-local"])
def test_bind_refusal_is_the_only_line(testbed, ipserve, bind):
    """A bind refusal prints exactly one line, like every other usage error."""
    require("nft")
    tb = testbed
    with contextlib.ExitStack() as stack:
        if bind == "in-use":
            stack.enter_context(PortHolder(tb.server_ns, "0.0.0.0", PORT))
            address = f"0.0.0.0:{PORT}"
        else:
            address = f"203.0.113.7:{PORT}"
        srv = ipserve([netns.PROBE_APP, "-w", "2", "--router", "nft", "-b", address])
        assert wait_exit(srv) == 2, srv.log_tail()
        lines = srv.own_lines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("ipserve: error:") and address.split(":")[0] in lines[0]


def test_served_port_cannot_be_bound_by_another_program(testbed, ipserve):
    """While ipserve serves PORT no other socket can bind it (SO_REUSEADDR or not); after it, one can."""
    require("nft")
    tb = testbed
    srv, table = serve(ipserve, "nft")
    assert_served_by(tb, table)
    attempts = [(host, opts) for host in ("0.0.0.0", "127.0.0.1", tb.server_ip)
                for opts in ({}, {"reuseaddr": True}, {"reuseaddr": True, "reuseport": True},
                             {"reuseaddr": True, "listen": True})]
    for host, opts in attempts:
        assert bind_error(tb.server_ns, host, PORT, **opts) == errno.EADDRINUSE, (host, opts)
    assert_served_by(tb, table)         # nothing of that disturbed it
    assert srv.stop(timeout=30) == 0
    # The reservation ends with the master: the port is free again.
    for host, opts in attempts:
        assert bind_error(tb.server_ns, host, PORT, **opts) is None, (host, opts)


def test_reserved_port_without_rules_refuses_connections(testbed, ipserve):
    """With the nft table deleted by hand, the public port refuses connections (RST), no hang."""
    require("nft")
    tb = testbed
    srv, table = serve(ipserve, "nft")
    assert_served_by(tb, table)
    table_name = f"ipserve_{srv.name}"
    assert ("ip", table_name) in nft_tables(tb.server_ns)
    call_in(tb.server_ns, [which("nft"), "delete", "table", "ip", table_name])
    assert ("ip", table_name) not in nft_tables(tb.server_ns)
    # A generous timeout: a reserved port that queued connections would hang
    # here (socket.timeout) rather than refuse.
    for ns, src, dst in ((tb.client_ns, tb.client_ips[0], tb.server_ip),
                         (tb.client_ns, tb.client_ips[1], tb.server_ip),
                         (tb.server_ns, "127.0.0.16", "127.0.0.1")):
        with pytest.raises(ConnectionRefusedError):
            tcp_connect(ns, src, dst, PORT, timeout=15).close()
    assert srv.running()
    assert srv.stop(timeout=30) == 0
    assert ("ip", table_name) not in nft_tables(tb.server_ns)


# --------------------------------------------------------------------------- #
# Capacity
# --------------------------------------------------------------------------- #

def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def test_worker_count_beyond_memory_exits_2_with_the_numbers(testbed, ipserve):
    """-w 256 of a 200 MiB app is refused with the measured numbers before anything starts."""
    require("nft")
    tb = testbed
    if BIG_WORKERS * BIG_APP_MIB * MIB <= mem_available():
        pytest.skip(f"MemAvailable ({mem_available() >> 30} GiB) holds {BIG_WORKERS} x "
                    f"{BIG_APP_MIB} MiB: the refusal cannot be provoked here")
    before = firewall(tb.server_ns)
    srv = ipserve([BIG_APP, "-w", str(BIG_WORKERS), "--router", "nft", "-b", f"0.0.0.0:{PORT}"])
    assert wait_exit(srv, timeout=120) == 2, srv.log_tail()
    lines = srv.own_lines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("ipserve: error:") and "memory" in line and "use at most -w" in line, line
    # The RSS it counts per worker is the one measured at import (200 MiB and
    # more), not a default; the count it proposes is a power of two below 256.
    m = re.search(rf"-w {BIG_WORKERS} needs about {BIG_WORKERS} x ([0-9.]+) (MiB|GiB)", line)
    assert m, line
    per_worker = float(m.group(1)) * (1024 if m.group(2) == "GiB" else 1)
    assert per_worker >= BIG_APP_MIB, line
    at_most = int(re.search(r"use at most -w (\d+)", line).group(1))
    assert 1 <= at_most < BIG_WORKERS and at_most & (at_most - 1) == 0, line
    assert_nothing_started(tb, srv, before)
    assert not os.path.exists(os.path.join(srv.runtime_dir, srv.name + ".lock"))


# --------------------------------------------------------------------------- #
# One master per name
# --------------------------------------------------------------------------- #

def test_two_masters_started_together_exactly_one_serves(testbed, ipserve):
    """Two masters of one name started together: one serves, the other exits 2 with one line (x3)."""
    require("nft")
    tb = testbed
    runtime_dir = tempfile.mkdtemp(prefix="ips-race-")
    tb.add_path(runtime_dir)
    name = netns.unique_name("race")
    args = [netns.PROBE_APP, "-w", str(WORKERS), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
            "--graceful-timeout", "5", "-n", name, "--runtime-dir", runtime_dir]
    for round_ in range(3):
        pair = [ipserve(args), ipserve(args)]          # started back to back
        exited: dict[int, int] = {}
        deadline = time.monotonic() + 60
        # Wait until one has exited and the other serves every slot.
        while time.monotonic() < deadline:
            for i, srv in enumerate(pair):
                if i not in exited and srv.returncode is not None:
                    exited[i] = srv.returncode
            if len(exited) == 2:
                break
            if len(exited) == 1:
                winner = pair[1 - next(iter(exited))]
                with contextlib.suppress(netns.IpserveError):
                    if routed_workers(winner.status(timeout=5), WORKERS) is not None:
                        break
            time.sleep(0.1)
        assert len(exited) == 1, (f"round {round_}: exit codes {exited}; logs:\n"
                                  + "\n---\n".join(s.log_tail(20) for s in pair))
        (loser_i, code), = exited.items()
        loser, winner = pair[loser_i], pair[1 - loser_i]
        assert code == 2, loser.log_tail()
        lines = loser.own_lines()
        assert len(lines) == 1 and lines[0].startswith("ipserve: error:"), lines
        assert name in lines[0], lines
        st = winner.status()
        table = routed_workers(st, WORKERS)
        assert table is not None and st["master"]["pid"] == winner.pid, st
        assert_served_by(tb, table)
        # Every process in the namespace is the winner or one of its workers
        # (short-lived rule writes may come and go: wait for them to end).
        expected = {winner.pid} | {w["pid"] for w in st["workers"]}
        until = time.monotonic() + 15
        while set(netns.ns_pids(tb.server_ns)) != expected and time.monotonic() < until:
            time.sleep(0.1)
        assert set(netns.ns_pids(tb.server_ns)) == expected, (round_, st["workers"])
        assert winner.stop(timeout=30) == 0, winner.log_tail()
        assert netns.ns_pids(tb.server_ns) == []
        assert ("ip", f"ipserve_{name}") not in nft_tables(tb.server_ns)


def test_names_differing_by_dash_and_dot_do_not_share_rules(testbed, ipserve):
    """web-1 and web.1 get their own nft tables; stopping one leaves the other serving."""
    require("nft")
    tb = testbed
    runtime_dir = tempfile.mkdtemp(prefix="ips-names-")
    tb.add_path(runtime_dir)
    dash, dash_table = serve(ipserve, "nft", port=8001,
                             extra=["-n", "web-1", "--runtime-dir", runtime_dir])
    dot, dot_table = serve(ipserve, "nft", port=8002,
                           extra=["-n", "web.1", "--runtime-dir", runtime_dir])
    assert dash.running(), dash.log_tail()
    tables = nft_tables(tb.server_ns)
    assert {("ip", "ipserve_web-1"), ("ip", "ipserve_web.1")} <= tables, tables
    dash_rules = json.dumps(nft_table_objects(tb.server_ns, "ipserve_web-1"))
    dot_rules = nft_table_objects(tb.server_ns, "ipserve_web.1")
    assert '"dport"' in dash_rules and "8001" in dash_rules and "8002" not in dash_rules
    assert "8002" in json.dumps(dot_rules) and "8001" not in json.dumps(dot_rules)
    assert {w["pid"] for w in dash_table.values()}.isdisjoint(w["pid"] for w in dot_table.values())
    assert_served_by(tb, dash_table, port=8001)
    assert_served_by(tb, dot_table, port=8002)

    assert dash.stop(timeout=30) == 0, dash.log_tail()
    tables = nft_tables(tb.server_ns)
    assert ("ip", "ipserve_web-1") not in tables and ("ip", "ipserve_web.1") in tables, tables
    assert nft_table_objects(tb.server_ns, "ipserve_web.1") == dot_rules
    still = routed_workers(dot.status(), WORKERS)
    assert still is not None and {s: w["pid"] for s, w in still.items()} == \
        {s: w["pid"] for s, w in dot_table.items()}
    assert_served_by(tb, dot_table, port=8002)
    with pytest.raises(ConnectionRefusedError):
        tcp_connect(tb.client_ns, tb.client_ips[0], tb.server_ip, 8001, timeout=15).close()
    assert os.path.exists(os.path.join(runtime_dir, "web.1.sock"))
    assert not os.path.exists(os.path.join(runtime_dir, "web-1.sock"))
