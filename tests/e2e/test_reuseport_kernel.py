"""The reuseport backend against the real kernel, no ipserve master involved.

Every test runs in a network namespace of its own (created here, always
deleted), whose loopback holds 127/8 and a few IPv6 addresses added with
`nodad`. A client bound to source address S must land on the socket of slot
S & (slots - 1).
"""

import contextlib
import ctypes
import ctypes.util
import json
import os
import random
import resource
import secrets
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest
from conftest import NEEDS_ROOT

from ipserve.config import parse_bind
from ipserve.routing import RouterUnavailable
from ipserve.routing.reuseport import ReuseportRouter
from ipserve.routing.slots import slot_of

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IP = shutil.which("ip") or "/usr/sbin/ip"
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
NOBODY = ["--reuid=65534", "--regid=65534", "--clear-groups"]
CLONE_NEWNET = 0x40000000

V4_SOURCES = [f"127.0.0.{i}" for i in range(16, 32)]
V6_SERVER = "fd00:5e::1"
V6_SOURCES = [f"fd00:5e::{i:x}" for i in range(16, 32)]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=NEEDS_ROOT),
    pytest.mark.skipif(not os.path.exists(IP), reason="needs iproute2 (ip)"),
]


# ---------------------------------------------------------------- namespace plumbing

def sh(*argv: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip()}")


@pytest.fixture
def ns():
    name = f"ipsrp-{secrets.token_hex(4)}"
    sh(IP, "netns", "add", name)
    try:
        sh(IP, "-n", name, "link", "set", "lo", "up")
        for addr in [V6_SERVER, *V6_SOURCES]:
            sh(IP, "-n", name, "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
        yield name
    finally:
        subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=30)
        assert not os.path.exists(f"/run/netns/{name}"), f"namespace {name} left behind"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def in_netns(name: str):
    """Sockets made inside the block belong to namespace `name` (this thread moves)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)


def free_port() -> int:
    # Below the ephemeral range, so no client socket can be handed it.
    return random.randint(20000, 32000)


@pytest.fixture
def routers():
    made: list[ReuseportRouter] = []
    yield made
    for router in made:
        router.close()


def landed(router: ReuseportRouter, slots: int, dst: str, sources, bind_index: int = 0,
           accept_on=None) -> dict[str, int]:
    """Connect from every source and report which slot's socket received it.

    The slot sockets are duplicated first, as a worker receives them; the
    duplicates are closed afterwards, as a worker exiting does.
    """
    port = router.port
    socks = [socket.socket(fileno=os.dup(router.listener_fds(s)[bind_index])) for s in range(slots)]
    try:
        watched = socks if accept_on is None else [socks[s] for s in accept_on]
        out = {}
        for src in sources:
            family = socket.AF_INET6 if ":" in src else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.bind((src, 0))
                client.settimeout(5)
                client.connect((dst, port))
                ready, _, _ = select.select(watched, [], [], 5)
                assert len(ready) == 1, f"{src}: ready sockets {ready}"
                conn, peer = ready[0].accept()
                conn.close()
                assert peer[0] == src
                out[src] = socks.index(ready[0])
        return out
    finally:
        for sock in socks:
            sock.close()


def expected(sources, slots):
    return {src: slot_of(src, slots) for src in sources}


# ---------------------------------------------------------------- routing

@pytest.mark.parametrize("slots", [1, 2, 4, 8, 16])
def test_ipv4_sources_land_on_their_slot(ns, routers, slots):
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{free_port()}")], slots=slots)
        routers.append(router)
        router.check()
        router.prepare()
        assert landed(router, slots, "127.0.0.1", V4_SOURCES) == expected(V4_SOURCES, slots)


@pytest.mark.parametrize("slots", [4, 16])
def test_ipv6_sources_land_on_their_slot(ns, routers, slots):
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"[{V6_SERVER}]:{free_port()}")])
        routers.append(router)
        router.check()
        router.prepare(slots)
        assert landed(router, slots, V6_SERVER, V6_SOURCES) == expected(V6_SOURCES, slots)


def test_v4_and_v6_wildcard_binds_make_two_groups(ns, routers):
    port = free_port()
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"0.0.0.0:{port}"), parse_bind(f"[::]:{port}")])
        routers.append(router)
        router.check()
        router.prepare(4)
        fds = router.listener_fds(2)
        assert len(fds) == 2 and router.listener_fds(2)[0] == fds[0]
        assert landed(router, 4, "127.0.0.1", V4_SOURCES, 0) == expected(V4_SOURCES, 4)
        assert landed(router, 4, V6_SERVER, V6_SOURCES, 1) == expected(V6_SOURCES, 4)
        router.apply({0: port, 1: port, 2: port, 3: port})
        desc = router.describe()
    assert desc["router"] == "reuseport"
    assert [(s["slot"], s["address"]) for s in desc["sockets"]] == (
        [(i, f"0.0.0.0:{port}") for i in range(4)] + [(i, f"[::]:{port}") for i in range(4)])
    assert desc["sockets"][6]["fd"] == router.listener_fds(2)[1]
    assert desc["table"] == {"0": port, "1": port, "2": port, "3": port}


def test_handoff_is_who_accepts(ns, routers):
    """A worker closing its copy changes nothing; while a slot has no worker its
    clients wait in the slot's backlog, and the replacement accepts them."""
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{free_port()}")])
        routers.append(router)
        router.prepare(4)
        # Nobody accepts on slot 1: its clients still connect, and wait.
        waiting = []
        for src in ("127.0.0.17", "127.0.0.21"):
            client = socket.socket()
            client.bind((src, 0))
            client.settimeout(5)
            client.connect(("127.0.0.1", router.port))
            waiting.append(client)
        others = [s for s in V4_SOURCES if slot_of(s, 4) != 1]
        assert landed(router, 4, "127.0.0.1", others, accept_on=[0, 2, 3]) == expected(others, 4)
        replacement = socket.socket(fileno=os.dup(router.listener_fds(1)[0]))
        replacement.settimeout(5)
        peers = sorted(replacement.accept()[1][0] for _ in waiting)
        assert peers == ["127.0.0.17", "127.0.0.21"]
        replacement.close()
        for client in waiting:
            client.close()
        # Every copy of every socket has been closed and reopened: still in order.
        assert landed(router, 4, "127.0.0.1", V4_SOURCES) == expected(V4_SOURCES, 4)


def test_shutdown_by_a_worker_reshuffles_the_group(ns, routers):
    """Why a worker must close(), never shutdown(), its listener: shutdown()
    takes the shared socket out of the group although the master holds it,
    and the last socket takes its index."""
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{free_port()}")])
        routers.append(router)
        router.prepare(4)
        with socket.socket(fileno=os.dup(router.listener_fds(1)[0])) as worker_copy:
            worker_copy.shutdown(socket.SHUT_RDWR)
        got = landed(router, 4, "127.0.0.1", ["127.0.0.16", "127.0.0.17", "127.0.0.18"],
                     accept_on=[0, 2, 3])
    assert got == {"127.0.0.16": 0, "127.0.0.17": 3, "127.0.0.18": 2}


def test_a_new_router_can_adopt_the_group(ns, routers):
    with in_netns(ns):
        first = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{free_port()}")])
        first.prepare(4)
        copies = [[os.dup(first.listener_fds(slot)[0])] for slot in range(4)]
        second = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{first.port}")])
        routers.append(second)
        second.adopt(copies)
        first.close()
        second.check()   # holds the port itself now: no probe
        assert landed(second, 4, "127.0.0.1", V4_SOURCES) == expected(V4_SOURCES, 4)


# ---------------------------------------------------------------- errors

def test_address_in_use_is_refused_with_the_address(ns, routers):
    port = free_port()
    with in_netns(ns):
        # A listener of the same uid WITH SO_REUSEPORT would silently join the
        # group and shift every index: it must be refused as well.
        for reuse in (0, 1):
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, reuse)
            squatter.bind(("127.0.0.1", port))
            squatter.listen()
            router = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{port}")])
            with pytest.raises(RouterUnavailable, match=f"127.0.0.1:{port} is already in use"):
                router.check()
            with pytest.raises(RouterUnavailable, match=f"127.0.0.1:{port} is already in use"):
                router.prepare(4)
            assert not router.prepared
            squatter.close()
        # Our own open group counts too; after close() the port is free again.
        first = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{port}")])
        first.prepare(2)
        with pytest.raises(RouterUnavailable, match="in use"):
            ReuseportRouter("t", [parse_bind(f"127.0.0.1:{port}")]).check()
        first.close()
        again = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{port}")])
        routers.append(again)
        again.check()
        again.prepare(2)


def test_foreign_address_is_refused(ns):
    with in_netns(ns):
        router = ReuseportRouter("t", [parse_bind(f"[fd00:5e::99]:{free_port()}")])
        with pytest.raises(RouterUnavailable, match="fd00:5e::99 is not an address of this host"):
            router.check()


def run_in_ns(ns, code: str, rlimit=None, prefix=()) -> subprocess.CompletedProcess:
    def limit():
        if rlimit:
            resource.setrlimit(resource.RLIMIT_NOFILE, rlimit)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.run([IP, "netns", "exec", ns, *prefix, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60, env=env, preexec_fn=limit)


FD_PROBE = textwrap.dedent("""
    from ipserve.config import parse_bind
    from ipserve.routing import RouterUnavailable
    from ipserve.routing.reuseport import ReuseportRouter
    r = ReuseportRouter("t", [parse_bind("127.0.0.1:{port}")])
    try:
        r.prepare({slots})
        print("ok", len(r.describe()["sockets"]))
    except RouterUnavailable as exc:
        print("unavailable:", exc)
""")


def test_slot_count_beyond_the_fd_limit(ns):
    # The hard limit forbids it: one clear line, nothing half-opened.
    proc = run_in_ns(ns, FD_PROBE.format(port=free_port(), slots=256), rlimit=(100, 100))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unavailable: 256 slots"), lines
    assert "hard limit is 100" in lines[0]
    # Only the soft limit is low: it is raised up to the hard limit.
    proc = run_in_ns(ns, FD_PROBE.format(port=free_port(), slots=256), rlimit=(100, 4096))
    assert proc.stdout.strip() == "ok 256", proc.stdout + proc.stderr


# ---------------------------------------------------------------- without privilege

UNPRIVILEGED = textwrap.dedent("""
    import json, os, select, socket, sys
    from ipserve.config import parse_bind
    from ipserve.routing import RouterUnavailable
    from ipserve.routing.reuseport import ReuseportRouter
    port = int(sys.argv[1])
    caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff:")][0]
    r = ReuseportRouter("t", [parse_bind(f"127.0.0.1:{port}")], slots=4)
    r.check()
    r.prepare()
    socks = [socket.socket(fileno=r.listener_fds(s)[0]) for s in range(4)]
    landed = {}
    for i in range(16, 32):
        c = socket.socket()
        c.bind((f"127.0.0.{i}", 0))
        c.connect(("127.0.0.1", port))
        ready, _, _ = select.select(socks, [], [], 5)
        conn, peer = ready[0].accept()
        landed[peer[0]] = socks.index(ready[0])
        conn.close()
        c.close()
    try:
        ReuseportRouter("t", [parse_bind("127.0.0.1:80")]).check()
        low = None
    except RouterUnavailable as exc:
        low = str(exc)
    print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "capeff": caps,
                      "python": sys.version.split()[0], "landed": landed, "port80": low}))
""")


def python_for_nobody() -> tuple[str | None, list[str]]:
    """A Python that uid 65534 can really run, and why others were passed over.

    /root is 0700 here, so the pyenv interpreter is not nobody's: setpriv still
    execs it (it keeps root's capabilities until execve), but the loader then
    cannot read pyenv's libpython and silently falls back to the system one —
    a different Python with prefix /usr. Compare the prefix, not the exit code.
    """
    notes = []
    for candidate in (sys.executable, "/usr/bin/python3"):
        if not os.path.exists(candidate):
            continue
        proc = subprocess.run([SETPRIV, *NOBODY, candidate, "-c",
                               "import sys, json; print(json.dumps([sys.prefix, sys.version]))"],
                              capture_output=True, text=True, timeout=30, cwd="/")
        if proc.returncode != 0:
            notes.append(f"{candidate}: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
            continue
        prefix, version = json.loads(proc.stdout)
        if candidate == sys.executable and prefix != sys.prefix:
            notes.append(f"{candidate}: as nobody it runs Python {version.split()[0]} "
                         f"from {prefix} (pyenv's files are unreadable)")
            continue
        return candidate, notes
    return None, notes


def test_unprivileged_user_can_route(ns):
    if not os.path.exists(SETPRIV):
        pytest.skip("needs setpriv (util-linux)")
    python, notes = python_for_nobody()
    if python is None:
        pytest.skip("no Python that uid 65534 can run: " + "; ".join(notes))
    tmp = tempfile.mkdtemp(prefix="ipsrp-")
    try:
        os.chmod(tmp, 0o755)
        script = os.path.join(tmp, "unprivileged.py")
        with open(script, "w") as fh:
            fh.write(UNPRIVILEGED)
        os.chmod(script, 0o644)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": REPO_ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([IP, "netns", "exec", ns, SETPRIV, *NOBODY, python, "-B", script,
                               str(free_port())], capture_output=True, text=True, timeout=60,
                              env=env, cwd="/")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["uid"] == result["euid"] == 65534
    assert int(result["capeff"], 16) == 0
    assert result["landed"] == expected(V4_SOURCES, 4)
    assert "use a port of 1024 or above, or grant CAP_NET_BIND_SERVICE" in result["port80"]
    assert "\n" not in result["port80"]
    print(f"unprivileged run used {python} (Python {result['python']}); passed over: {notes}")
