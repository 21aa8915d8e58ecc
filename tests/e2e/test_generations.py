"""End-to-end tests of generations (issue 4): HUP reload without a dropped
connection, retirement (renice, drain, exit), kill-retired, failed reloads,
TTIN/TTOU, and takeover of a running or dead master with adoption of its workers.

The real `ipserve` command runs in the testbed's server namespace; clients
connect from the client namespace (198.18.0.16-31: low 4 bits 0..15) through
the real kernel (NAT rules, or a SO_REUSEPORT group). Nothing is mocked.
Every answer of the probe app names the worker that served it (pid, slot,
generation), which is checked against `ipservectl status --json`.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import threading
import time

import pytest

import netns
from backends import backend_unavailable, routed_workers, slot_of
from netns import HttpClient, http_json, ws_connect

PORT = 8000
WORKERS = 2
RETIRED_NICE = 10                       # the default of retired_nice
BACKENDS = ["nft", "iptables", "iptc", "reuseport"]
NAT_BACKENDS = ["nft", "iptables", "iptc"]


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #

@pytest.fixture
def backend(request) -> str:
    why = backend_unavailable(request.param)
    if why:
        pytest.skip(why)
    return request.param


def backends(*kinds: str):
    return pytest.mark.parametrize("backend", list(kinds), indirect=True)


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def wait_routed(srv, workers: int = WORKERS, generation: int | None = None,
                timeout: float = 30) -> tuple[dict, dict]:
    """Wait until every slot is routed to its one active worker (of `generation`).
    Returns (status, {slot: worker})."""
    gen = "" if generation is None else f" of generation {generation}"
    st = srv.wait_for(lambda st: routed_workers(st, workers, generation) is not None,
                      timeout=timeout, what=f"{workers} slots routed to active workers{gen}")
    return st, routed_workers(st, workers, generation)


def wait_reload(srv, generation: int, state: str = "done", timeout: float = 30) -> dict:
    def ok(st):
        r = st.get("reload") or {}
        return r.get("generation") == generation and r.get("state") == state
    return srv.wait_for(ok, timeout=timeout, what=f"reload to generation {generation}: {state}")


def serve(ipserve, backend: str, *, workers: int = WORKERS, app: str = netns.PROBE_APP,
          extra=(), **kwargs):
    """Start ipserve and wait until every slot is routed. Returns (proc, {slot: worker})."""
    args = [app, "-w", str(workers), "--router", backend, "--graceful-timeout", "5",
            "-b", f"0.0.0.0:{PORT}", *extra]
    srv = ipserve(args, **kwargs)
    st, table = wait_routed(srv, workers, generation=1)
    assert st["master"]["generation"] == 1
    return srv, table


def take_over(ipserve, old, backend: str, *, workers: int = WORKERS,
              app: str = netns.PROBE_APP, extra=()):
    """A second master with the same name and runtime directory as `old`
    (tracked by the fixture: killed with its workers at teardown; its log is
    ipserve-NAME-2.log)."""
    args = [app, "-w", str(workers), "--router", backend, "--graceful-timeout", "5",
            "-b", f"0.0.0.0:{PORT}", *extra]
    return ipserve(args, name=old.name, runtime_dir=old.runtime_dir)


def assert_pinned(tb, table: dict[int, dict], generation: int, *, workers: int = WORKERS,
                  rounds: int = 1, version=None) -> None:
    """Fresh connections from every client address land on the active worker
    of their slot, of `generation`."""
    for _ in range(rounds):
        for src in tb.client_ips:
            data = http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=10)
            slot = slot_of(src, workers)
            where = f"request from {src} (slot {slot}): {data}"
            assert data["remote_addr"] == src, where
            assert data["worker"]["slot"] == slot, where
            assert data["worker"]["generation"] == generation, where
            assert data["pid"] == data["worker"]["pid"] == table[slot]["pid"], where
            if version is not None:
                assert data.get("version") == version, where


def proc_nice(pid: int) -> int:
    """Field 19 (nice) of /proc/PID/stat: the process's (main thread's) nice value."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2:].split()[16])


def worker(st: dict, pid: int) -> dict | None:
    return next((w for w in st.get("workers") or [] if w["pid"] == pid), None)


def wait_gone(srv, pids, timeout: float = 30) -> None:
    for pid in pids:
        srv.note_worker_pid(pid)
    srv.wait_workers_gone(timeout, pids=pids)


def ws_echo(ws, msg: str = "ping") -> None:
    ws.send(msg)
    assert ws.recv() == msg


def ws_close_code(ws, timeout: float = 15) -> int:
    """Wait for the server's close frame; returns its status code."""
    from websocket import ABNF

    ws.settimeout(timeout)
    opcode, frame = ws.recv_data_frame(True)
    assert opcode == ABNF.OPCODE_CLOSE, (opcode, frame)
    assert len(frame.data) >= 2, f"close frame without a status code: {frame.data!r}"
    return struct.unpack("!H", frame.data[:2])[0]


class Load:
    """Steady load from every client address: per address one thread making
    requests on fresh connections and one keep-alive client, in a bounded loop
    (`limit` seconds at most). Every failure is counted: refused, reset,
    timed out, a keep-alive connection closed without `Connection: close`,
    a non-200 answer, an answer from the wrong slot or address.

    The keep-alive clients reconnect only after a response that said
    `Connection: close` (HTTP/1.1: the server announced it): http.client
    drops the connection on such a response and opens a new one for the next
    request; a connection the server closes unannounced makes the next
    request fail, and that is counted."""

    def __init__(self, tb, workers: int, limit: float = 90.0, pace: float = 0.005,
                 sources=None):
        self.tb, self.workers, self.limit, self.pace = tb, workers, limit, pace
        self.sources = list(tb.client_ips if sources is None else sources)
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.ok = 0
        self.announced_closes = 0
        # (kind, src) -> [(monotonic time sent, time answered, generation, pid)]
        self.answers: dict[tuple[str, str], list[tuple[float, float, int, int]]] = {}
        self.clients: dict[str, HttpClient] = {}
        self.threads = [threading.Thread(target=self._guard, args=(fn, src), daemon=True)
                        for src in self.sources for fn in (self._fresh, self._keepalive)]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _fail(self, what: str) -> None:
        now = time.time()
        stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now * 1000) % 1000:03d}"
        with self.lock:
            self.failures.append(f"{stamp} {what}")

    def _check(self, kind: str, src: str, sent: float, status: int, body: bytes) -> None:
        if status != 200:
            self._fail(f"{kind} {src}: HTTP {status} {body[:100]!r}")
            return
        data = json.loads(body)
        w = data["worker"]
        if data["remote_addr"] != src or w["slot"] != slot_of(src, self.workers):
            self._fail(f"{kind} {src}: answered by the wrong worker: {data}")
            return
        with self.lock:
            self.ok += 1
            self.answers.setdefault((kind, src), []).append(
                (sent, time.monotonic(), w["generation"], data["pid"]))

    def _guard(self, fn, src: str) -> None:
        try:
            fn(src)
        except BaseException as exc:       # noqa: BLE001 - a dead thread is a failure
            self._fail(f"load thread for {src} died: {exc!r}")

    def _running(self, deadline: float) -> bool:
        return not self.halt.is_set() and time.monotonic() < deadline

    def _fresh(self, src: str) -> None:
        tb, deadline = self.tb, time.monotonic() + self.limit
        while self._running(deadline):
            try:
                sent = time.monotonic()
                status, _, body = netns.http_get(tb.client_ns, src, tb.server_ip, PORT, "/",
                                                 timeout=15)
                self._check("fresh", src, sent, status, body)
            except Exception as exc:        # noqa: BLE001 - counted
                self._fail(f"fresh {src}: {exc!r}")
            time.sleep(self.pace)

    def _keepalive(self, src: str) -> None:
        tb, deadline = self.tb, time.monotonic() + self.limit
        client = None
        try:
            while self._running(deadline):
                try:
                    if client is None:
                        client = HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=15,
                                            auto_reconnect=True)
                        self.clients[src] = client
                    sent = time.monotonic()
                    status, headers, body = client.request("/")
                    self._check("keepalive", src, sent, status, body)
                    if headers.get("connection", "").lower() == "close":
                        with self.lock:
                            self.announced_closes += 1
                except Exception as exc:    # noqa: BLE001 - counted
                    self._fail(f"keepalive {src}: {exc!r}")
                    if client is not None:
                        client.close()
                    client = None           # start over on a fresh connection
                time.sleep(self.pace)
        finally:
            if client is not None:
                client.close()

    # -- observing --
    def last(self, kind: str, src: str) -> tuple[float, float, int, int] | None:
        with self.lock:
            got = self.answers.get((kind, src))
            return got[-1] if got else None

    def wait(self, predicate, timeout: float = 30, what: str = "load condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; "
                                     f"failures so far: {self.failures[:10]}")
            if not any(t.is_alive() for t in self.threads):
                raise AssertionError(f"load threads ended before {what}")
            time.sleep(0.05)

    def wait_answers_since(self, since: float, generation: int | None = None,
                           timeout: float = 30) -> None:
        """Until every thread has an answer after `since` (of `generation`)."""
        keys = [(k, src) for src in self.sources for k in ("fresh", "keepalive")]

        def ok():
            for key in keys:
                last = self.last(*key)
                if last is None or last[0] < since or (generation is not None
                                                       and last[2] != generation):
                    return False
            return True
        gen = "" if generation is None else f" from generation {generation}"
        self.wait(ok, timeout, f"an answer{gen} to every load thread")

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(30)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"


# --------------------------------------------------------------------------- #
# HUP under load
# --------------------------------------------------------------------------- #

@backends(*BACKENDS)
def test_hup_under_load_drops_nothing(testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    old_pids = [w["pid"] for w in table.values()]
    load = Load(tb, WORKERS).start()
    try:
        load.wait_answers_since(0.0, generation=1)          # load flows on generation 1
        hup_at = time.monotonic()
        srv.send_signal(signal.SIGHUP)
        st = wait_reload(srv, generation=2)
        assert st["master"]["generation"] == 2
        st, new = wait_routed(srv, generation=2)
        switched_at = time.monotonic()          # status said every slot is switched
        # Every client, fresh and keep-alive, moves to the new generation: the
        # keep-alive ones after their retiring worker answered `Connection: close`.
        load.wait_answers_since(switched_at, generation=2)
        # The old generation exits by itself once its connections are gone.
        wait_gone(srv, old_pids)
        load.wait_answers_since(time.monotonic(), generation=2)
    finally:
        load.stop()
    assert load.failures == [], (f"{len(load.failures)} failures of {load.ok + len(load.failures)} "
                                 f"requests across the reload: {load.failures[:10]}")
    # The keep-alive connections to the old workers were closed with notice,
    # at least one per address (the client reconnected then, not before).
    connects = {src: c.connects for src, c in load.clients.items()}
    assert all(n >= 2 for n in connects.values()), connects
    assert load.announced_closes >= sum(n - 1 for n in connects.values())
    # Every thread was answered by both generations: by generation 2 only
    # after the HUP, by generation 1 never for a request sent after status
    # said the reload was done.
    for key, answers in load.answers.items():
        gens = [g for _, _, g, _ in answers]
        assert gens[0] == 1 and gens[-1] == 2, (key, gens[:3], gens[-3:])
        assert all(sent > hup_at for sent, _, g, _ in answers if g == 2), key
        late = [(round(sent - switched_at, 3), pid) for sent, _, g, pid in answers
                if g == 1 and sent > switched_at]
        assert late == [], f"{key}: generation 1 took requests sent after the switch: {late[:5]}"
        if backend != "reuseport":
            # NAT: the route switch is one atomic rule write, so a thread that
            # reached generation 2 never goes back (reuseport: both generations
            # accept from the slot's one queue until the old worker hears
            # it is retired).
            assert gens == sorted(gens), f"{key}: generation 1 answered after generation 2"
    st = srv.status()
    r = st["reload"]
    assert r["state"] == "done" and r["error"] is None and r["seconds"] > 0
    print(f"\n[{backend}] HUP: {load.ok} requests, 0 failed; reload took {r['seconds']}s "
          f"(status reload.seconds); {load.announced_closes} keep-alive closes announced")
    assert {w["pid"] for w in st["workers"]} == {w["pid"] for w in new.values()}
    assert all(w["state"] == "active" and w["generation"] == 2 for w in st["workers"])
    assert_pinned(tb, new, generation=2)


# --------------------------------------------------------------------------- #
# WebSocket across HUP, master SIGKILL, new master, kill-retired
# --------------------------------------------------------------------------- #

@backends(*BACKENDS)
def test_websocket_survives_reload_and_master_death_until_kill_retired(
        testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    src = tb.client_ips[1]                                    # slot 1
    ws = ws_connect(tb.client_ns, src, tb.server_ip, PORT, "/ws", timeout=10)
    try:
        ws_echo(ws, "before")
        holder = table[1]
        srv.wait_for(lambda st: worker(st, holder["pid"])["connections"] == 1, timeout=10,
                     what="the WebSocket to be counted by slot 1's worker")

        # HUP: the WebSocket stays on its (now retiring, reniced) worker.
        srv.send_signal(signal.SIGHUP)
        wait_reload(srv, generation=2)
        st, gen2 = wait_routed(srv, generation=2)
        w = worker(st, holder["pid"])
        assert w["state"] == "retiring" and w["generation"] == 1 and w["connections"] == 1, w
        assert w["nice"] == RETIRED_NICE and proc_nice(holder["pid"]) == RETIRED_NICE, w
        ws_echo(ws, "after HUP")
        # Slot 0's old worker held nothing: it exits by itself.
        wait_gone(srv, [table[0]["pid"]])
        assert netns._is_alive(holder["pid"])
        assert_pinned(tb, gen2, generation=2)

        # The master dies (SIGKILL): workers go on serving.
        srv.kill_master()
        ws_echo(ws, "no master")
        assert http_json(tb.client_ns, tb.client_ips[2], tb.server_ip, PORT)["pid"] == gen2[0]["pid"]

        # A new master of the same name adopts every worker with its generation...
        new = take_over(ipserve, srv, backend)
        expected = {holder["pid"]: (1, "retiring"),
                    gen2[0]["pid"]: (2, "active"), gen2[1]["pid"]: (2, "active")}

        def adopted_all(st):
            seen = {w["pid"]: (w["generation"], w["state"]) for w in st["workers"] if w["adopted"]}
            return seen == expected
        st = new.wait_for(adopted_all, timeout=30, what=f"adoption of {expected}")
        assert st["master"]["pid"] == new.pid
        # ... starts a fresh generation and retires the adopted active workers.
        wait_reload(new, generation=3)
        st, gen3 = wait_routed(new, generation=3)
        wait_gone(new, [gen2[0]["pid"], gen2[1]["pid"]])
        st = new.wait_for(lambda st: worker(st, holder["pid"])["connections"] == 1, timeout=10,
                          what="the adopted worker to report its WebSocket")
        assert st["master"]["generation"] == 3
        w = worker(st, holder["pid"])
        assert w is not None and w["adopted"] and w["generation"] == 1, w
        assert w["state"] == "retiring" and w["connections"] == 1 and w["nice"] == RETIRED_NICE, w
        assert proc_nice(holder["pid"]) == RETIRED_NICE
        ws_echo(ws, "adopted")
        assert_pinned(tb, gen3, generation=3)

        # kill-retired: the WebSocket is closed with 1001 (going away). The
        # signal and the ipservectl command are the same request; use both.
        if backend in ("nft", "iptc"):
            new.send_signal(signal.SIGUSR1)
        else:
            new.ctl("kill-retired")                      # exits 0 or raises
        assert ws_close_code(ws) == 1001
        wait_gone(new, [holder["pid"]])
        st = new.status()
        assert {w["pid"] for w in st["workers"]} == {w["pid"] for w in gen3.values()}
    finally:
        ws.close()


# --------------------------------------------------------------------------- #
# Retirement: renice, drain, exit when the last connection closes
# --------------------------------------------------------------------------- #

@backends(*BACKENDS)
def test_retiring_workers_reniced_and_exit_when_drained(testbed, ipserve, backend):
    tb = testbed
    nice = 7
    srv, table = serve(ipserve, backend, extra=["--retired-nice", str(nice)])
    # Slot 0: a keep-alive connection and a WebSocket; slot 1: a WebSocket.
    keep = HttpClient(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, timeout=10)
    ws0 = ws_connect(tb.client_ns, tb.client_ips[2], tb.server_ip, PORT, "/ws", timeout=10)
    ws1 = ws_connect(tb.client_ns, tb.client_ips[3], tb.server_ip, PORT, "/ws", timeout=10)
    try:
        assert keep.json("/")["pid"] == table[0]["pid"]
        ws_echo(ws0)
        ws_echo(ws1)
        srv.wait_for(lambda st: [worker(st, table[s]["pid"])["connections"] for s in (0, 1)]
                     == [2, 1], timeout=10, what="slot 0 to hold 2 connections, slot 1 one")
        srv.ctl("reload")                                   # ipservectl reload = HUP
        wait_reload(srv, generation=2)
        st, new = wait_routed(srv, generation=2)
        for slot in (0, 1):
            pid = table[slot]["pid"]
            w = worker(st, pid)
            assert w["state"] == "retiring" and w["generation"] == 1, w
            assert w["nice"] == nice and proc_nice(pid) == nice, w
            assert w["retired_for_s"] is not None and w["retired_for_s"] >= 0, w
        for w in new.values():
            assert w["nice"] == 0 and proc_nice(w["pid"]) == 0, w
        # Held connections are still served by their old worker.
        ws_echo(ws0)
        ws_echo(ws1)
        # A keep-alive request is answered, with notice that the connection ends.
        status, headers, body = keep.request("/")
        assert status == 200 and json.loads(body)["pid"] == table[0]["pid"]
        assert headers.get("connection", "").lower() == "close", headers
        # Slot 1's last connection closes: it exits; slot 0 still holds ws0.
        ws1.close()
        wait_gone(srv, [table[1]["pid"]])
        assert netns._is_alive(table[0]["pid"])
        st = srv.wait_for(lambda st: worker(st, table[0]["pid"])["connections"] == 1, timeout=10,
                          what="slot 0's retiring worker to hold only the WebSocket")
        assert worker(st, table[1]["pid"]) is None
        ws_echo(ws0)
        ws0.close()
        wait_gone(srv, [table[0]["pid"]])
        st = srv.status()
        assert sorted(w["pid"] for w in st["workers"]) == sorted(w["pid"] for w in new.values())
    finally:
        keep.close()
        ws0.close()
        ws1.close()


# --------------------------------------------------------------------------- #
# A reload that cannot import the app costs nothing
# --------------------------------------------------------------------------- #

@backends(*BACKENDS)
def test_syntax_error_reload_keeps_old_generation(testbed, ipserve, backend, tmp_path):
    tb = testbed
    appdir = tmp_path / "app"
    appdir.mkdir()
    app_file = appdir / "probe_copy.py"
    source = open(netns.PROBE_APP_PATH).read()
    app_file.write_text(source)
    srv, table = serve(ipserve, backend, app=f"{app_file}:application")
    assert_pinned(tb, table, generation=1)

    app_file.write_text(source + "\ndef broken(:\n")
    srv.send_signal(signal.SIGHUP)
    st = wait_reload(srv, generation=2, state="failed")
    error = st["reload"]["error"]
    assert error and ("SyntaxError" in error or "syntax" in error.lower()), st["reload"]
    st, same = wait_routed(srv, generation=1)
    assert {s: w["pid"] for s, w in same.items()} == {s: w["pid"] for s, w in table.items()}
    assert not [w for w in st["workers"] if w["generation"] != 1], st["workers"]
    assert all(w["state"] == "active" for w in st["workers"])
    assert srv.running()
    assert_pinned(tb, table, generation=1)

    # Fixed (and visibly new code): the next HUP succeeds.
    marker = '"worker": environ.get("ipserve.worker")}'
    assert marker in source
    app_file.write_text(source.replace(marker, '"worker": environ.get("ipserve.worker"), '
                                               '"version": 2}'))
    srv.send_signal(signal.SIGHUP)
    st = wait_reload(srv, generation=3)
    assert st["reload"]["error"] is None
    st, new = wait_routed(srv, generation=3)
    wait_gone(srv, [w["pid"] for w in table.values()])
    st = srv.status()
    assert all(w["generation"] == 3 and w["state"] == "active" for w in st["workers"]), st["workers"]
    assert_pinned(tb, new, generation=3, version=2)


# --------------------------------------------------------------------------- #
# TTIN / TTOU
# --------------------------------------------------------------------------- #

@backends(*NAT_BACKENDS)
def test_ttin_doubles_and_ttou_halves_workers(testbed, ipserve, backend):
    tb = testbed
    srv, table = serve(ipserve, backend)
    assert_pinned(tb, table, generation=1, workers=2)
    srv.send_signal(signal.SIGTTIN)
    st = wait_reload(srv, generation=2)
    assert st["slots"] == 4 and st["reload"]["slots"] == 4
    st, four = wait_routed(srv, workers=4, generation=2)
    wait_gone(srv, [w["pid"] for w in table.values()])
    assert_pinned(tb, four, generation=2, workers=4)        # slot == address & 3
    assert len({w["pid"] for w in four.values()}) == 4

    srv.send_signal(signal.SIGTTOU)
    st = wait_reload(srv, generation=3)
    assert st["slots"] == 2
    st, two = wait_routed(srv, workers=2, generation=3)
    wait_gone(srv, [w["pid"] for w in four.values()])
    st = srv.status()
    assert len(st["workers"]) == 2
    assert_pinned(tb, two, generation=3, workers=2)


@backends("reuseport")
def test_ttin_reuseport_keeps_worker_count(testbed, ipserve, backend):
    """reuseport cannot resize its group while running (documented): TTIN
    reloads with the same worker count and says so; nothing is dropped."""
    tb = testbed
    srv, table = serve(ipserve, backend)
    srv.send_signal(signal.SIGTTIN)
    st = wait_reload(srv, generation=2)
    assert st["slots"] == 2
    st, new = wait_routed(srv, workers=2, generation=2)
    wait_gone(srv, [w["pid"] for w in table.values()])
    assert_pinned(tb, new, generation=2, workers=2)


# --------------------------------------------------------------------------- #
# Takeover of a running master
# --------------------------------------------------------------------------- #

@backends(*BACKENDS)
def test_takeover_of_running_master_adopts_its_workers(testbed, ipserve, backend):
    tb = testbed
    old, table = serve(ipserve, backend)
    old_pids = sorted(w["pid"] for w in table.values())
    load = Load(tb, WORKERS).start()
    try:
        load.wait_answers_since(0.0, generation=1)
        new = take_over(ipserve, old, backend)
        # The old master hands over and exits, leaving its workers alone.
        try:
            rc = old.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise old.error("the old master did not exit on takeover") from None
        assert rc == 0, old.log_tail()
        assert all(netns._is_alive(pid) for pid in old_pids)
        load.wait_answers_since(time.monotonic(), generation=1)   # still served by them

        def adopted(st):
            return sorted(w["pid"] for w in st["workers"]
                          if w["adopted"] and w["generation"] == 1) == old_pids
        st = new.wait_for(adopted, timeout=30, what=f"adoption of {old_pids}")
        assert st["master"]["pid"] == new.pid
        # The new master starts a fresh generation; the adopted workers retire and go.
        wait_reload(new, generation=2)
        st, gen2 = wait_routed(new, generation=2)
        load.wait_answers_since(time.monotonic(), generation=2)
        wait_gone(new, old_pids)
    finally:
        load.stop()
    assert load.failures == [], (f"{len(load.failures)} failures of {load.ok + len(load.failures)} "
                                 f"requests across the takeover: {load.failures[:10]}")
    st = new.status()
    assert sorted(w["pid"] for w in st["workers"]) == sorted(w["pid"] for w in gen2.values())
    assert_pinned(tb, gen2, generation=2)
