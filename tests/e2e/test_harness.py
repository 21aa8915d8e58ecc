"""Tests of the end-to-end harness itself (no ipserve needed)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import NEEDS_ROOT

import netns
from netns import (HttpClient, IpserveError, Testbed, call_in, http_get, http_json,
                   in_netns, ns_exists, ns_pids, tcp_connect, ws_connect)

E2E_DIR = os.path.dirname(os.path.abspath(__file__))
APPS_DIR = os.path.join(netns.REPO_ROOT, "tests", "apps")


def ip_json(ns, *args):
    return json.loads(call_in(ns, ["ip", "-j", *args]).stdout)


def addresses(ns, dev):
    info = ip_json(ns, "addr", "show", "dev", dev)[0]
    return {(a["family"], a["local"], a["prefixlen"]) for a in info["addr_info"]
            if a.get("scope") == "global"}


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- #
# Namespaces and addresses
# --------------------------------------------------------------------------- #

def test_namespaces_and_addresses(testbed):
    tb = testbed
    assert tb.server_ns.startswith("ips-s-") and tb.client_ns.startswith("ips-c-")
    assert tb.server_ns[len("ips-s-"):] == tb.client_ns[len("ips-c-"):]
    assert {tb.server_ns, tb.client_ns} <= set(netns.ns_list())
    listed = {line.split()[0] for line in
              call_in(None, ["ip", "netns", "list"]).stdout.splitlines() if line.strip()}
    assert {tb.server_ns, tb.client_ns} <= listed

    assert tb.server_ip == "198.18.0.1" and tb.server_ip6 == "fd00:1e:5e::1"
    assert tb.client_ips == [f"198.18.0.{i}" for i in range(16, 32)]
    assert [int(ip.rsplit(".", 1)[1]) & 15 for ip in tb.client_ips] == list(range(16))
    assert tb.client_ips6 == [f"fd00:1e:5e::{i:x}" for i in range(16, 32)]

    c = tb.client
    assert len(c.dev) <= 15 and len(c.server_dev) <= 15
    assert addresses(tb.server_ns, c.server_dev) == {("inet", "198.18.0.1", 24),
                                                     ("inet6", "fd00:1e:5e::1", 64)}
    expected = {("inet", ip, 24) for ip in tb.client_ips}
    expected |= {("inet6", ip, 64) for ip in tb.client_ips6}
    assert addresses(tb.client_ns, c.dev) == expected
    for ns in tb.namespaces:
        lo = ip_json(ns, "link", "show", "dev", "lo")[0]
        assert "UP" in lo["flags"]
    # Nothing tentative: nodad addresses are usable at once.
    out = call_in(tb.client_ns, ["ip", "-6", "addr", "show", "dev", c.dev]).stdout
    assert "tentative" not in "\n".join(l for l in out.splitlines() if "fd00" in l)
    # The root namespace knows nothing of it.
    root_addrs = call_in(None, ["ip", "-br", "addr"]).stdout
    assert "198.18." not in root_addrs and "fd00:1e:5e" not in root_addrs
    assert c.dev not in call_in(None, ["ip", "-br", "link"]).stdout


def test_connect_v4_and_v6_both_ways_immediately(testbed):
    tb = testbed
    with in_netns(tb.server_ns):
        l4 = socket.create_server(("0.0.0.0", 8000))
        l6 = socket.create_server(("::", 8000), family=socket.AF_INET6)
    with l4, l6:
        for src, dst, lst in ((tb.client_ips[7], tb.server_ip, l4),
                              (tb.client_ips6[7], tb.server_ip6, l6)):
            t0 = time.monotonic()
            with tcp_connect(tb.client_ns, src, dst, 8000, timeout=2) as s:
                conn, addr = lst.accept()
                with conn:
                    assert addr[0] == src
                    assert s.getsockname()[0] == src
                    s.sendall(b"ping")
                    assert conn.recv(4) == b"ping"
            # A lost first SYN shows up as a 1 s retransmit (see Testbed._create).
            assert time.monotonic() - t0 < 0.5


def test_make_testbed_four_clients(make_testbed):
    tb = make_testbed(n_clients=4)
    assert len(tb.clients) == 4 and len(set(tb.namespaces)) == 5
    all_ips = [ip for c in tb.clients for ip in c.ips + c.ips6]
    assert len(all_ips) == len(set(all_ips)) == 4 * 32
    with in_netns(tb.server_ns):
        listener = socket.create_server(("::", 8000), family=socket.AF_INET6, dualstack_ipv6=True)
    with listener:
        for k, c in enumerate(tb.clients):
            assert c.server_ip == f"198.18.{k}.1" and c.ips[0] == f"198.18.{k}.16"
            assert c.server_ip6 == ("fd00:1e:5e::1" if k == 0 else f"fd00:1e:5e:{k:x}::1")
            for src, dst in ((c.ips[-1], c.server_ip), (c.ips6[-1], c.server_ip6)):
                with tcp_connect(c.ns, src, dst, 8000, timeout=2):
                    conn, addr = listener.accept()
                    conn.close()
                    assert addr[0].removeprefix("::ffff:") == src
            # Client namespaces are isolated from each other.
            other = tb.clients[(k + 1) % 4]
            with pytest.raises(OSError):
                tcp_connect(c.ns, c.ips[0], other.ips[0], 8000, timeout=0.3)
    tb.close()
    assert not set(tb.namespaces) & set(netns.ns_list())


# --------------------------------------------------------------------------- #
# in_netns
# --------------------------------------------------------------------------- #

def test_in_netns_switches_only_this_thread_and_back(testbed):
    root = netns.current_netns_id()
    client = netns._ns_id(netns.ns_path(testbed.client_ns))
    other_thread = []
    entered = threading.Event()
    release = threading.Event()

    def watcher():
        entered.wait(5)
        other_thread.append(netns.current_netns_id())
        release.set()

    t = threading.Thread(target=watcher)
    t.start()
    with in_netns(testbed.client_ns):
        assert netns.current_netns_id() == client
        entered.set()
        assert release.wait(5)
        s = socket.socket()
        s.bind((testbed.client_ips[3], 0))     # only exists in the client namespace
        s.close()
        # The test runner itself is never listed as living in the namespace.
        assert os.getpid() not in ns_pids(testbed.client_ns)
    t.join()
    assert other_thread == [root]
    assert netns.current_netns_id() == root
    with pytest.raises(OSError):
        socket.socket().bind((testbed.client_ips[3], 0))

    with pytest.raises(ZeroDivisionError):
        with in_netns(testbed.server_ns):
            1 / 0
    assert netns.current_netns_id() == root

    with pytest.raises(FileNotFoundError):
        with in_netns("ips-no-such-ns"):
            pass
    assert netns.current_netns_id() == root


def test_socket_stays_in_its_namespace(testbed):
    with in_netns(testbed.server_ns):
        listener = socket.create_server(("198.18.0.1", 8000))
    with in_netns(testbed.client_ns):
        sock = socket.socket()
    with listener, sock:
        # Back in the root namespace, yet the socket still routes in the client one.
        sock.bind((testbed.client_ips[15], 0))
        sock.settimeout(2)
        sock.connect((testbed.server_ip, 8000))
        conn, addr = listener.accept()
        conn.close()
        assert addr[0] == "198.18.0.31"


# --------------------------------------------------------------------------- #
# Client helpers against the probe app (plain gevent pywsgi, no ipserve)
# --------------------------------------------------------------------------- #

PROBE_SERVER = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import socket, sys
    import gevent
    from gevent import pywsgi
    from geventwebsocket.handler import WebSocketHandler
    sys.path.insert(0, sys.argv[2])
    from probe import application
    port = int(sys.argv[1])
    l4 = socket.create_server(("0.0.0.0", port))
    l6 = socket.create_server(("::", port), family=socket.AF_INET6)
    for l in (l4, l6):
        pywsgi.WSGIServer(l, application, handler_class=WebSocketHandler, log=None).start()
    print("ready", flush=True)
    gevent.wait()
""")


@pytest.fixture
def probe_server(testbed):
    proc = testbed.run_in(testbed.server_ns, [sys.executable, "-c", PROBE_SERVER, "8000",
                                              APPS_DIR],
                          stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"probe server did not start: {line!r}"
    yield proc
    # testbed.close() kills and reaps it


@pytest.mark.parametrize("family", [4, 6])
def test_http_get_whoami(testbed, probe_server, family):
    srcs = testbed.client_ips if family == 4 else testbed.client_ips6
    dst = testbed.server_ip if family == 4 else testbed.server_ip6
    for src in (srcs[0], srcs[9]):
        status, headers, body = http_get(testbed.client_ns, src, dst, 8000, "/whoami")
        assert status == 200
        assert headers["content-type"] == "application/json"
        data = json.loads(body)
        assert data == {"pid": probe_server.pid, "remote_addr": src, "worker": None}
    status, _, body = http_get(testbed.client_ns, srcs[1], dst, 8000, "/nope")
    assert status == 404 and b"/nope" in body
    assert testbed.http_get(srcs[2], "/", port=8000)[0] == 200


def test_http_client_keepalive(testbed, probe_server):
    with HttpClient(testbed.client_ns, testbed.client_ips[4], testbed.server_ip, 8000) as c:
        local = c.local_address
        pids = {c.json("/whoami")["pid"] for _ in range(5)}
        assert c.json("/sleep?s=0.05")["slept"] == 0.05
        assert c.local_address == local and c.connects == 1
        assert pids == {probe_server.pid}
    with HttpClient(testbed.client_ns, testbed.client_ips6[4], testbed.server_ip6, 8000) as c:
        assert c.json("/")["remote_addr"] == testbed.client_ips6[4]
        status, headers, _ = c.request("/", headers={"Connection": "close"})
        assert status == 200
        with pytest.raises(ConnectionError):
            c.get("/")          # the server closed; no silent reconnect


@pytest.mark.parametrize("family", [4, 6])
def test_websocket_echo(testbed, probe_server, family):
    src = testbed.client_ips[5] if family == 4 else testbed.client_ips6[5]
    dst = testbed.server_ip if family == 4 else testbed.server_ip6
    ws = ws_connect(testbed.client_ns, src, dst, 8000, "/ws")
    try:
        assert ws.sock.getsockname()[0] == src
        for msg in ("hello", "x" * 70000):
            ws.send(msg)
            assert ws.recv() == msg
        ws.send_binary(b"\x00\x01")
        assert ws.recv() == b"\x00\x01"
    finally:
        ws.close()
    assert http_get(testbed.client_ns, src, dst, 8000, "/ws")[0] == 400


def test_probe_sleep_block_leak(testbed, probe_server):
    ns, ip, dst = testbed.client_ns, testbed.client_ips, testbed.server_ip
    # /block holds the hub: a concurrent quick request waits for it.
    results = {}

    def blocker():
        results["block"] = http_json(ns, ip[0], dst, 8000, "/block?s=0.5")

    t = threading.Thread(target=blocker)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    http_json(ns, ip[1], dst, 8000, "/whoami")
    waited = time.monotonic() - t0
    t.join()
    assert results["block"]["blocked"] == 0.5 and results["block"]["spins"] > 0
    assert waited > 0.2, "the busy loop did not block the hub"

    # /sleep does not: a quick request during a long poll answers at once.
    t = threading.Thread(target=lambda: results.update(
        sleep=http_json(ns, ip[2], dst, 8000, "/sleep?s=0.5")))
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    http_json(ns, ip[3], dst, 8000, "/whoami")
    assert time.monotonic() - t0 < 0.2
    t.join()
    assert results["sleep"]["slept"] == 0.5

    import psutil
    rss0 = psutil.Process(probe_server.pid).memory_info().rss
    assert http_json(ns, ip[4], dst, 8000, "/leak?mb=20")["len"] == 1
    data = http_json(ns, ip[4], dst, 8000, "/leak?mb=10")
    assert data["len"] == 2 and data["mb"] == 30
    rss1 = psutil.Process(probe_server.pid).memory_info().rss
    assert rss1 - rss0 > 28 << 20


# --------------------------------------------------------------------------- #
# Cleanup
# --------------------------------------------------------------------------- #

STUBBORN = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.fork() == 0:          # a grandchild in its own session
        os.setsid()
        time.sleep(600)
        sys.exit()
    print("up", flush=True)
    time.sleep(600)
""")


def test_close_kills_everything_and_is_idempotent():
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    tb = Testbed(n_clients=2)
    record = os.path.join(netns.REGISTRY_DIR, f"{tb.tag}.json")
    assert os.path.exists(record)
    procs = []
    for ns in tb.namespaces:
        p = netns.run_in(ns, [sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE,
                         start_new_session=True)
        assert p.stdout.readline() == b"up\n"
        procs.append(p)
    with in_netns(tb.client_ns):
        stray = socket.socket()              # a socket keeps the netns object alive
    pids = [pid for ns in tb.namespaces for pid in ns_pids(ns)]
    assert len(pids) == 2 * len(tb.namespaces)
    t0 = time.monotonic()
    tb.close(grace=0.3)
    assert time.monotonic() - t0 < 5
    for p in procs:
        assert p.wait(5) == -signal.SIGKILL     # TERM was ignored: KILL after the grace
    for pid in pids:
        assert not netns._is_alive(pid)
    assert not set(tb.namespaces) & set(netns.ns_list())
    assert not os.path.exists(record)
    tb.close()                                  # idempotent
    stray.close()
    assert tb.closed


def test_testbed_context_manager_cleans_up_on_error():
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    with pytest.raises(RuntimeError):
        with Testbed() as tb:
            netns.run_in(tb.server_ns, ["sleep", "600"])
            raise RuntimeError("test failed")
    assert not ns_exists(tb.server_ns) and not ns_exists(tb.client_ns)


def test_tag_collision_never_touches_the_other_testbed(testbed):
    with pytest.raises(netns.HarnessError):
        Testbed(tag=testbed.tag)
    assert ns_exists(testbed.server_ns) and ns_exists(testbed.client_ns)
    assert os.path.exists(os.path.join(netns.REGISTRY_DIR, f"{testbed.tag}.json"))
    call_in(testbed.server_ns, ["ip", "link", "show", testbed.client.server_dev])


def test_sweep_stale_after_sigkill():
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    script = textwrap.dedent(f"""
        import sys, subprocess, time
        sys.path.insert(0, {E2E_DIR!r})
        import netns
        tb = netns.Testbed()
        netns.run_in(tb.server_ns, ["sleep", "600"], start_new_session=True)
        print(tb.tag, flush=True)
        time.sleep(600)
    """)
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        tag = p.stdout.readline().strip()
        assert tag
        server_ns = f"ips-s-{tag}"
        wait_until(lambda: ns_pids(server_ns), what="sleep in the server ns")
        orphan = ns_pids(server_ns)
        assert server_ns not in netns.sweep_stale()   # owner alive: untouched
        assert ns_exists(server_ns)
        p.kill()
        p.wait()
        removed = netns.sweep_stale()
        assert set(removed) == {server_ns, f"ips-c-{tag}"}
        assert not ns_exists(server_ns)
        assert not any(netns._is_alive(pid) for pid in orphan)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        netns.sweep_stale()


INNER_CONFTEST = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("e2e_conftest", {conftest!r})
    mod = importlib.util.module_from_spec(spec)
    sys.modules["e2e_conftest"] = mod
    spec.loader.exec_module(mod)
    from e2e_conftest import *   # fixtures and hooks, as if this were tests/e2e
""")

INNER_TEST = textwrap.dedent("""
    import time
    import netns

    def test_hangs(testbed):
        p = netns.run_in(testbed.server_ns, ["sleep", "600"], start_new_session=True)
        with open({marker!r}, "w") as f:
            f.write(f"{{testbed.tag}} {{p.pid}}")
        time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_pytest_run_cleans_up(tmp_path, sig):
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    marker = tmp_path / "marker"
    test_file = tmp_path / "test_inner.py"
    (tmp_path / "conftest.py").write_text(
        INNER_CONFTEST.format(conftest=os.path.join(E2E_DIR, "conftest.py")))
    test_file.write_text(INNER_TEST.format(marker=str(marker)))
    p = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:randomly", str(test_file)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        wait_until(lambda: marker.exists() and marker.read_text(), timeout=20,
                   what="inner test to start")
        tag, pid = marker.read_text().split()
        assert ns_exists(f"ips-s-{tag}") and netns._is_alive(int(pid))
        p.send_signal(sig)
        out = p.communicate(timeout=30)[0].decode()
        assert "KeyboardInterrupt" in out or "Interrupted" in out, out
        assert not ns_exists(f"ips-s-{tag}") and not ns_exists(f"ips-c-{tag}"), out
        assert not netns._is_alive(int(pid))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        netns.sweep_stale()


# --------------------------------------------------------------------------- #
# IpserveProcess, driven by a stand-in for ipserve
# --------------------------------------------------------------------------- #

FAKE_CLI = textwrap.dedent("""
    # Stand-in for ipserve.cli: same flags, workers in their own sessions,
    # status written where the stand-in ctl finds it.
    import argparse, json, os, signal, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("app")
    p.add_argument("-w", "--workers", type=int, default=2)
    p.add_argument("-n", "--name")
    p.add_argument("--runtime-dir")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--hidden-worker", action="store_true")
    a = p.parse_args()
    print(f"fake master {os.getpid()} starting {a.app}", flush=True)
    if a.fail:
        print("boom: cannot load app", flush=True)
        sys.exit(3)
    workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                start_new_session=True) for _ in range(a.workers)]
    if a.hidden_worker:   # started but never reported in status
        subprocess.Popen(["sleep", "600"], start_new_session=True)
    path = os.path.join(a.runtime_dir, a.name + ".status")
    def write(state):
        st = {"name": a.name, "router": "nft", "bind": ["0.0.0.0:8000"],
              "master": {"pid": os.getpid()},
              "workers": [{"pid": w.pid, "slot": i, "generation": 1, "port": 9000 + i,
                           "state": state, "rss": 0, "connections": 0, "requests": 0,
                           "lag_ms": 0.0, "nice": 0} for i, w in enumerate(workers)]}
        with open(path + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(path + ".tmp", path)
    def term(*_):
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        os.unlink(path)
        print("fake master stopped", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    write("spawned")
    time.sleep(0.3)
    write("active")
    while True:
        time.sleep(1)
""")

FAKE_CTL = textwrap.dedent("""
    import argparse, os, sys
    p = argparse.ArgumentParser()
    p.add_argument("-n", "--name", required=True)
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("cmd")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    try:
        print(open(os.path.join(a.runtime_dir, a.name + ".status")).read())
    except FileNotFoundError:
        sys.exit("no master is listening")
""")


def _write_fakes(directory) -> None:
    (directory / "fake_ipserve_cli.py").write_text(FAKE_CLI)
    (directory / "fake_ipserve_ctl.py").write_text(FAKE_CTL)


@pytest.fixture
def fake_ipserve(ipserve, tmp_path):
    """The conftest `ipserve` factory, pointed at the stand-in modules."""
    _write_fakes(tmp_path)

    def start(args, **kw):
        return ipserve(args, pythonpath=[str(tmp_path)], server_module="fake_ipserve_cli",
                       ctl_module="fake_ipserve_ctl", **kw)

    return start


def test_ipserve_process_ready_status_stop(testbed, fake_ipserve):
    srv = fake_ipserve([netns.PROBE_APP, "-w", "4"])
    assert "-n" in srv.args and "--runtime-dir" in srv.args
    assert len(srv.runtime_dir) < 60
    st = srv.wait_ready(4, timeout=10)
    assert st["master"]["pid"] == srv.pid        # ip netns exec does not fork
    assert [w["state"] for w in st["workers"]] == ["active"] * 4
    assert netns.active_workers(st, generation=1) == st["workers"]
    workers = srv.seen_worker_pids
    assert len(workers) == 4 and all(netns.pid_in_ns(p, testbed.server_ns) for p in workers)
    assert srv.live_worker_pids() == workers
    assert srv.stop(timeout=10) == 0
    assert srv.live_worker_pids() == []
    assert "fake master stopped" in srv.log_text()


def test_ipserve_cleanup_kills_orphaned_workers(testbed, fake_ipserve):
    srv = fake_ipserve([netns.PROBE_APP, "-w", "2", "--hidden-worker"])
    srv.wait_ready(2, timeout=10)
    workers = srv.seen_worker_pids
    srv.kill_master()                              # workers outlive their master
    assert srv.live_worker_pids() == workers
    assert len(ns_pids(testbed.server_ns)) == 3    # 2 workers + the hidden one
    srv.cleanup()
    assert srv.live_worker_pids() == []
    assert not any(netns._is_alive(p) for p in workers)
    assert len(ns_pids(testbed.server_ns)) == 1    # cleanup() only kills what it saw
    srv.cleanup(kill_namespace=True)
    assert ns_pids(testbed.server_ns) == []


def test_ipserve_failure_message_has_log_tail(testbed, fake_ipserve):
    srv = fake_ipserve([netns.PROBE_APP, "--fail"])
    with pytest.raises(IpserveError) as info:
        srv.wait_ready(1, timeout=10)
    msg = str(info.value)
    assert "master exited" in msg and "boom: cannot load app" in msg
    assert srv.returncode == 3

    srv2 = fake_ipserve([netns.PROBE_APP, "-w", "2"])
    with pytest.raises(IpserveError, match="timed out .* 3 active workers"):
        srv2.wait_ready(3, timeout=1.5)


def test_ipserve_on_a_four_client_testbed(make_testbed, fake_ipserve):
    tb = make_testbed(n_clients=4)
    srv = fake_ipserve([netns.PROBE_APP, "-w", "2"], testbed=tb)
    assert srv.ns == tb.server_ns
    srv.wait_ready(2, timeout=10)
    assert all(netns.pid_in_ns(p, tb.server_ns) for p in srv.seen_worker_pids)


def test_ipserve_env_is_hermetic(testbed, fake_ipserve, monkeypatch):
    monkeypatch.setenv("IPSERVE_WORKERS", "64")
    srv = fake_ipserve([netns.PROBE_APP], env={"IPSERVE_LOG_LEVEL": "debug"})
    assert "IPSERVE_WORKERS" not in srv.env
    assert srv.env["IPSERVE_LOG_LEVEL"] == "debug"
    assert srv.env["PYTHONPATH"].split(os.pathsep)[1] == netns.REPO_ROOT
    srv.wait_ready(2, timeout=10)


# --------------------------------------------------------------------------- #
# The kernel features ipserve relies on, inside the testbed
# --------------------------------------------------------------------------- #

NFT_RULES = """
table inet ipstest {
    chain pre {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 8000 meta nfproto ipv4 redirect to : ip saddr & 0.0.0.3 map { 0.0.0.0 : 9100, 0.0.0.1 : 9101, 0.0.0.2 : 9102, 0.0.0.3 : 9103 }
        tcp dport 8000 meta nfproto ipv6 redirect to : ip6 saddr & ::3 map { :: : 9100, ::1 : 9101, ::2 : 9102, ::3 : 9103 }
    }
}
"""


def test_nat_redirect_by_low_bits_in_server_ns(testbed):
    """Smoke test of the mechanism (a REDIRECT map keyed on saddr low bits),
    done by hand with nft in the server namespace only."""
    if not shutil.which("nft"):
        pytest.skip("nft not installed")
    call_in(testbed.server_ns, ["nft", "-f", "-"], input=NFT_RULES)
    listeners = []
    with in_netns(testbed.server_ns):
        for i in range(4):
            listeners.append(socket.create_server(("::", 9100 + i), family=socket.AF_INET6,
                                                  dualstack_ipv6=True))
    try:
        for srcs, dst in ((testbed.client_ips, testbed.server_ip),
                          (testbed.client_ips6, testbed.server_ip6)):
            for i, src in enumerate(srcs):
                with tcp_connect(testbed.client_ns, src, dst, 8000, timeout=2) as s:
                    lst = listeners[i & 3]
                    lst.settimeout(2)
                    conn, addr = lst.accept()
                    conn.close()
                    assert addr[0].removeprefix("::ffff:") == src
                    assert s.getpeername()[1] == 8000   # the client never sees the port
    finally:
        for lst in listeners:
            lst.close()
    assert "ipstest" not in call_in(None, ["nft", "list", "tables"]).stdout


INNER_FAILING_TEST = textwrap.dedent("""
    def test_fails(ipserve):
        srv = ipserve(["app:application", "-w", "2"], pythonpath=[{fakes!r}],
                      server_module="fake_ipserve_cli", ctl_module="fake_ipserve_ctl")
        srv.wait_ready(2, timeout=10)
        with open({marker!r}, "w") as f:
            f.write(" ".join(map(str, [srv.pid, *srv.seen_worker_pids])))
        assert False, "deliberate failure"
""")


def test_failure_report_carries_ipserve_log(tmp_path):
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    _write_fakes(tmp_path)
    marker = tmp_path / "marker"
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text(
        INNER_CONFTEST.format(conftest=os.path.join(E2E_DIR, "conftest.py")))
    (inner / "test_inner_fail.py").write_text(
        INNER_FAILING_TEST.format(fakes=str(tmp_path), marker=str(marker)))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(inner)], cwd=inner, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "deliberate failure" in out
    assert "ipserve t" in out and "log (running" in out, out
    assert "fake master" in out and "starting app:application" in out, out
    pids = [int(p) for p in marker.read_text().split()]
    assert len(pids) == 3
    assert not any(netns._is_alive(p) for p in pids)
