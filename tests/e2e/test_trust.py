"""End-to-end tests of the master's trust and privilege guarantees (issue 8).

The real `ipserve` command runs as root in the testbed's server namespace with
the nft router; the attacker is another process in that namespace, usually
running as uid 65534, the workers' user (`--user nobody`): the application
itself, or any other daemon of that user. Attacks go through the real control
socket, the real file system and the real kernel; what is asserted is what
the kernel and the disk show afterwards (the nft map, who answers a client,
/proc/<pid>/status, file contents and owners, exit codes, log lines).

With two workers, slot = client address & 1: even last octets go to slot 0,
odd ones to slot 1. No timing thresholds: waits are bounded polls.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import netns
from backends import routed_workers, slot_of, which
from netns import CAP_SETS, capabilities, proc_status

PORT = 8000
NOBODY = 65534
NOBODY_GID = netns._primary_gid(NOBODY)
CAP_NET_ADMIN = 1 << 12
APPS_DIR = os.path.join(netns.REPO_ROOT, "tests", "apps")

pytestmark = pytest.mark.skipif(not which("nft"), reason="nft is not installed")


# --------------------------------------------------------------------------- #
# A control-socket client for attackers: standard library only, run as any uid
# in the server namespace. Reads a JSON spec on stdin, prints JSON on stdout.
#   spec: {"path", "timeout", "items": [{"parts": [...], "fds": N, "listen": bool}]}
#   a part is a latin-1 string or [string, count] (repeated); "@PORT@" in the
#   data becomes the port of a TCP listener of the attacker's own ("listen"),
#   whose descriptor goes along with the data (SCM_RIGHTS), as do N extra
#   ones; "@SELF@" becomes the attacker's pid.
# Each item is one connection: send, then read until the master closes it.
# --------------------------------------------------------------------------- #

CONTROL_CLIENT = r"""
import json, os, socket, sys
spec = json.load(sys.stdin)
out = {"pid": os.getpid(), "uid": os.getuid(), "results": []}
keep = []
for item in spec["items"]:
    data = b"".join(p.encode("latin-1") if isinstance(p, str) else p[0].encode("latin-1") * p[1]
                    for p in item["parts"])
    data = data.replace(b'"@SELF@"', str(os.getpid()).encode())
    fds = []
    r = {"port": None}
    if item.get("listen"):
        lst = socket.socket()
        lst.bind(("0.0.0.0", 0))
        lst.listen(16)
        keep.append(lst)
        r["port"] = lst.getsockname()[1]
        data = data.replace(b"@PORT@", str(r["port"]).encode())
        fds.append(lst.fileno())
    for _ in range(item.get("fds", 0)):
        extra = socket.socket()
        keep.append(extra)
        fds.append(extra.fileno())
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(spec.get("timeout", 20))
    try:
        sock.connect(spec["path"])
    except OSError as exc:
        r["connect_error"] = str(exc)
        out["results"].append(r)
        continue
    try:
        if fds:
            socket.send_fds(sock, [data[:4096]], fds)
            sock.sendall(data[4096:])
        else:
            sock.sendall(data)
    except OSError as exc:
        r["send_error"] = str(exc)
    buf = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                r["eof"] = True
                break
            buf += chunk
    except socket.timeout:
        r["eof"] = False
    except OSError as exc:
        r["eof"] = True
        r["recv_error"] = str(exc)
    sock.close()
    r["received"] = [json.loads(line) for line in buf.splitlines() if line.strip()]
    out["results"].append(r)
print(json.dumps(out))
"""

# Opens N connections that never speak, holds them, reports how many the
# master closed meanwhile. argv: path count hold_seconds
FLOOD_CLIENT = r"""
import json, os, resource, select, socket, sys, time
path, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
socks, failed = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(path)
        socks.append(s)
    except OSError:
        failed += 1
        s.close()
time.sleep(hold)
closed = 0
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1) == b"":
            closed += 1
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
    s.close()
print(json.dumps({"pid": os.getpid(), "connected": len(socks), "failed": failed,
                  "closed_by_master": closed}))
"""


# Keeps `count` silent connections open, reconnecting each one the master
# closes, for `seconds`. Prints "holding" once the first round is open.
HOLD_CLIENT = r"""
import resource, select, socket, sys, time
path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s
socks = [connect() for _ in range(count)]
print("holding", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    readable, _, _ = select.select([s for s in socks if s is not None], [], [], 0.05)
    for s in readable:
        try:
            gone = s.recv(1) == b""
        except OSError:
            gone = True
        if gone:
            socks[socks.index(s)] = None
            s.close()
    socks = [s if s is not None else connect() for s in socks]
"""


# Connects to the control socket, forks, and the parent exits at once: its pid,
# the one SO_PEERCRED reports for this connection, is free again. The child
# keeps the connection, waits (up to 4.5 s) for a worker to be spawned with
# that pid, reads its slot and generation from /proc/<pid>/cmdline (any user
# may), and says hello in its name. Prints {"peer_pid"} (parent), then the
# child's report {"peer_pid", "worker_at_pid", "received", "eof"}.
RECYCLED_PID_CLIENT = r"""
import json, os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
peer = os.getpid()
if os.fork():
    print(json.dumps({"peer_pid": peer}), flush=True)
    os._exit(0)
os.setsid()
out = {"peer_pid": peer, "worker_at_pid": False}
spec, deadline = None, time.monotonic() + 4.5
while spec is None and time.monotonic() < deadline:
    try:
        with open(f"/proc/{peer}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        argv = []
    if b"ipserve.worker" in argv and b"--check" not in argv:
        spec = next(json.loads(a) for a in argv if a.startswith(b"{"))
    else:
        time.sleep(0.001)
if spec is not None:
    out["worker_at_pid"] = True
    hello = {"type": "hello", "name": spec["name"], "pid": peer, "slot": spec["slot"],
             "generation": spec["generation"], "phase": "ready", "connections": 0, "requests": 0}
    buf = b""
    try:
        sock.sendall((json.dumps(hello) + "\n").encode())
        sock.settimeout(8)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                out["eof"] = True
                break
            buf += chunk
    except socket.timeout:
        out["eof"] = False
    except (BrokenPipeError, ConnectionResetError):
        out["eof"] = True      # closed before the hello: its connecting process had gone
    out["received"] = [json.loads(ln) for ln in buf.splitlines() if ln.strip()]
print(json.dumps(out), flush=True)
"""


def run_as(ns: str, uid: int | None, argv, *, input: str | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    """Run argv in `ns` as `uid` (setpriv: no groups, no capabilities; None: root)."""
    return netns.call_in(ns, [*netns.setpriv_argv(uid), *argv], input=input, check=False,
                         timeout=timeout)


def control_client(srv, uid: int | None, items: list[dict], timeout: float = 20) -> dict:
    """Run CONTROL_CLIENT as `uid` against srv's control socket; its JSON report."""
    spec = {"path": os.path.join(srv.runtime_dir, srv.name + ".sock"), "timeout": timeout,
            "items": items}
    proc = run_as(srv.ns, uid, [sys.executable, "-I", "-c", CONTROL_CLIENT],
                  input=json.dumps(spec), timeout=timeout * len(items) + 60)
    assert proc.returncode == 0, f"control client failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def line(message: dict) -> dict:
    """An item sending `message` as one JSON line."""
    return {"parts": [json.dumps(message) + "\n"]}


def hello(name: str, pid, slot: int, generation: int, phase: str = "ready", **extra) -> dict:
    return {"type": "hello", "name": name, "pid": pid, "slot": slot, "generation": generation,
            "phase": phase, "connections": 0, "requests": 0, **extra}


def heartbeat(**extra) -> dict:
    return {"type": "heartbeat", "connections": 0, "requests": 0, "lag_ms": 0.0,
            "too_busy": False, "shed": 0, "websockets": 0, "phase": "active", **extra}


def shared_dir(testbed, prefix: str = "ips-trust-") -> str:
    """A fresh 0755 directory (removed with the testbed): uid 65534 can read in it."""
    d = tempfile.mkdtemp(prefix=prefix)
    testbed.add_path(d)
    os.chmod(d, 0o755)
    return d


def copy_app(directory: str, filename: str) -> str:
    """Copy tests/apps/<filename> where uid 65534 can read it; returns the new path."""
    dst = os.path.join(directory, filename)
    shutil.copy(os.path.join(APPS_DIR, filename), dst)
    os.chmod(dst, 0o644)
    return dst


def readable_by(uid: int, path: str) -> bool:
    return subprocess.run([*netns.setpriv_argv(uid), "test", "-r", path],
                          capture_output=True).returncode == 0


def need_nobody_can_run_ipserve() -> None:
    if not readable_by(NOBODY, os.path.join(netns.REPO_ROOT, "ipserve", "worker", "main.py")):
        pytest.skip("the ipserve package is not readable by uid 65534 here")


def wait_routed(srv, workers: int = 2, timeout: float = 60) -> dict[int, dict]:
    st = srv.wait_for(lambda st: routed_workers(st, workers) is not None, timeout=timeout,
                      interval=0.05, what=f"{workers} active workers, each routed its own slot")
    return routed_workers(st, workers)


def start(ipserve, testbed, *, workers: int = 2, user: str | None = "nobody",
          app: str = "probe.py", extra=(), env: dict | None = None, runtime: str | None = None):
    """Start ipserve (nft router) with the app copied to a 0755 directory and,
    unless `runtime` is given, a 0755 runtime directory the workers can reach."""
    need_nobody_can_run_ipserve()
    d = shared_dir(testbed)
    if runtime is None:
        runtime = os.path.join(d, "run")
        os.mkdir(runtime, 0o755)
    args = [copy_app(d, app) + ":application", "-w", workers, "--router", "nft",
            "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "3",
            *(["--user", user] if user else []), *extra]
    return ipserve(args, runtime_dir=runtime, env=env)


def serve(ipserve, testbed, *, workers: int = 2, **kwargs):
    """start(), then wait until every slot is routed to its own worker.
    Returns (process, {slot: worker status})."""
    srv = start(ipserve, testbed, workers=workers, **kwargs)
    return srv, wait_routed(srv, workers)


def slot_addrs(testbed, slot: int, workers: int = 2) -> list[str]:
    return [a for a in testbed.client_ips if slot_of(a, workers) == slot]


def answered_by(testbed, src: str) -> int:
    """The pid of the worker that answers a GET / from client address `src`."""
    status, _, body = netns.http_get(testbed.client_ns, src, testbed.server_ip, PORT, "/",
                                     timeout=10)
    assert status == 200, (src, status, body[:200])
    return json.loads(body)["pid"]


def nft_json(ns: str) -> list[dict]:
    return json.loads(netns.call_in(ns, [which("nft"), "-j", "list", "ruleset"]).stdout)["nftables"]


def nft_tables(ns: str) -> set[str]:
    return {obj["table"]["name"] for obj in nft_json(ns) if "table" in obj}


def nft_slot_map(ns: str, name: str) -> dict[int, int]:
    """slot -> port of the map `slots` in table ip ipserve_<name>, as the kernel holds it."""
    for obj in nft_json(ns):
        m = obj.get("map")
        if m and m["family"] == "ip" and m["table"] == f"ipserve_{name}" and m["name"] == "slots":
            return {int(ipaddress.ip_address(key)): port for key, port in m.get("elem", [])}
    raise AssertionError(f"no map ip ipserve_{name} slots in the ruleset of {ns}")


def listening_pids(ns: str, port: int) -> set[int]:
    """Pids holding a TCP socket listening on `port` in `ns` (ss -p)."""
    out = netns.call_in(ns, [which("ss") or "/usr/bin/ss", "-Hltnp", f"sport = :{port}"]).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def assert_no_traceback(srv) -> None:
    text = srv.log_text()
    assert "Traceback" not in text, srv.log_tail(80)


def assert_serving_unchanged(srv, testbed, table: dict[int, dict], workers: int = 2) -> None:
    """Every slot still held by the same active worker, the kernel's map still
    sends each slot to that worker's own socket, and its clients reach it."""
    st = srv.status()
    assert st["master"]["stopping"] is None and st["master"]["generation"] == 1, st["master"]
    now = routed_workers(st, workers)
    assert now is not None, json.dumps(st)[:2000]
    assert {s: w["pid"] for s, w in now.items()} == {s: w["pid"] for s, w in table.items()}
    assert sorted(w["pid"] for w in st["workers"]) == sorted(w["pid"] for w in table.values()), \
        st["workers"]
    assert all(w["generation"] == 1 and w["connected"] for w in st["workers"]), st["workers"]
    kernel = nft_slot_map(srv.ns, srv.name)
    assert kernel == {s: w["port"] for s, w in table.items()}, kernel
    for s, w in table.items():
        assert w["pid"] in listening_pids(srv.ns, kernel[s]), (s, kernel[s], w["pid"])
    for src in testbed.client_ips:
        assert answered_by(testbed, src) == table[slot_of(src, workers)]["pid"], src


def wait_exit(srv, timeout: float = 30) -> int:
    try:
        return srv.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise srv.error(f"ipserve did not exit within {timeout}s") from None


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(path: str) -> tuple:
    st = os.lstat(path)
    with open(path, "rb") as f:
        return f.read(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_ino


def assert_refused_before_anything(srv, runtime: str, expected: str) -> None:
    """Exit status 2, one line saying `expected`, nothing left behind."""
    rc = wait_exit(srv)
    lines = srv.own_lines()
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("ipserve: error:"), lines
    assert expected in lines[0], lines
    assert f"ipserve_{srv.name}" not in nft_tables(srv.ns)
    assert netns.ns_pids(srv.ns) == [], "a process is left in the server namespace"
    assert os.listdir(runtime) == [], os.listdir(runtime)


class HandStartedMaster:
    """An ipserve master started by hand (argv given whole) in namespace `ns`,
    for what the harness cannot start; close() kills it and every worker
    status ever showed, by pidfd."""

    def __init__(self, ns: str, argv, name: str, runtime: str, log_path: str):
        self.ns, self.name, self.runtime, self.log_path = ns, name, runtime, log_path
        self.pidfds: dict[int, int] = {}
        with open(log_path, "ab") as log:
            self.proc = netns.run_in(ns, argv, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def status(self) -> dict | None:
        proc = netns.call_in(self.ns, [sys.executable, "-m", "ipserve.ctl", "-n", self.name,
                                       "--runtime-dir", self.runtime, "status", "--json"],
                             check=False)
        if proc.returncode != 0:
            return None
        st = json.loads(proc.stdout)
        for w in st["workers"]:
            if w["pid"] not in self.pidfds and netns.pid_in_ns(w["pid"], self.ns):
                fd = netns._pidfd(w["pid"])
                if fd is not None:
                    self.pidfds[w["pid"]] = fd
        return st

    def wait_routed(self, workers: int, timeout: float = 60) -> dict[int, dict]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"master exited: {netns._tail(self.log_path)}"
            st = self.status()
            if st is not None and routed_workers(st, workers) is not None:
                return routed_workers(st, workers)
            assert time.monotonic() < deadline, f"not routed: {netns._tail(self.log_path)}"
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        for fd in self.pidfds.values():
            netns._pidfd_signal(fd, signal.SIGKILL)
        netns._wait_pidfds(self.pidfds.values(), 10)
        for fd in self.pidfds.values():
            os.close(fd)
        self.pidfds.clear()


# --------------------------------------------------------------------------- #
# 1. Forged worker messages
# --------------------------------------------------------------------------- #

def test_forged_hello_from_worker_user_changes_nothing(testbed, ipserve):
    """A process of the workers' user claims to be slot 1's new worker (generation 99, own port)."""
    srv, table = serve(ipserve, testbed)
    real = table[1]
    beats = [json.dumps(heartbeat(connections=5000, requests=10 ** 6, too_busy=True)) + "\n"] * 3
    report = control_client(srv, NOBODY, [
        # a hello with heartbeats right behind it, handing over a listener of its own
        {"parts": [json.dumps(hello(srv.name, "@SELF@", 1, 99, port="@PORT@")) + "\n", *beats],
         "listen": True},
        {"parts": [json.dumps(hello(srv.name, "@SELF@", 1, 99, "active", port="@PORT@")) + "\n",
                   *beats], "listen": True},
        # heartbeats before saying who it is; the message of the old protocol
        {"parts": [*beats, json.dumps(hello(srv.name, "@SELF@", 1, 99)) + "\n"]},
        line({"type": "ready", "pid": "@SELF@", "slot": 1, "generation": 99,
              "port": real["port"] + 1}),
    ])
    assert report["uid"] == NOBODY
    hellos, (early_beats, old_ready) = report["results"][:2], report["results"][2:]
    for r in hellos:
        assert r == dict(r, eof=True, received=[{"type": "refused"}]), r
    for r in (early_beats, old_ready):
        assert r == dict(r, eof=True, received=[]), r
    srv.wait_log(rf"refused a worker hello from pid {report['pid']} \(uid {NOBODY}\) claiming "
                  rf"slot 1 generation 99")
    assert_serving_unchanged(srv, testbed, table)
    forger_ports = {r["port"] for r in hellos}
    assert not forger_ports & set(nft_slot_map(srv.ns, srv.name).values())
    assert_no_traceback(srv)


@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["uid65534", "root"])
def test_hello_claiming_another_workers_pid_is_refused(testbed, ipserve, uid):
    """A process claims to be slot 1's real worker: its pid, slot and generation, all correct."""
    srv, table = serve(ipserve, testbed)
    real = table[1]
    claim = hello(srv.name, real["pid"], 1, real["generation"])
    report = control_client(srv, uid, [
        {"parts": [json.dumps(claim) + "\n", json.dumps(heartbeat()) + "\n"]},
        {"parts": [json.dumps(dict(claim, phase="retiring")) + "\n"]},
        line({"type": "boot-failed", "error": "forged"}),
    ])
    for r in report["results"][:2]:
        assert r == dict(r, eof=True, received=[{"type": "refused"}]), r
    assert report["results"][2].get("eof") is True
    srv.wait_log(rf"refused a worker hello from pid {report['pid']} \(uid {uid}\) claiming "
                  rf"slot 1 generation 1")
    assert_serving_unchanged(srv, testbed, table)
    st = srv.status()
    assert all(w["boot_error"] is None for w in st["workers"]), st["workers"]
    assert_no_traceback(srv)


# --------------------------------------------------------------------------- #
# 2. Admin commands from the workers' user
# --------------------------------------------------------------------------- #

def test_admin_commands_from_worker_user_are_refused(testbed, ipserve):
    """Application code (uid 65534) asks the master to hand over, stop, reload, report."""
    srv, table = serve(ipserve, testbed)
    commands = [{"cmd": "handover", "pid": 1}, {"cmd": "handover"}, {"cmd": "stop"},
                {"cmd": "reload"}, {"cmd": "kill-retired"}, {"cmd": "status"}]
    report = control_client(srv, NOBODY, [line(c) for c in commands])
    for command, r in zip(commands, report["results"]):
        assert r.get("eof") is True and len(r["received"]) == 1, (command, r)
        answer = r["received"][0]
        assert answer["ok"] is False and answer["error"].startswith("permission denied"), \
            (command, answer)
    refusals = srv.wait_log(rf"refused a command from pid {report['pid']} \(uid {NOBODY}\)")
    assert len(refusals) == len(commands), refusals

    # ipservectl itself, run by that user: one line, exit status 1, no traceback.
    for command in ("stop", "reload", "kill-retired", "status"):
        proc = run_as(srv.ns, NOBODY, srv.ctl_argv(command), timeout=30)
        errors = proc.stderr.splitlines()
        assert (proc.returncode, proc.stdout) == (1, ""), (command, proc)
        assert len(errors) == 1 and "permission denied" in errors[0], (command, proc.stderr)
        assert "Traceback" not in proc.stderr

    # The master never acted on any of them.
    assert srv.running()
    assert_serving_unchanged(srv, testbed, table)
    assert_no_traceback(srv)


# --------------------------------------------------------------------------- #
# 3. Malformed input on the control socket
# --------------------------------------------------------------------------- #

def _hello_text(**fields) -> str:
    """A hello line whose values are raw JSON text (NaN, 1e999, huge integers)."""
    values = {k: json.dumps(v) for k, v in hello("x", 1, 1, 1).items()} | fields
    return "{" + ",".join(f'"{k}":{v}' for k, v in values.items()) + "}\n"


# what is sent -> what the master's warning about it says (None: no warning,
# a bad command from root is only answered). One connection each.
MALFORMED = {
    "not JSON": (["this is not json\n"], "is not JSON"),
    "truncated JSON": (['{"type": "hello", "pid": \n'], "is not JSON"),
    "100 KiB line, no newline": ([["x", 100 * 1024]], "longer than 65536 bytes"),
    "[ nested 100000 deep": ([["[", 100000], "\n"], "longer than 65536 bytes"),
    "[ nested 60000 deep (a line under the limit)": ([["[", 60000], "\n"], "nested too deeply"),
    "objects nested 10000 deep": ([['{"a":', 10000], "1", ["}", 10000], "\n"], "nested too deeply"),
    "NaN in a heartbeat": (['{"type":"heartbeat","connections":NaN,"requests":0,"lag_ms":0,'
                            '"too_busy":false,"shed":0,"websockets":0,"phase":"active"}\n'],
                           "NaN is not a number"),
    "Infinity slot": ([_hello_text(slot="Infinity")], "Infinity is not a number"),
    "1e999 generation": ([_hello_text(generation="1e999")], "'generation' must be"),
    "5000-digit pid": ([_hello_text(pid="9" * 5000)], "is not JSON"),
    "invalid UTF-8": (['{"type":"hello","name":"\xff\xfe"}\n'], "is not JSON"),
    "an array": (["[]\n"], "not a JSON object"),
    "a string": (['"hello"\n'], "not a JSON object"),
    "null": (["null\n"], "not a JSON object"),
    "wrong types in a hello": ([_hello_text(name="123", pid='"1"', slot="-1", generation="0",
                                            phase='"dancing"', connections="true",
                                            requests="1.5")], "bad message"),
    "counts out of range": ([_hello_text(connections=str(2 ** 62), requests="-1")],
                            "'connections' must be"),
    "a 60000-character name": ([_hello_text(name=json.dumps("x" * 60000))], "'name' must be"),
    "unknown message type": (['{"type":"activate"}\n'], "unknown message type"),
    "message type not a string": (['{"type":["hello"],"pid":1}\n'], "unknown message type"),
    "command not a string": (['{"cmd":5}\n'], None),
    "command a list": (['{"cmd":["stop"]}\n'], None),
    "stop with a bad pid": (['{"cmd":"stop","pid":"x"}\n'], None),
    "handover with a negative pid": (['{"cmd":"handover","pid":-1}\n'], None),
    "garbage with 20 descriptors": ({"parts": ["garbage\n"], "fds": 20}, "is not JSON"),
    "blank lines, then silence": (["\n\n\n"], "said nothing in"),
}
COMMANDS = [what for what, (_, warning) in MALFORMED.items() if warning is None]


def _items(table: dict) -> list[dict]:
    return [v if isinstance(v, dict) else {"parts": v} for v, _ in table.values()]


@pytest.mark.parametrize("uid", [NOBODY, 0], ids=["uid65534", "root"])
def test_malformed_control_input_closes_only_that_connection(testbed, ipserve, uid):
    """Garbage, huge lines, deep nesting, NaN, wrong types, descriptors, silence on the socket."""
    srv, table = serve(ipserve, testbed)
    srv.status()
    fds_before = fd_count(srv.pid)
    report = control_client(srv, uid, _items(MALFORMED))
    for what, r in zip(MALFORMED, report["results"]):
        assert r.get("eof") is True, f"{what}: the master never closed the connection: {r}"
        if what in COMMANDS:
            # A command: one refusal (not root) or "bad request" (root), never obeyed.
            assert len(r["received"]) == 1 and r["received"][0]["ok"] is False, (what, r)
            expected = "permission denied" if uid else "bad request"
            assert r["received"][0]["error"].startswith(expected), (what, r)
        else:
            assert r["received"] == [], (what, r)
    # Each connection was closed for what it sent, with a warning naming the
    # peer (connections are made one after the other: warnings come in order).
    warnings = [ln for ln in srv.own_lines() if "[WARNING]" in ln
                and f"pid {report['pid']} (uid {uid})" in ln]
    expected = [(what, "refused a command" if what in COMMANDS else warning)
                for what, (_, warning) in MALFORMED.items() if uid or what not in COMMANDS]
    assert len(warnings) == len(expected), "\n".join(warnings)
    for (what, fragment), warning in zip(expected, warnings):
        assert fragment in warning, (what, fragment, warning)
    assert srv.running()
    assert_serving_unchanged(srv, testbed, table)
    # Nothing the garbage brought (descriptors, buffers' sockets) is kept.
    deadline = time.monotonic() + 30
    while fd_count(srv.pid) > fds_before:
        assert time.monotonic() < deadline, (f"master holds {fd_count(srv.pid)} descriptors, "
                                             f"{fds_before} before the garbage")
        time.sleep(0.2)
    assert_no_traceback(srv)


def test_flood_of_silent_connections_leaves_master_serving(testbed, ipserve):
    """uid 65534 opens 2000 control connections that never speak."""
    srv, table = serve(ipserve, testbed)
    srv.status()
    fds_before = fd_count(srv.pid)
    path = os.path.join(srv.runtime_dir, srv.name + ".sock")
    proc = run_as(srv.ns, NOBODY, [sys.executable, "-I", "-c", FLOOD_CLIENT, path, "2000", "1"],
                  timeout=300)
    assert proc.returncode == 0, proc.stderr
    flood = json.loads(proc.stdout)
    assert flood["connected"] + flood["failed"] == 2000, flood
    # Afterwards: answering, every worker still active, connected and serving.
    srv.wait_for(lambda st: routed_workers(st, 2) is not None, timeout=30,
                 what="status answered again after the flood")
    assert_serving_unchanged(srv, testbed, table)
    deadline = time.monotonic() + 30
    while fd_count(srv.pid) > fds_before:
        assert time.monotonic() < deadline, (f"master holds {fd_count(srv.pid)} descriptors, "
                                             f"{fds_before} before the flood")
        time.sleep(0.2)
    assert any("[WARNING]" in ln and "control" in ln for ln in srv.own_lines()), srv.log_tail()
    assert_no_traceback(srv)
    print(f"flood: {flood}")


def test_silent_connections_of_worker_user_lock_out_nobody_else(testbed, ipserve):
    """uid 65534 keeps 200 silent control connections open, reopening each one the master closes."""
    srv, table = serve(ipserve, testbed)
    old = table[1]
    path = os.path.join(srv.runtime_dir, srv.name + ".sock")
    flood = netns.run_in(srv.ns, [*netns.setpriv_argv(NOBODY), sys.executable, "-I", "-c",
                                  HOLD_CLIENT, path, "200", "120"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout.readline().strip() == "holding"
        # Root can still ask the master how it is.
        proc = srv.ctl("status", "--json", check=False, timeout=30)
        assert proc.returncode == 0, f"root locked out: {proc.stderr.strip()}"
        # A crashed worker's replacement can still report to the master and
        # take the slot (its clients wait in the slot's queue meanwhile).
        fd = os.pidfd_open(old["pid"])
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        src = slot_addrs(testbed, 1)[0]
        try:
            status, _, body = netns.http_get(testbed.client_ns, src, testbed.server_ip, PORT,
                                             "/", timeout=20)
        except OSError as exc:
            raise AssertionError(f"slot 1 never served again after its worker died: {exc!r}")
        assert status == 200 and json.loads(body)["pid"] != old["pid"]
    finally:
        flood.kill()
        flood.wait()


# --------------------------------------------------------------------------- #
# 1b. A hello over a connection whose pid was recycled
# --------------------------------------------------------------------------- #

def test_hello_over_recycled_pid_connection_is_refused(testbed, ipserve):
    """uid 65534 connects, lets its pid go to the next worker, speaks for it in a broken deploy."""
    broken = os.path.join(shared_dir(testbed), "broken")
    srv, table = serve(ipserve, testbed, workers=1, app="trust_fragile.py",
                       env={"TRUST_FRAGILE_BROKEN": broken})
    old = table[0]
    open(broken, "w").close()        # the next generation raises at import, after 2 s
    path = os.path.join(srv.runtime_dir, srv.name + ".sock")
    report = None
    for attempt in range(5):
        attacker = netns.run_in(srv.ns, [*netns.setpriv_argv(NOBODY), sys.executable, "-I", "-c",
                                         RECYCLED_PID_CLIENT, path],
                                stdout=subprocess.PIPE, text=True)
        try:
            peer = json.loads(attacker.stdout.readline())["peer_pid"]
            attacker.wait(30)             # reaped: the pid is free
            # Stands for the attacker cycling the pid space (pid_max is often
            # 32768): the next process created gets the connection's pid.
            try:
                with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                    f.write(str(peer - 1))
            except OSError as exc:
                pytest.skip(f"cannot choose the next pid here: {exc}")
            srv.send_signal(signal.SIGHUP)     # the operator deploys
            report = json.loads(attacker.stdout.read())
        finally:
            attacker.kill()
            attacker.wait()
            attacker.stdout.close()
        # Whatever happened, the broken generation fails (or was switched to).
        srv.wait_for(lambda st: (st["reload"] or {}).get("state") != "in progress", timeout=60,
                     what=f"the reload of attempt {attempt} to end")
        if report["worker_at_pid"]:
            break
    else:
        pytest.skip("another process took the recycled pid before the master's worker, 5 times")
    # Refused at the hello, or closed at accept already (the process that
    # connected was gone by then): either way never believed.
    assert report["received"] in ([{"type": "refused"}], []) and report["eof"], report
    # The broken generation failed whole: the old worker still holds the slot.
    st = srv.wait_for(lambda st: (st["reload"] or {}).get("state") == "failed", timeout=60,
                      what="the reload of the broken generation to fail")
    assert routed_workers(st, 1)[0]["pid"] == old["pid"], st["workers"]
    assert answered_by(testbed, testbed.client_ips[0]) == old["pid"]


# --------------------------------------------------------------------------- #
# 4. Capabilities
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("user", [None, "nobody"], ids=["root-workers", "user-nobody"])
def test_workers_of_root_master_hold_no_capability(testbed, ipserve, user):
    """Application code runs in workers of a root master: it must hold no capability."""
    srv, table = serve(ipserve, testbed, user=user)
    assert capabilities(srv.pid)["CapEff"] & CAP_NET_ADMIN      # the master keeps its own
    for slot, w in table.items():
        caps = capabilities(w["pid"])
        uid = int(proc_status(w["pid"])["Uid"].split()[0])
        assert uid == (0 if user is None else NOBODY), (slot, uid)
        assert {k: caps[k] for k in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), (slot, caps)
        if user is None:
            # uid 0 would get every capability back from its bounding set at exec.
            assert caps["CapBnd"] == 0, (slot, caps)
    for src in testbed.client_ips:
        assert answered_by(testbed, src) == table[slot_of(src, 2)]["pid"], src


def test_master_with_ambient_net_admin_gives_workers_no_capability(testbed, tmp_path):
    """A systemd-style master (uid 65534, ambient CAP_NET_ADMIN) hands its capability to app code."""
    need_nobody_can_run_ipserve()
    d = shared_dir(testbed)
    runtime = os.path.join(d, "run")
    os.mkdir(runtime, 0o700)
    os.chown(runtime, NOBODY, NOBODY_GID)
    whoami = os.path.join(d, "whoami.jsonl")
    open(whoami, "w").close()
    os.chmod(whoami, 0o666)
    name = netns.unique_name()
    argv = [netns.SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY_GID}", "--clear-groups",
            "--inh-caps=+net_admin", "--ambient-caps=+net_admin", "--",
            "env", f"TRUST_WHOAMI_OUT={whoami}", sys.executable, "-m", "ipserve.cli",
            copy_app(d, "trust_whoami.py") + ":application", "-w", "2", "--router", "nft",
            "-b", f"0.0.0.0:{PORT}", "-n", name, "--runtime-dir", runtime]
    master = HandStartedMaster(testbed.server_ns, argv, name, runtime,
                               str(tmp_path / f"ipserve-{name}.log"))
    try:
        table = master.wait_routed(2)
        fields = proc_status(master.proc.pid)
        assert fields["Uid"].split()[0] == str(NOBODY)
        assert capabilities(master.proc.pid)["CapAmb"] == CAP_NET_ADMIN   # the setup holds
        # The master routes with nft ...
        assert nft_slot_map(testbed.server_ns, name) == {s: w["port"] for s, w in table.items()}
        for src in testbed.client_ips:
            assert answered_by(testbed, src) == table[slot_of(src, 2)]["pid"], src
        # ... and nothing below it holds a capability.
        for slot, w in table.items():
            caps = capabilities(w["pid"])
            assert {k: caps[k] for k in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), (slot, caps)
        with open(whoami) as f:
            imports = [json.loads(ln) for ln in f]
        assert any(i["check"] for i in imports), imports           # the APP check imported it
        for i in imports:
            assert i["uid"] == NOBODY and i["pid"] != master.proc.pid, i
            assert {k: i["caps"][k] for k in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), i
        with open(master.log_path) as f:
            assert "Traceback" not in f.read()
    finally:
        master.close()
    assert f"ipserve_{name}" not in nft_tables(testbed.server_ns)    # removed at TERM


# --------------------------------------------------------------------------- #
# 5. The APP check imports as the workers' user
# --------------------------------------------------------------------------- #

def test_app_is_imported_only_as_worker_user(testbed, ipserve):
    """APP code runs at import: with --user nobody, never as root (the start-up check included)."""
    d = shared_dir(testbed)
    whoami = os.path.join(d, "whoami.jsonl")
    open(whoami, "w").close()
    os.chmod(whoami, 0o666)
    srv, table = serve(ipserve, testbed, app="trust_whoami.py", env={"TRUST_WHOAMI_OUT": whoami})
    with open(whoami) as f:
        imports = [json.loads(ln) for ln in f]
    workers = {w["pid"] for w in table.values()}
    checks = [i for i in imports if i["check"]]
    assert len(checks) == 1 and checks[0]["pid"] not in workers | {srv.pid}, imports
    assert {i["pid"] for i in imports if not i["check"]} == workers, imports
    for i in imports:
        assert (i["uid"], i["euid"], i["gid"]) == (NOBODY, NOBODY, NOBODY_GID), i
        assert {k: i["caps"][k] for k in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), i
    assert_no_traceback(srv)


# --------------------------------------------------------------------------- #
# 6. Log files: no symlink or hard link is followed
# --------------------------------------------------------------------------- #

LOG_ATTACKS = [
    # option, --user, what the attacker planted at the log path, what the refusal says
    ("--error-log", None, "symlink", "symbolic link"),
    ("--error-log", "nobody", "symlink", "symbolic link"),
    ("--access-log", None, "symlink", "symbolic link"),
    ("--access-log", "nobody", "symlink", "symbolic link"),
    ("--error-log", "nobody", "dangling symlink", "symbolic link"),
    ("--error-log", "nobody", "hard link", "hard links"),
    ("--access-log", "nobody", "hard link", "hard links"),
]


@pytest.mark.parametrize("option,user,planted,expected", LOG_ATTACKS,
                         ids=[f"{o[2:]}-{u or 'root'}-{p.replace(' ', '-')}"
                              for o, u, p, _ in LOG_ATTACKS])
def test_log_path_planted_link_is_not_followed(testbed, ipserve, option, user, planted, expected):
    """A link to a root-owned file is planted at the log path (in the workers' user's directory)."""
    d = shared_dir(testbed)
    secrets_dir = os.path.join(d, "root-only")
    os.mkdir(secrets_dir, 0o755)
    victim = os.path.join(secrets_dir, "victim")
    with open(victim, "w") as f:
        f.write("victim")
    os.chmod(victim, 0o600)
    before = snapshot(victim)
    logs = os.path.join(d, "logs")
    os.mkdir(logs, 0o755)
    if user:
        os.chown(logs, NOBODY, NOBODY_GID)             # theirs: they may plant anything
    log = os.path.join(logs, "ipserve.log")
    dangling = os.path.join(secrets_dir, "created-by-root")
    target = dangling if planted == "dangling symlink" else victim
    if planted == "hard link":
        os.link(victim, log)
    else:
        os.symlink(target, log)
        if user:
            os.lchown(log, NOBODY, NOBODY_GID)
    runtime = os.path.join(d, "run")
    os.mkdir(runtime, 0o755)
    srv = start(ipserve, testbed, user=user, extra=[option, log], runtime=runtime)
    assert_refused_before_anything(srv, runtime, expected)
    assert snapshot(victim) == before
    assert not os.path.lexists(dangling)


# --------------------------------------------------------------------------- #
# 7. Runtime directory another user could change
# --------------------------------------------------------------------------- #

def _runtime_owned_by_nobody(d: str) -> str:
    runtime = os.path.join(d, "run")
    os.mkdir(runtime, 0o755)
    os.chown(runtime, NOBODY, NOBODY_GID)
    return runtime


def _runtime_world_writable(d: str) -> str:
    runtime = os.path.join(d, "run")
    os.mkdir(runtime)
    os.chmod(runtime, 0o777)
    return runtime


def _runtime_under_nobodys_directory(d: str) -> str:
    parent = os.path.join(d, "theirs")
    os.mkdir(parent, 0o755)
    os.chown(parent, NOBODY, NOBODY_GID)
    runtime = os.path.join(parent, "run")
    os.mkdir(runtime, 0o700)
    return runtime


RUNTIME_ATTACKS = {
    "owned-by-65534": (_runtime_owned_by_nobody, "owned by uid 65534"),
    "mode-0777": (_runtime_world_writable, "writable by group or others"),
    "parent-owned-by-65534": (_runtime_under_nobodys_directory, "owned by uid 65534"),
}


@pytest.mark.parametrize("case", RUNTIME_ATTACKS)
def test_runtime_dir_others_control_is_refused(testbed, ipserve, case):
    """The runtime directory (socket, pid, state, lock) is one another user can rewrite."""
    make, expected = RUNTIME_ATTACKS[case]
    runtime = make(shared_dir(testbed))
    srv = start(ipserve, testbed, user=None, runtime=runtime)
    assert_refused_before_anything(srv, runtime, expected)
    assert "runtime_dir" in srv.own_lines()[0]


def test_default_runtime_dir_made_by_another_user_is_refused(testbed, tmp_path):
    """An unprivileged master's fallback /tmp/ipserve-<uid> was created beforehand by uid 65534."""
    need_nobody_can_run_ipserve()
    d = shared_dir(testbed)
    app = copy_app(d, "probe.py")
    uid = next(u for u in range(61000, 62000) if not os.path.lexists(f"/tmp/ipserve-{u}"))
    fallback = f"/tmp/ipserve-{uid}"          # what a master of that uid falls back to
    os.mkdir(fallback)
    testbed.add_path(fallback)
    os.chmod(fallback, 0o777)
    os.chown(fallback, NOBODY, NOBODY_GID)
    name = netns.unique_name()
    env = {k: v for k, v in os.environ.items()
           if k != "XDG_RUNTIME_DIR" and not k.startswith("IPSERVE_")}
    log_path = tmp_path / "ipserve.log"
    with open(log_path, "wb") as log:
        proc = netns.run_in(testbed.server_ns, [
            netns.SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
            sys.executable, "-m", "ipserve.cli", f"{app}:application", "-w", "1",
            "--router", "reuseport", "-b", f"0.0.0.0:{PORT}", "-n", name],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd="/")
    try:
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = log_path.read_text().splitlines()
    assert rc == 2 and len(lines) == 1, (rc, lines)
    assert fallback in lines[0] and "owned by uid 65534" in lines[0], lines
    assert os.listdir(fallback) == []
    assert netns.ns_pids(testbed.server_ns) == []


# --------------------------------------------------------------------------- #
# 8. Firewall tools come from fixed system directories
# --------------------------------------------------------------------------- #

FAKE_TOOLS = ("nft", "iptables", "iptables-restore", "ip6tables", "ip6tables-restore",
              "iptables-legacy", "iptables-legacy-restore", "iptables-nft", "iptables-nft-restore")


@pytest.mark.parametrize("router", ["nft", "iptables"])
def test_firewall_tools_on_path_are_never_run(testbed, ipserve, router):
    """$PATH of the root master starts with a directory holding fake nft/iptables."""
    if router == "iptables" and not (which("iptables-restore") and which("ip6tables-restore")):
        pytest.skip("iptables-restore is not installed")
    d = shared_dir(testbed)
    fake = os.path.join(d, "bin")
    os.mkdir(fake, 0o755)
    marker = os.path.join(d, "fake-tool-ran")
    for tool in FAKE_TOOLS:
        real = which(tool) or "/bin/false"
        path = os.path.join(fake, tool)
        with open(path, "w") as f:
            f.write(f'#!/bin/sh\necho "$0 $*" >> {marker}\nexec {real} "$@"\n')
        os.chmod(path, 0o755)
    env_path = f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}:/usr/sbin:/sbin"
    assert shutil.which(router, path=env_path) == os.path.join(fake, router)   # would win
    srv = ipserve([copy_app(d, "probe.py") + ":application", "-w", "2", "--router", router,
                   "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "3"], env={"PATH": env_path})
    wait_routed(srv, 2)
    if router == "nft":
        assert f"ipserve_{srv.name}" in nft_tables(srv.ns)
    else:
        rules = netns.call_in(srv.ns, [which("iptables"), "-w", "-t", "nat", "-S"]).stdout
        assert f"-N IPS-{srv.name}" in rules.splitlines(), rules
    assert srv.stop(timeout=30) == 0
    assert not os.path.exists(marker), open(marker).read()
