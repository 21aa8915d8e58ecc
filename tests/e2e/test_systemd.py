"""End-to-end tests of ipserve under systemd's protocols (issue 11): sd_notify
and least privilege.

No systemd runs here: the test plays its part. It binds a real AF_UNIX
datagram socket, passes it to the real `ipserve` command as $NOTIFY_SOCKET
(as systemd does for Type=notify), and reads what arrives, with the sender's
pid from SO_PASSCRED as systemd sees it. Least privilege runs the master as
uid 65534 holding only an ambient CAP_NET_ADMIN, as the unit in
conf/ipserve.service does (User=, AmbientCapabilities=), with real nft rules,
and reads every worker's capabilities from /proc. Waits are bounded polls.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import tempfile
import time

import netns
import pytest
from backends import backend_unavailable, routed_workers, slot_of, which
from netns import CAP_SETS, capabilities, http_json, proc_status

PORT = 8000
WORKERS = 2
NOBODY = 65534
CAP_NET_ADMIN = 1 << 12


# --------------------------------------------------------------------------- #
# systemd's side of sd_notify
# --------------------------------------------------------------------------- #

class NotifySocket:
    """A datagram socket playing systemd's notify socket; keeps every message
    received, with its sender's pid, in order."""

    def __init__(self, testbed):
        self.dir = tempfile.mkdtemp(prefix="ips-sd-")
        testbed.add_path(self.dir)
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.setblocking(False)
        self.received: list[tuple[int, dict[str, str]]] = []

    def close(self) -> None:
        self.sock.close()

    def env(self, **extra) -> dict:
        return {"NOTIFY_SOCKET": self.path, **extra}

    def drain(self) -> None:
        ucred = struct.calcsize("iII")
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(ucred))
            except BlockingIOError:
                return
            pid = next((struct.unpack("iII", d[:ucred])[0] for level, kind, d in anc
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.received.append((pid, fields))

    def wait(self, predicate, what: str, timeout: float = 30, after: int = 0,
             srv=None) -> tuple[int, int, dict]:
        """The first message from index `after` on that satisfies
        predicate(pid, fields): (index, pid, fields)."""
        deadline = time.monotonic() + timeout
        while True:
            self.drain()
            for i in range(after, len(self.received)):
                pid, fields = self.received[i]
                if predicate(pid, fields):
                    return i, pid, fields
            if time.monotonic() > deadline:
                seen = [f for _, f in self.received[after:] if "WATCHDOG" not in f][-20:]
                message = f"no notification {what} after {timeout}s; received: {seen}"
                raise srv.error(message) if srv is not None else AssertionError(message)
            select.select([self.sock], [], [], 0.1)

    def wait_key(self, key: str, srv, after: int = 0, sender: int | None = None,
                 timeout: float = 30) -> tuple[int, dict]:
        i, _, fields = self.wait(lambda p, f: key in f and (sender is None or p == sender),
                                 f"with {key}", timeout, after, srv)
        return i, fields

    def events(self, sender: int | None = None) -> list[str]:
        """READY/RELOADING/STOPPING/MAINPID in the order they came (no STATUS or WATCHDOG)."""
        self.drain()
        keys = ("READY", "RELOADING", "STOPPING", "MAINPID")
        return [k for p, f in self.received for k in keys if k in f
                and (sender is None or p == sender)]

    def statuses(self) -> list[str]:
        self.drain()
        return [f["STATUS"] for _, f in self.received if "STATUS" in f]


@pytest.fixture
def notify(testbed):
    sock = NotifySocket(testbed)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture(autouse=True)
def _nft():
    why = backend_unavailable("nft")
    if why:
        pytest.skip(why)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def start(ipserve, *, app: str = netns.PROBE_APP, router: str = "nft", env=None, **kwargs):
    args = [app, "-w", WORKERS, "--router", router, "-b", f"0.0.0.0:{PORT}",
            "--graceful-timeout", "3"]
    return ipserve(args, env, **kwargs)


def wait_routed(srv, generation: int | None = None, timeout: float = 60) -> dict[int, dict]:
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS, generation) is not None,
                      timeout=timeout, what="every slot routed to its own active worker")
    return routed_workers(st, WORKERS, generation)


def wait_reload(srv, generation: int, state: str) -> dict:
    return srv.wait_for(lambda st: (st.get("reload") or {}).get("generation") == generation
                        and st["reload"]["state"] == state, timeout=60,
                        what=f"reload to generation {generation}: {state}")


def assert_pinned(testbed, table: dict[int, dict]) -> None:
    """Fresh connections from every client address land on their slot's worker."""
    for src in testbed.client_ips:
        data = http_json(testbed.client_ns, src, testbed.server_ip, PORT, timeout=10)
        slot = slot_of(src, WORKERS)
        assert data["remote_addr"] == src, data
        assert data["pid"] == table[slot]["pid"] and data["worker"]["slot"] == slot, (src, data)


def uids(pid: int) -> set[int]:
    """Real, effective, saved and filesystem uids."""
    return {int(u) for u in proc_status(pid)["Uid"].split()}


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return dict(e.decode(errors="replace").split("=", 1)
                    for e in fh.read().split(b"\0") if b"=" in e)


def nft_tables(ns: str) -> str:
    return netns.call_in(ns, [which("nft"), "list", "tables"]).stdout


def readable_by_nobody(path: str) -> bool:
    return netns.sh([*netns.setpriv_argv(NOBODY), "test", "-r", path], check=False).returncode == 0


def need_nobody_can_run_ipserve() -> None:
    for path in (os.path.join(netns.REPO_ROOT, "ipserve", "worker", "main.py"),
                 netns.PROBE_APP_PATH):
        if not readable_by_nobody(path):
            pytest.skip(f"{path} is not readable by uid {NOBODY} here")


# --------------------------------------------------------------------------- #
# sd_notify
# --------------------------------------------------------------------------- #

def test_ready_reloading_stopping_and_status_lines(testbed, ipserve, notify):
    """READY=1 once every slot is routed; HUP: RELOADING=1 with MONOTONIC_USEC,
    then READY=1 when generation 2 has every slot; TERM: STOPPING=1."""
    srv = start(ipserve, env=notify.env())
    i, ready = notify.wait_key("READY", srv, sender=srv.pid)
    st = srv.status()                               # at that moment: routed, serving
    assert routed_workers(st, WORKERS, generation=1) is not None, st["routes"]
    assert st["master"]["serving"] is True
    assert ready["STATUS"] == "2 workers, generation 1"
    assert notify.events() == ["READY"]
    table = routed_workers(st, WORKERS)
    assert_pinned(testbed, table)
    # Workers (application code) cannot talk to systemd in the master's name.
    for w in table.values():
        assert "NOTIFY_SOCKET" not in environ(w["pid"]), w["pid"]

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    srv.send_signal(signal.SIGHUP)
    i, reloading = notify.wait_key("RELOADING", srv, after=i + 1, sender=srv.pid)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    assert reloading["STATUS"] == "reloading: 0/2 of generation 2 ready"
    i, ready = notify.wait_key("READY", srv, after=i + 1, sender=srv.pid)
    st = srv.status()
    assert st["reload"]["generation"] == 2 and st["reload"]["state"] == "done", st["reload"]
    assert st["master"]["generation"] == 2
    assert ready["STATUS"].startswith("2 workers, generation 2"), ready
    wait_routed(srv, generation=2)
    notify.wait(lambda p, f: f.get("STATUS") == "2 workers, generation 2",
                "STATUS: the old generation gone", after=i, srv=srv)

    assert srv.stop(signal.SIGTERM) == 0
    _, stopping = notify.wait_key("STOPPING", srv, after=i + 1, sender=srv.pid)
    assert stopping["STOPPING"] == "1"
    assert stopping["STATUS"] == "stopping: 2 workers finishing"
    assert notify.events() == ["READY", "RELOADING", "READY", "STOPPING"]
    statuses = notify.statuses()
    assert any(s.startswith("reloading: 1/2 of generation 2 ready") for s in statuses) or \
        any(s.startswith("reloading: 2/2") for s in statuses), statuses
    assert any(s in ("stopping: 1 worker finishing", "stopping: 0 workers finishing")
               for s in statuses), statuses
    assert f"ipserve_{srv.name}" not in nft_tables(testbed.server_ns)


def test_a_failed_reload_is_ready_again(testbed, ipserve, notify, tmp_path):
    """A generation that cannot import: RELOADING=1, then READY=1 all the same
    (systemd must not wait for ever), generation 1 keeps every slot."""
    app = tmp_path / "probe_copy.py"
    with open(netns.PROBE_APP_PATH) as fh:
        source = fh.read()
    app.write_text(source)
    srv = start(ipserve, app=f"{app}:application", env=notify.env())
    i, _ = notify.wait_key("READY", srv)
    table = wait_routed(srv, generation=1)
    app.write_text(source + "\ndef broken(:\n")
    srv.send_signal(signal.SIGHUP)
    i, _ = notify.wait_key("RELOADING", srv, after=i + 1)
    i, ready = notify.wait_key("READY", srv, after=i + 1)
    st = srv.status()
    assert st["reload"]["state"] == "failed" and st["reload"]["generation"] == 2, st["reload"]
    assert ready["STATUS"] == ("2 workers, generation 1 (the last reload failed: see "
                               "ipservectl status)"), ready
    same = wait_routed(srv, generation=1)
    assert {s: w["pid"] for s, w in same.items()} == {s: w["pid"] for s, w in table.items()}
    assert notify.events() == ["READY", "RELOADING", "READY"]


def test_takeover_names_the_new_master_as_main_pid(testbed, ipserve, notify):
    """A second master of the same name takes over: the old one (systemd's main
    pid) names its successor before it exits, the successor names itself, then
    it reloads onto a fresh generation: RELOADING=1, READY=1."""
    old = start(ipserve, env=notify.env())
    i, _ = notify.wait_key("READY", old, sender=old.pid)
    old_table = wait_routed(old)
    new = start(ipserve, env=notify.env(), name=old.name, runtime_dir=old.runtime_dir)
    try:
        rc = old.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise old.error("the old master did not hand over") from None
    assert rc == 0
    _, by_old = notify.wait_key("MAINPID", new, after=i + 1, sender=old.pid)
    assert by_old["MAINPID"] == str(new.pid)
    _, by_new = notify.wait_key("MAINPID", new, after=i + 1, sender=new.pid)
    assert by_new["MAINPID"] == str(new.pid)
    assert by_new["STATUS"] == f"took over from master pid {old.pid}"
    j, _ = notify.wait_key("RELOADING", new, after=i + 1, sender=new.pid)
    notify.wait_key("READY", new, after=j + 1, sender=new.pid)
    table = wait_routed(new, generation=2)
    assert not {w["pid"] for w in table.values()} & {w["pid"] for w in old_table.values()}
    assert notify.events(sender=old.pid) == ["READY", "MAINPID"]   # no STOPPING: it handed over
    assert "STOPPING" not in notify.events(sender=new.pid)
    assert_pinned(testbed, table)


@pytest.mark.parametrize("watchdog_pid,expected", [(None, "pings"), ("1", "silent")],
                         ids=["ours", "another-process"])
def test_watchdog_pings_from_the_loop(testbed, ipserve, notify, watchdog_pid, expected):
    """WATCHDOG_USEC set (and WATCHDOG_PID, if set, ours): WATCHDOG=1 every
    WATCHDOG_USEC/2; meant for another process: never."""
    env = notify.env(WATCHDOG_USEC=200000, WATCHDOG_PID=watchdog_pid)
    srv = start(ipserve, env=env)
    i, _ = notify.wait_key("READY", srv)
    if expected == "pings":
        for n in range(3):
            i, _ = notify.wait_key("WATCHDOG", srv, after=i + 1, sender=srv.pid)
        senders = {p for p, f in notify.received if "WATCHDOG" in f}
        assert senders == {srv.pid}, senders
    else:
        srv.send_signal(signal.SIGHUP)                # a whole reload's worth of ticks
        i, _ = notify.wait_key("RELOADING", srv, after=i + 1)
        notify.wait_key("READY", srv, after=i + 1)
        assert not [f for _, f in notify.received if "WATCHDOG" in f]
    for w in wait_routed(srv).values():
        assert not {"WATCHDOG_USEC", "WATCHDOG_PID"} & set(environ(w["pid"])), w["pid"]


# --------------------------------------------------------------------------- #
# Least privilege: uid 65534 with an ambient CAP_NET_ADMIN only
# --------------------------------------------------------------------------- #

def test_unprivileged_master_with_ambient_net_admin_routes_with_nft(testbed, ipserve):
    """As under User=ipserve + AmbientCapabilities=CAP_NET_ADMIN: the master
    writes nft rules, clients land pinned, and every worker runs as 65534
    holding no capability at all."""
    need_nobody_can_run_ipserve()
    srv = start(ipserve, run_as=NOBODY, ambient_caps=("net_admin",))
    table = wait_routed(srv)
    master = capabilities(srv.pid)
    assert uids(srv.pid) == {NOBODY}
    assert master["CapAmb"] == CAP_NET_ADMIN and master["CapEff"] == CAP_NET_ADMIN, master
    st = srv.status()
    assert st["router"] == "nft", st["router"]
    assert f"table ip ipserve_{srv.name}" in nft_tables(testbed.server_ns)
    assert_pinned(testbed, table)
    for slot, w in table.items():
        assert uids(w["pid"]) == {NOBODY}, (slot, proc_status(w["pid"])["Uid"])
        caps = capabilities(w["pid"])
        assert {k: caps[k] for k in CAP_SETS} == dict.fromkeys(CAP_SETS, 0), (slot, caps)
        # CapBnd may stay: a non-root process with empty permitted, inheritable and
        # ambient sets cannot gain capabilities by exec (NoNewPrivileges aside).
    assert srv.stop(signal.SIGTERM) == 0
    assert f"ipserve_{srv.name}" not in nft_tables(testbed.server_ns)


def test_unprivileged_master_without_net_admin(testbed, ipserve):
    """The same command without the capability: auto picks reuseport and still
    pins every client; --router nft is refused with one line, exit status 2."""
    need_nobody_can_run_ipserve()
    srv = start(ipserve, router="auto", run_as=NOBODY)
    table = wait_routed(srv)
    assert srv.status()["router"] == "reuseport"
    assert capabilities(srv.pid)["CapEff"] == 0
    assert_pinned(testbed, table)
    assert srv.stop(signal.SIGTERM) == 0

    refused = start(ipserve, router="nft", run_as=NOBODY)
    try:
        rc = refused.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise refused.error("--router nft without CAP_NET_ADMIN did not exit") from None
    lines = refused.own_lines()
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("ipserve: error:"), lines
    assert "CAP_NET_ADMIN" in lines[0], lines
    assert "Traceback" not in refused.log_text()
    assert f"ipserve_{refused.name}" not in nft_tables(testbed.server_ns)
