"""End-to-end test helpers: network namespaces, namespaced sockets, ipserve processes.

No pytest in here: bench/ imports this module too (``sys.path.insert(0, repo)``,
then ``from tests.e2e import netns``).

Topology (one veth pair and one /24 + /64 per client namespace k)::

    server ns  ips-s-<hex>                    client ns  ips-c-<hex> (k=0)
      vs<k>-<hex>  198.18.k.1/24    <-veth->     vc<k>-<hex>  198.18.k.16 .. 198.18.k.31
                   fd00:1e:5e:k::1/64                         fd00:1e:5e:k::10 .. ::1f

198.18.0.0/15 is the RFC 2544 benchmark range; nothing leaves the namespaces
(the root namespace gets no address and no route for it). The low 4 bits of
the 16 client addresses are 0..15, so they cover every slot of up to 16 workers.

Everything a Testbed creates is recorded in /run/ipserve-tests/<hex>.json with
the owning pid; `sweep_stale()` removes what a killed test run left behind,
touching only records whose owner is dead.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import http.client
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE_APP_PATH = os.path.join(REPO_ROOT, "tests", "apps", "probe.py")
PROBE_APP = PROBE_APP_PATH + ":application"          # path form, immune to sys.path
PROBE_MODULE = "tests.apps.probe:application"         # module form (repo root on sys.path)

NETNS_DIR = "/run/netns"
REGISTRY_DIR = "/run/ipserve-tests"
IP = shutil.which("ip") or "/usr/sbin/ip"

CLONE_NEWNET = 0x40000000
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

SERVER_IFINDEX = 100            # + client index: server ends of the veths
CLIENT_IFINDEX = 200            # client end, in each client namespace
PROBE_PORT = 9                  # discard: closed, used by Testbed.wait_links()

N_CLIENT_ADDRS = 16
FIRST_CLIENT_HOST = 16          # 198.18.k.16 .. 198.18.k.31 / fd00:1e:5e:k::10 .. ::1f


class HarnessError(RuntimeError):
    pass


# --------------------------------------------------------------------------- #
# Small process utilities
# --------------------------------------------------------------------------- #

def sh(argv: Sequence[str], *, input: str | None = None, check: bool = True,
       timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command in the current namespace, capturing text output."""
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/pid/stat (start time in clock ticks): pid + this = identity."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return int(data[data.rindex(b")") + 2:].split()[19])


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        return None


def _pidfd_exited(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def _pidfd_signal(fd: int, sig: int) -> bool:
    try:
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False


def _wait_pidfds(fds: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pidfd reports exit or timeout; returns the ones still alive."""
    pending = list(fds)
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, _, _ = select.select(pending, [], [], min(left, 0.05))
        pending = [fd for fd in pending if fd not in done]
    return pending


def _is_alive(pid: int, start_time: int | None = None) -> bool:
    st = _proc_start_time(pid)
    if st is None:
        return False
    if start_time is not None and st != start_time:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except OSError:
        return False


# --------------------------------------------------------------------------- #
# Namespaces: identity, pids, kill, delete
# --------------------------------------------------------------------------- #

def ns_path(ns: str) -> str:
    return os.path.join(NETNS_DIR, ns)


def ns_exists(ns: str) -> bool:
    return os.path.exists(ns_path(ns))


def ns_list() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def _ns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def ns_pids(ns: str) -> list[int]:
    """Pids whose network namespace is `ns` (what `ip netns pids` prints).

    Never includes this process itself (a thread inside `in_netns` would
    otherwise make the test runner list, and kill, itself).
    """
    ident = _ns_id(ns_path(ns))
    if ident is None:
        return []
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        if _ns_id(f"/proc/{pid}/ns/net") == ident:
            pids.append(pid)
    return sorted(pids)


def pid_in_ns(pid: int, ns: str | None) -> bool:
    """Whether `pid` lives in namespace `ns` (None: this process's own, as for
    a LoopbackBed's ipserve)."""
    ident = _ns_id("/proc/self/ns/net" if ns is None else ns_path(ns))
    return ident is not None and _ns_id(f"/proc/{pid}/ns/net") == ident


def kill_ns_processes(ns: str, grace: float = 1.0, timeout: float = 10.0) -> list[int]:
    """SIGTERM everything in `ns`, SIGKILL what is left after `grace` seconds.

    Uses pidfds, and re-checks the namespace after opening each one, so a
    recycled pid outside the namespace can never be hit. Loops until the
    namespace is empty (processes may fork while dying). Returns the pids
    signalled; raises HarnessError if something survives `timeout`.
    """
    signalled: list[int] = []
    ident = _ns_id(ns_path(ns))
    if ident is None:
        return signalled
    deadline = time.monotonic() + timeout
    first = True
    while True:
        fds = {}
        for pid in ns_pids(ns):
            fd = _pidfd(pid)
            if fd is None:
                continue
            if _ns_id(f"/proc/{pid}/ns/net") != ident:   # exited and reused meanwhile
                os.close(fd)
                continue
            fds[pid] = fd
        if not fds:
            return signalled
        try:
            signalled.extend(p for p in fds if p not in signalled)
            if first and grace > 0:
                for fd in fds.values():
                    _pidfd_signal(fd, signal.SIGTERM)
                alive = _wait_pidfds(fds.values(), grace)
            else:
                alive = list(fds.values())
            for fd in alive:
                _pidfd_signal(fd, signal.SIGKILL)
            _wait_pidfds(alive, 2.0)
        finally:
            for fd in fds.values():
                os.close(fd)
        first = False
        if time.monotonic() > deadline:
            left = ns_pids(ns)
            if left:
                raise HarnessError(f"processes survive SIGKILL in {ns}: {left}")
            return signalled


def delete_ns(ns: str) -> None:
    if ns_exists(ns):
        proc = sh([IP, "netns", "del", ns], check=False)
        if proc.returncode != 0 and ns_exists(ns):
            raise HarnessError(f"ip netns del {ns}: {proc.stderr.strip()}")


# --------------------------------------------------------------------------- #
# Running code in a namespace
# --------------------------------------------------------------------------- #

def netns_argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    argv = [str(a) for a in argv]
    return argv if ns is None else [IP, "netns", "exec", ns, *argv]


def run_in(ns: str | None, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Start `argv` inside namespace `ns` (``ip netns exec``). Returns the Popen.

    ``ip netns exec`` execs the command (no fork), so ``popen.pid`` is the
    command's own pid. It also gives the command its own mount namespace with
    /sys remounted for `ns`; /tmp, /run etc. are shared.
    """
    return subprocess.Popen(netns_argv(ns, argv), **popen_kwargs)


def call_in(ns: str | None, argv: Sequence[str], *, check: bool = True,
            timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `argv` inside `ns` to completion, capturing text output."""
    return sh(netns_argv(ns, argv), check=check, timeout=timeout, input=input)


_libc = None


def _setns(fd: int, nstype: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
        _libc.setns.restype = ctypes.c_int
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def current_netns_id() -> tuple[int, int]:
    """(dev, inode) of the calling THREAD's network namespace."""
    return _ns_id("/proc/thread-self/ns/net")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Move the calling thread into network namespace `ns` for the block.

    Sockets created inside the block belong to `ns` for their whole life,
    also after the block ends. Only this thread moves (threads started inside
    the block inherit `ns`). Note: /proc/self/net and /proc/net describe the
    thread-group leader, not this thread; use /proc/thread-self/net.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(ns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, CLONE_NEWNET)
        finally:
            os.close(target)
        try:
            yield
        finally:
            # If this fails the thread is stranded in `ns`: nothing can be trusted.
            _setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


# --------------------------------------------------------------------------- #
# Client sockets
# --------------------------------------------------------------------------- #

def _family(addr: str) -> int:
    return socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET


def _host_in_url(addr: str) -> str:
    return f"[{addr}]" if ":" in addr else addr


def make_socket(ns: str | None, src_ip: str | None, family: int) -> socket.socket:
    """A TCP socket created in `ns` (None: the caller's namespace), bound to src_ip."""
    ctx = in_netns(ns) if ns is not None else contextlib.nullcontext()
    with ctx:
        sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if src_ip is not None:
            # Pick the source port at connect() time, by 4-tuple: many more
            # connections per source address than bind(port 0) allows.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((src_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def tcp_connect(ns: str | None, src_ip: str | None, dst_ip: str, port: int,
                timeout: float | None = 5) -> socket.socket:
    """A connected TCP socket from src_ip (in ns) to dst_ip:port."""
    sock = make_socket(ns, src_ip, _family(dst_ip))
    try:
        sock.settimeout(timeout)
        sock.connect((dst_ip, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


class NsHTTPConnection(http.client.HTTPConnection):
    """http.client over a socket made in a namespace with a fixed source address."""

    def __init__(self, ns: str | None, src_ip: str | None, dst_ip: str, port: int,
                 timeout: float | None = 5, auto_reconnect: bool = False):
        super().__init__(dst_ip, port, timeout=timeout)
        self.ns, self.src_ip, self.dst_ip, self.dst_port = ns, src_ip, dst_ip, port
        self.auto_reconnect = auto_reconnect
        self.connects = 0

    def connect(self) -> None:
        if self.connects and not self.auto_reconnect:
            raise ConnectionError("keep-alive connection was closed by the server "
                                  "(auto_reconnect=False)")
        self.sock = tcp_connect(self.ns, self.src_ip, self.dst_ip, self.dst_port, self.timeout)
        self.connects += 1


def _headers(resp: http.client.HTTPResponse) -> dict[str, str]:
    """Header names lower-cased; repeated headers joined with ', '."""
    out: dict[str, str] = {}
    for key, value in resp.getheaders():
        key = key.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def http_get(ns: str | None, src_ip: str | None, dst_ip: str, port: int, path: str = "/",
             timeout: float = 5, headers: dict | None = None,
             method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 request with ``Connection: close``. Returns (status, headers, body);
    header names are lower-case."""
    conn = NsHTTPConnection(ns, src_ip, dst_ip, port, timeout=timeout)
    try:
        hdrs = {"Connection": "close", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, _headers(resp), data
    finally:
        conn.close()


def http_json(ns: str | None, src_ip: str | None, dst_ip: str, port: int, path: str = "/",
              timeout: float = 5) -> dict:
    status, _, body = http_get(ns, src_ip, dst_ip, port, path, timeout=timeout)
    if status != 200:
        raise HarnessError(f"GET {path} from {src_ip}: HTTP {status}: {body[:200]!r}")
    return json.loads(body)


class Bg(threading.Thread):
    """Run fn() in a thread; value() returns its result or raises its error."""

    def __init__(self, fn: Callable[[], object]):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:        # noqa: BLE001 - re-raised by value()
            self.error = exc

    def value(self, timeout: float = 30):
        self.join(timeout)
        if self.is_alive():
            raise HarnessError(f"background work did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


class HttpClient:
    """Several HTTP/1.1 requests on ONE keep-alive connection.

    The connection is opened in __init__. If the server closes it, the next
    request raises ConnectionError unless auto_reconnect=True (then
    `.connects` counts the TCP connections used).
    """

    def __init__(self, ns: str | None, src_ip: str | None, dst_ip: str, port: int,
                 timeout: float = 5, auto_reconnect: bool = False):
        self.conn = NsHTTPConnection(ns, src_ip, dst_ip, port, timeout=timeout,
                                     auto_reconnect=auto_reconnect)
        self.conn.connect()

    @property
    def sock(self) -> socket.socket | None:
        return self.conn.sock

    @property
    def connects(self) -> int:
        return self.conn.connects

    @property
    def local_address(self) -> tuple:
        return self.conn.sock.getsockname()

    def request(self, path: str = "/", method: str = "GET", headers: dict | None = None,
                body: bytes | None = None) -> tuple[int, dict, bytes]:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        return resp.status, _headers(resp), data

    def get(self, path: str = "/") -> tuple[int, dict, bytes]:
        return self.request(path)

    def json(self, path: str = "/") -> dict:
        status, _, body = self.request(path)
        if status != 200:
            raise HarnessError(f"GET {path}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "HttpClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ws_connect(ns: str | None, src_ip: str | None, dst_ip: str, port: int, path: str = "/ws",
               timeout: float = 5, **kwargs):
    """A websocket-client WebSocket whose socket was made in `ns` from src_ip."""
    import websocket  # websocket-client

    sock = tcp_connect(ns, src_ip, dst_ip, port, timeout)
    url = f"ws://{_host_in_url(dst_ip)}:{port}{path}"
    try:
        return websocket.create_connection(url, socket=sock, timeout=timeout, **kwargs)
    except BaseException:
        sock.close()
        raise


def ws_ending(ws, timeout: float = 10) -> str:
    """Read a WebSocket until the server ends it: "close <code>" for a close
    frame, "cut" for a connection closed or reset without one."""
    import websocket

    ws.settimeout(timeout)
    while True:
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return "cut"
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data or b""
            return f"close {int.from_bytes(data[:2], 'big')}" if len(data) >= 2 else "close"


# --------------------------------------------------------------------------- #
# Registry of what we created (for sweeping up after a killed run)
# --------------------------------------------------------------------------- #

def _registry_claim(tag: str) -> bool:
    """Create the tag's record exclusively: whoever creates it owns every
    ``ips-*-<tag>`` namespace, so a sweep can never hit another run's."""
    os.makedirs(REGISTRY_DIR, exist_ok=True)
    try:
        fd = os.open(os.path.join(REGISTRY_DIR, f"{tag}.json"),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _registry_write(tag: str, namespaces: list[str], paths: list[str]) -> None:
    os.makedirs(REGISTRY_DIR, exist_ok=True)
    record = {"owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid()),
              "namespaces": namespaces, "paths": paths, "created": time.time()}
    tmp = os.path.join(REGISTRY_DIR, f".{tag}.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, os.path.join(REGISTRY_DIR, f"{tag}.json"))


def _registry_remove(tag: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(REGISTRY_DIR, f"{tag}.json"))


def sweep_stale() -> list[str]:
    """Remove namespaces/paths recorded by test runs whose process is gone.

    Only records under REGISTRY_DIR are considered, and only those whose
    owner (pid + start time) no longer exists. Returns the namespaces removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(REGISTRY_DIR)
    except FileNotFoundError:
        return removed
    for fname in names:
        if not fname.endswith(".json"):
            continue
        path = os.path.join(REGISTRY_DIR, fname)
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            # Claimed but not yet written (or torn): leave young ones alone.
            with contextlib.suppress(OSError):
                if time.time() - os.stat(path).st_mtime > 60:
                    os.unlink(path)
            continue
        if _is_alive(rec.get("owner_pid", -1), rec.get("owner_start")):
            continue
        for ns in rec.get("namespaces", []):
            if ns_exists(ns):
                with contextlib.suppress(HarnessError):
                    kill_ns_processes(ns, grace=0.2)
                with contextlib.suppress(HarnessError):
                    delete_ns(ns)
                removed.append(ns)
        for p in rec.get("paths", []):
            shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return removed


# --------------------------------------------------------------------------- #
# Testbed
# --------------------------------------------------------------------------- #

def _v6(subnet: int, host: int) -> str:
    """fd00:1e:5e:<subnet>::<host> in canonical (compressed) form, as the kernel
    and REMOTE_ADDR print it: fd00:1e:5e::10, not fd00:1e:5e:0::10."""
    return str(ipaddress.IPv6Address(f"fd00:1e:5e:{subnet:x}::{host:x}"))


@dataclass
class ClientNs:
    """One client namespace and the server addresses on its link."""
    index: int
    ns: str
    ips: list[str]
    ips6: list[str]
    server_ip: str
    server_ip6: str
    server_dev: str
    dev: str


_LIVE: "set[Testbed]" = set()        # strong refs: a dropped Testbed is still closed at exit


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while cleaning up; re-deliver them afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old[sig] = signal.getsignal(sig)
        signal.signal(sig, lambda s, f: got.append(s))
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in got:
            os.kill(os.getpid(), sig)


class Testbed:
    """A server namespace and `n_clients` client namespaces joined by veth pairs.

    Attributes: server_ns, clients (list[ClientNs]); for client 0 also
    client_ns, client_ips, client_ips6, server_ip, server_ip6. All namespaces
    and every process in them are removed by close() (idempotent; also called
    from __exit__, at interpreter exit, and by sweep_stale() after a killed run).
    """

    __test__ = False   # not a pytest test class

    def __init__(self, n_clients: int = 1, n_addrs: int = N_CLIENT_ADDRS,
                 tag: str | None = None):
        if not 1 <= n_clients <= 200:
            raise ValueError("n_clients must be 1..200")
        if not 1 <= n_addrs <= 200:
            raise ValueError("n_addrs must be 1..200")
        self.tag = self._claim_tag(tag)
        self.server_ns = f"ips-s-{self.tag}"
        self.clients: list[ClientNs] = []
        for k in range(n_clients):
            ns = f"ips-c-{self.tag}" if k == 0 else f"ips-c{k}-{self.tag}"
            self.clients.append(ClientNs(
                index=k, ns=ns,
                ips=[f"198.18.{k}.{FIRST_CLIENT_HOST + i}" for i in range(n_addrs)],
                ips6=[_v6(k, FIRST_CLIENT_HOST + i) for i in range(n_addrs)],
                server_ip=f"198.18.{k}.1", server_ip6=_v6(k, 1),
                server_dev=f"vs{k}-{self.tag}", dev=f"vc{k}-{self.tag}"))
        self.namespaces = [self.server_ns] + [c.ns for c in self.clients]
        self._paths: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []        # only these are ever deleted
        self._closed = False
        self._lock = threading.Lock()
        for name in [c.dev for c in self.clients]:
            assert len(name) <= 15, name
        _LIVE.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # -- convenience for the first client namespace --
    @property
    def client(self) -> ClientNs:
        return self.clients[0]

    @property
    def client_ns(self) -> str:
        return self.clients[0].ns

    @property
    def client_ips(self) -> list[str]:
        return self.clients[0].ips

    @property
    def client_ips6(self) -> list[str]:
        return self.clients[0].ips6

    @property
    def server_ip(self) -> str:
        return self.clients[0].server_ip

    @property
    def server_ip6(self) -> str:
        return self.clients[0].server_ip6

    @property
    def server_ips(self) -> list[str]:
        return [c.server_ip for c in self.clients]

    @property
    def server_ips6(self) -> list[str]:
        return [c.server_ip6 for c in self.clients]

    @staticmethod
    def _claim_tag(tag: str | None) -> str:
        for _ in range(100):
            candidate = tag or secrets.token_hex(3)
            if any(n.endswith("-" + candidate) for n in ns_list()):
                if tag:
                    raise HarnessError(f"namespaces with tag {tag} already exist")
                continue
            if _registry_claim(candidate):
                return candidate
            if tag:
                raise HarnessError(f"testbed tag {tag} is taken")
        raise HarnessError("could not find a free testbed tag")

    def _record(self) -> None:
        _registry_write(self.tag, self.namespaces, self._paths)

    def _create(self) -> None:
        self._record()                       # before creating: a crash leaves a record
        for ns in self.namespaces:
            sh([IP, "netns", "add", ns])     # fails if it exists: never adopt a foreign one
            self._created.append(ns)
        server_cmds = ["link set lo up"]
        for c in self.clients:
            # Created directly inside the namespaces: never visible in the root one.
            # Explicit, different ifindexes: in fresh namespaces both ends would
            # get ifindex 2, the kernel's linkwatch then sees iflink == ifindex,
            # treats the carrier-up event as non-urgent and delays it up to 1 s,
            # and until then IPv6 on the end that came up first drops packets
            # (the first IPv6 SYN is lost: a 1 s connect). IPv4 is unaffected.
            sh([IP, "link", "add", c.server_dev, "index", str(SERVER_IFINDEX + c.index),
                "netns", self.server_ns, "type", "veth",
                "peer", "name", c.dev, "index", str(CLIENT_IFINDEX), "netns", c.ns])
            server_cmds += [
                f"addr add {c.server_ip}/24 dev {c.server_dev}",
                f"addr add {c.server_ip6}/64 dev {c.server_dev} nodad",
                f"link set {c.server_dev} up",
            ]
            client_cmds = ["link set lo up"]
            client_cmds += [f"addr add {ip}/24 dev {c.dev}" for ip in c.ips]
            client_cmds += [f"addr add {ip}/64 dev {c.dev} nodad" for ip in c.ips6]
            client_cmds.append(f"link set {c.dev} up")
            sh([IP, "-n", c.ns, "-batch", "-"], input="\n".join(client_cmds) + "\n")
        sh([IP, "-n", self.server_ns, "-batch", "-"], input="\n".join(server_cmds) + "\n")
        self.wait_links()

    def wait_links(self, timeout: float = 5.0) -> None:
        """Check every link both ways, IPv4 and IPv6: a SYN from the first client
        address to a closed server port must come back as a RST (refused)."""
        deadline = time.monotonic() + timeout
        for c in self.clients:
            for src, dst in ((c.ips[0], c.server_ip), (c.ips6[0], c.server_ip6)):
                while True:
                    try:
                        tcp_connect(c.ns, src, dst, PROBE_PORT, timeout=0.25).close()
                        raise HarnessError(f"something listens on {dst}:{PROBE_PORT}")
                    except ConnectionRefusedError:
                        break
                    except OSError as exc:
                        if time.monotonic() > deadline:
                            raise HarnessError(f"no path {src} -> {dst} in {c.ns}: {exc}")

    # -- running things --
    def run_in(self, ns: str, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Like module-level run_in(), but the Popen is reaped by close()."""
        proc = run_in(ns, argv, **popen_kwargs)
        self._procs.append(proc)
        return proc

    def call_in(self, ns: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return call_in(ns, argv, **kwargs)

    def pids(self) -> dict[str, list[int]]:
        return {ns: ns_pids(ns) for ns in self.namespaces}

    def add_path(self, path: str) -> None:
        """Remove `path` in close() (and in a later sweep if this run is killed)."""
        self._paths.append(path)
        self._record()

    def http_get(self, src_ip: str, path: str = "/", port: int = 8000, **kw):
        """http_get from the client namespace that owns src_ip to its server address."""
        c = self.client_for(src_ip)
        dst = c.server_ip6 if ":" in src_ip else c.server_ip
        return http_get(c.ns, src_ip, dst, port, path, **kw)

    def client_for(self, src_ip: str) -> ClientNs:
        for c in self.clients:
            if src_ip in c.ips or src_ip in c.ips6:
                return c
        raise KeyError(src_ip)

    # -- teardown --
    def close(self, grace: float = 0.5) -> None:
        """Kill every process in every namespace (TERM, then KILL after `grace`),
        delete the veths and the namespaces. Idempotent; tries every step and
        raises the first error at the end."""
        with self._lock, _deferred_interrupts():
            if self._closed:
                return
            errors: list[BaseException] = []
            for proc in self._procs:            # our children: signal them via Popen
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.terminate()
            for ns in self._created:
                try:
                    kill_ns_processes(ns, grace=grace)
                except Exception as exc:        # noqa: BLE001
                    errors.append(exc)
            for proc in self._procs:
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for c in self.clients:
                # Explicitly, so the link goes away even if a stray socket keeps
                # the namespace object alive after its name is deleted.
                if self.server_ns in self._created and ns_exists(self.server_ns):
                    call_in(None, [IP, "-n", self.server_ns, "link", "del", c.server_dev],
                            check=False)
            for ns in self._created:
                try:
                    delete_ns(ns)
                except Exception as exc:        # noqa: BLE001
                    errors.append(exc)
            for p in self._paths:
                shutil.rmtree(p, ignore_errors=True)
            if not errors:
                _registry_remove(self.tag)
                self._closed = True
                _LIVE.discard(self)
            if errors:
                raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Testbed {self.server_ns} clients={[c.ns for c in self.clients]}>"


@atexit.register
def _close_live_testbeds() -> None:
    for tb in list(_LIVE):
        with contextlib.suppress(Exception):
            tb.close()


LOOPBACK_SERVER = "127.0.0.1"
LOOPBACK_SOURCES = [f"127.0.0.{16 + i}" for i in range(N_CLIENT_ADDRS)]   # low 4 bits 0..15


class LoopbackBed:
    """A Testbed stand-in that needs no privilege: no namespace at all.

    ipserve runs in the caller's own network namespace on 127.0.0.1, and
    clients connect from LOOPBACK_SOURCES: the whole of 127.0.0.0/8 is local
    on `lo`, so any user may bind a socket to any of them, and they pin to
    slots exactly as 198.18.k.16..31 do in a Testbed. Only what writes no
    kernel rule can be tested so (the reuseport router). close() removes the
    paths given to add_path(); processes are stopped by IpserveProcess.cleanup(),
    by pidfd, never by namespace.
    """

    __test__ = False
    server_ns = None
    server_ip = LOOPBACK_SERVER
    client_ns = None
    client_ips = LOOPBACK_SOURCES

    def __init__(self) -> None:
        self._paths: list[str] = []
        self.closed = False

    def add_path(self, path: str) -> None:
        self._paths.append(path)

    def close(self) -> None:
        for path in self._paths:
            shutil.rmtree(path, ignore_errors=True)
        self.closed = True

    def __enter__(self) -> LoopbackBed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- #
# ipserve processes
# --------------------------------------------------------------------------- #

class IpserveError(HarnessError):
    pass


def _tail(path: str, lines: int = 60) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(data.splitlines()[-lines:])


def unique_name(prefix: str = "t") -> str:
    """An instance name valid for ipserve (also as nft table / iptables chain)."""
    return f"{prefix}{secrets.token_hex(4)}"


SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"


def _primary_gid(uid: int) -> int:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def setpriv_argv(uid: int | None, ambient_caps: Sequence[str] = ()) -> list[str]:
    """A command prefix that runs as `uid` (its primary group, no supplementary
    groups, no capabilities); [] for None. setpriv execs: the pid is kept.
    `ambient_caps` (e.g. ("net_admin",)) are kept as ambient capabilities, as
    systemd's AmbientCapabilities= grants them to a unit's unprivileged User=."""
    if uid is None:
        return []
    caps = ",".join(f"+{cap}" for cap in ambient_caps)
    keep = [f"--inh-caps={caps}", f"--ambient-caps={caps}"] if ambient_caps else []
    return [SETPRIV, f"--reuid={uid}", f"--regid={_primary_gid(uid)}", "--clear-groups", *keep]


def _has_opt(args: Sequence[str], *flags: str) -> bool:
    return any(a in flags or any(a.startswith(f + "=") for f in flags if f.startswith("--"))
               for a in args)


def _opt_value(args: Sequence[str], *flags: str) -> str | None:
    args = list(args)
    for i, a in enumerate(args):
        if a in flags and i + 1 < len(args):
            return args[i + 1]
        for f in flags:
            if f.startswith("--") and a.startswith(f + "="):
                return a.split("=", 1)[1]
    return None


@dataclass
class _Seen:
    pid: int
    fd: int | None
    info: dict = field(default_factory=dict)


class IpserveProcess:
    """An ipserve master started in the testbed's server namespace.

    Cleanup kills the master, then every worker pid ever seen in `status()`
    (workers are in their own session, not children of the master; they are
    signalled through pidfds opened when first seen, and only if they live in
    the server namespace), then optionally everything left in the namespace.
    """

    server_module = "ipserve.cli"
    ctl_module = "ipserve.ctl"

    def __init__(self, testbed: Testbed, args: Sequence[str], env: dict | None = None, *,
                 name: str | None = None, runtime_dir: str | None = None,
                 log_path: str | None = None, cwd: str | None = None,
                 pythonpath: Sequence[str] = (), server_module: str | None = None,
                 ctl_module: str | None = None, run_as: int | None = None,
                 ambient_caps: Sequence[str] = ()):
        self.testbed = testbed
        self.ns = testbed.server_ns
        args = [str(a) for a in args]
        if server_module:
            self.server_module = server_module
        if ctl_module:
            self.ctl_module = ctl_module
        self.workdir = tempfile.mkdtemp(prefix="ips-")     # short: AF_UNIX paths <= 107
        testbed.add_path(self.workdir)
        given_name = _opt_value(args, "-n", "--name")
        given_rt = _opt_value(args, "--runtime-dir")
        self.name = given_name or name or unique_name()
        self.runtime_dir = given_rt or runtime_dir or os.path.join(self.workdir, "run")
        os.makedirs(self.runtime_dir, exist_ok=True)
        if not given_name:
            args += ["-n", self.name]
        if not given_rt:
            args += ["--runtime-dir", self.runtime_dir]
        self.args = args
        self.log_path = log_path or os.path.join(self.workdir, "ipserve.log")
        self.cwd = cwd or REPO_ROOT
        self.env = self._make_env(env, pythonpath)
        self._seen: dict[int, _Seen] = {}
        self.last_status: dict | None = None
        self._last_ctl_error = ""
        self._cleaned = False
        self._log = open(self.log_path, "ab")
        self.run_as = run_as
        if run_as is not None:
            # setpriv drops every capability with the uid; the runtime
            # directory must belong to that user (0700 workdir: let it through).
            gid = _primary_gid(run_as)
            os.chmod(self.workdir, 0o755)
            if not given_rt:
                os.chown(self.runtime_dir, run_as, gid)
        self.argv = [*setpriv_argv(run_as, ambient_caps), sys.executable, "-m", self.server_module,
                     *self.args]
        self._log.write(f"# ip netns exec {self.ns} {' '.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            self.proc = run_in(self.ns, self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env,
                               start_new_session=True)
        except BaseException:
            self._log.close()
            raise

    @staticmethod
    def _make_env(extra: dict | None, pythonpath: Sequence[str]) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("IPSERVE_")}
        paths = [*pythonpath, REPO_ROOT]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("PYTEST_CURRENT_TEST", None)
        for k, v in (extra or {}).items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    # -- introspection --
    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def own_lines(self) -> list[str]:
        """ipserve's own output lines (not the '# ip netns exec' header written here)."""
        return [line for line in self.log_text().splitlines()
                if line.strip() and not line.startswith("# ")]

    def wait_log(self, pattern: str, timeout: float = 15) -> list[str]:
        """Bounded wait until a log line matches `pattern` (regex); returns the matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.own_lines() if rx.search(line)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise self.error(f"no log line matches {pattern!r} after {timeout}s")
            time.sleep(0.1)

    def error(self, message: str) -> IpserveError:
        state = "running" if self.running() else f"exited with {self.proc.returncode}"
        return IpserveError(f"{message}\nipserve {self.name} (pid {self.pid}, {state}); "
                            f"log {self.log_path}, last lines:\n{self.log_tail()}")

    # -- ipservectl --
    def ctl_argv(self, *cmd: str) -> list[str]:
        return [sys.executable, "-m", self.ctl_module, "-n", self.name,
                "--runtime-dir", self.runtime_dir, *cmd]

    def ctl(self, *cmd: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
        """Run ``ipservectl -n NAME --runtime-dir DIR <cmd>`` in the server namespace."""
        try:
            proc = subprocess.run(netns_argv(self.ns, self.ctl_argv(*cmd)), capture_output=True,
                                  text=True, timeout=timeout, cwd=self.cwd, env=self.env)
        except subprocess.TimeoutExpired:
            raise self.error(f"ipservectl {' '.join(cmd)} did not answer in {timeout}s") from None
        if check and proc.returncode != 0:
            raise self.error(f"ipservectl {' '.join(cmd)} failed ({proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    def status(self, timeout: float = 15) -> dict:
        """Parsed ``ipservectl status --json``; remembers every worker pid it shows."""
        proc = self.ctl("status", "--json", check=False, timeout=timeout)
        if proc.returncode != 0:
            raise self.error(f"ipservectl status failed ({proc.returncode}): "
                             f"{proc.stderr.strip() or proc.stdout.strip()}")
        try:
            st = json.loads(proc.stdout)
        except ValueError:
            raise self.error(f"ipservectl status --json printed no JSON: {proc.stdout[:500]!r}")
        self._note(st)
        self.last_status = st
        return st

    def _note(self, st: dict) -> None:
        for w in st.get("workers") or []:
            pid = w.get("pid")
            if isinstance(pid, int) and pid > 0:
                self.note_worker_pid(pid, w)

    def note_worker_pid(self, pid: int, info: dict | None = None) -> None:
        """Track `pid` for cleanup (pidfd taken now, so a recycled pid is never hit)."""
        if pid in self._seen:
            if info:
                self._seen[pid].info = info
            return
        fd = _pidfd(pid)
        if fd is not None and not pid_in_ns(pid, self.ns):
            os.close(fd)          # not ours (or already gone and reused)
            fd = None
        self._seen[pid] = _Seen(pid, fd, info or {})

    @property
    def seen_worker_pids(self) -> list[int]:
        return sorted(self._seen)

    def live_worker_pids(self) -> list[int]:
        return sorted(p for p, s in self._seen.items()
                      if s.fd is not None and not _pidfd_exited(s.fd))

    # -- waiting --
    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30,
                 what: str = "condition", interval: float = 0.1) -> dict:
        """Poll status() until predicate(status) is true; returns that status.
        Fails at once (with the log tail) if the master exits."""
        deadline = time.monotonic() + timeout
        last_err = ""
        st = None
        while True:
            if not self.running():
                raise self.error(f"master exited while waiting for {what}")
            try:
                st = self.status(timeout=max(1.0, min(15.0, deadline - time.monotonic())))
                if predicate(st):
                    return st
            except IpserveError as exc:
                last_err = str(exc).split("\nipserve ", 1)[0]
            if time.monotonic() >= deadline:
                detail = (f"last status: {json.dumps(st)[:2000]}" if st is not None
                          else f"last ipservectl error: {last_err}")
                raise self.error(f"timed out after {timeout}s waiting for {what}; {detail}")
            time.sleep(interval)

    def wait_ready(self, n_workers: int, timeout: float = 30,
                   generation: int | None = None) -> dict:
        """Wait until at least n_workers workers (of `generation`, if given) are active."""
        def ok(st: dict) -> bool:
            return len(active_workers(st, generation)) >= n_workers
        gen = "" if generation is None else f" of generation {generation}"
        return self.wait_for(ok, timeout, f"{n_workers} active workers{gen}")

    # -- stopping --
    def send_signal(self, sig: int) -> None:
        """Signal the master (our child: no pid-reuse risk while unreaped)."""
        if self.running():
            self.proc.send_signal(sig)

    def wait_workers_gone(self, timeout: float = 30, pids: Iterable[int] | None = None) -> None:
        fds = [s.fd for p, s in self._seen.items()
               if s.fd is not None and (pids is None or p in set(pids))]
        if _wait_pidfds(fds, timeout):
            raise self.error(f"workers still alive after {timeout}s: {self.live_worker_pids()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30,
             wait_workers: bool = True) -> int:
        """Signal the master, wait for it (and the workers it ran) to exit.
        Returns the master's exit code; raises IpserveError on timeout."""
        self.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"master still running {timeout}s after signal {sig}") from None
        if wait_workers:
            self.wait_workers_gone(timeout)
        return rc

    def kill_master(self) -> None:
        """SIGKILL the master only (its workers keep running: adoption tests)."""
        if self.running():
            self.proc.kill()
        self.proc.wait(10)

    def cleanup(self, grace: float = 0.5, kill_namespace: bool = False) -> None:
        """Kill master and every worker ever seen; with kill_namespace, then
        everything else in the server namespace too. Idempotent."""
        if not self._cleaned:
            try:
                if self.running():
                    with contextlib.suppress(Exception):
                        self.status(timeout=3)          # learn workers started lately
                if self.running():
                    self.proc.terminate()
                    try:
                        self.proc.wait(grace)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
                fds = [s.fd for s in self._seen.values() if s.fd is not None]
                for fd in fds:
                    _pidfd_signal(fd, signal.SIGTERM)
                for fd in _wait_pidfds(fds, grace):
                    _pidfd_signal(fd, signal.SIGKILL)
                left = _wait_pidfds(fds, 5)
                for s in self._seen.values():
                    if s.fd is not None:
                        os.close(s.fd)
                        s.fd = None
                if left:
                    raise IpserveError(f"{self.name}: workers survived SIGKILL")
            finally:
                self._cleaned = True
                self._log.close()
        if kill_namespace:
            kill_ns_processes(self.ns, grace=grace)

    def __enter__(self) -> "IpserveProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        return f"<IpserveProcess {self.name} pid={self.pid} ns={self.ns}>"


def active_workers(status: dict, generation: int | None = None) -> list[dict]:
    return [w for w in status.get("workers") or []
            if w.get("state") == "active"
            and (generation is None or w.get("generation") == generation)]


def start_ipserve(testbed: Testbed, args: Sequence[str], env: dict | None = None,
                  **kwargs) -> IpserveProcess:
    """Start ``python -m ipserve.cli <args>`` in testbed.server_ns.

    Adds ``-n <unique name>`` and ``--runtime-dir <private dir>`` unless args
    already have them. `env` entries override the inherited environment
    (None removes a key; inherited IPSERVE_* are always dropped). Keyword
    arguments: name, runtime_dir, log_path, cwd, pythonpath, server_module,
    ctl_module, run_as (a uid: run the master under setpriv as that user,
    without capabilities; its private runtime directory is chowned to it),
    ambient_caps (with run_as: capabilities it keeps as ambient ones).
    """
    return IpserveProcess(testbed, args, env, **kwargs)


# ---------------------------------------------------------------- processes

CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapAmb")   # what a worker must hold none of


def proc_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (Uid, CapEff, ...)."""
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in fh)}


def capabilities(pid: int) -> dict[str, int]:
    """The process's capability sets (CAP_SETS and CapBnd) as bit masks."""
    fields = proc_status(pid)
    return {k: int(fields[k], 16) for k in (*CAP_SETS, "CapBnd")}
