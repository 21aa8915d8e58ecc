"""End-to-end tests of the master's lifecycle guarantees (issue 8).

The real `ipserve` command runs in the testbed's server namespace with the nft
router; clients in the client namespace (198.18.0.16-31: low 4 bits 0..15)
reach it through the real kernel. Small apps in tests/apps/life_*.py misbehave
on purpose, in one slot only, while a marker file exists: they fail or hang at
import, crash, sleep through their boot, leave orphans behind. Every answer of
the probe app names the worker that served it (pid, slot, generation).

What is asserted is what a client or an operator can observe: which worker
pid answers each client, `ipservectl status --json`, processes in /proc,
exit codes, log lines, WebSocket close codes, the kernel's nft tables. Waits
are generous bounded polls; no test compares a duration with a threshold
(the fork-storm test bounds a count that only a backing-off master can meet).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import netns
from backends import backend_unavailable, slot_of, which
from netns import http_get, http_json, tcp_connect, ws_connect, ws_ending
from test_generations import (Load, assert_pinned, take_over, wait_gone, wait_reload,
                              wait_routed, ws_echo)

PORT = 8000
APPS = os.path.join(netns.REPO_ROOT, "tests", "apps")
NO_NFT = backend_unavailable("nft")

pytestmark = pytest.mark.skipif(NO_NFT is not None, reason=NO_NFT or "")


def app(name: str) -> str:
    return os.path.join(APPS, name) + ":application"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

def start(ipserve, workers: int, app_spec: str = netns.PROBE_APP, extra=(), *,
          wait: bool = True, port: int = PORT, router: str = "nft", **kwargs):
    """ipserve with the nft router (or `router`) on `port`, debug log (spawns are logged).
    With `wait`, waits until every slot is routed to its generation-1 worker.
    Returns (process, {slot: worker status} or None)."""
    args = [app_spec, "-w", str(workers), "--router", router, "-b", f"0.0.0.0:{port}",
            "--log-level", "debug", *map(str, extra)]
    srv = ipserve(args, **kwargs)
    if not wait:
        return srv, None
    _, table = wait_routed(srv, workers, generation=1, timeout=60)
    return srv, table


def slot_addrs(tb, slot: int, workers: int) -> list[str]:
    return [a for a in tb.client_ips if slot_of(a, workers) == slot]


def log_matches(srv, pattern: str) -> list[re.Match]:
    rx = re.compile(pattern)
    return [m for m in map(rx.search, srv.own_lines()) if m]


def wait_matches(srv, pattern: str, timeout: float = 30, count: int = 1) -> list[re.Match]:
    """Bounded wait until `count` log lines match `pattern` (regex)."""
    deadline = time.monotonic() + timeout
    while True:
        found = log_matches(srv, pattern)
        if len(found) >= count:
            return found
        if not srv.running():
            raise srv.error(f"the master exited; {len(found)} log line(s) match {pattern!r}")
        if time.monotonic() > deadline:
            raise srv.error(f"{len(found)} log line(s) match {pattern!r} after {timeout}s, "
                            f"expected {count}")
        time.sleep(0.05)


SPAWNED = r"spawned worker pid (\d+): slot (\d+), generation (\d+)"


def spawned(srv, slot: int | None = None, generation: int | None = None) -> list[int]:
    """Pids of the workers the master says it spawned (debug log), in order."""
    return [int(m[1]) for m in log_matches(srv, SPAWNED)
            if (slot is None or int(m[2]) == slot)
            and (generation is None or int(m[3]) == generation)]


def nft_ruleset(ns: str) -> str:
    return netns.call_in(ns, [which("nft"), "list", "ruleset"]).stdout


def worker_processes(ns: str) -> dict[int, str]:
    """Every ipserve worker process alive in namespace `ns`: pid -> its command
    line (the spawn spec before it is ready, its process title after)."""
    out = {}
    for pid in netns.ns_pids(ns):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
        except OSError:
            continue
        if ("ipserve.worker" in cmd or cmd.startswith("ipserve: worker")) and netns._is_alive(pid):
            out[pid] = cmd
    return out


def wait_until(predicate, timeout: float, what, interval: float = 0.05):
    """Poll `predicate` until it returns something true (returned); `what`
    (a string, or a callable giving one) names it when the wait times out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for "
                                 f"{what() if callable(what) else what}")
        time.sleep(interval)


def pidfd_signal(pid: int, sig: int) -> None:
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def worker_of(st: dict, pid: int) -> dict | None:
    return next((w for w in st.get("workers") or [] if w["pid"] == pid), None)


# --------------------------------------------------------------------------- #
# 1, 2. A reload that fails in one slot switches nothing, under load
# --------------------------------------------------------------------------- #

def _partial_reload_keeps_old_generation(tb, ipserve, tmp_path, app_name: str, extra,
                                         expected_error: str) -> None:
    workers = 4
    marker = tmp_path / "marker"
    srv, table = start(ipserve, workers, app(app_name), ["--graceful-timeout", "5", *extra],
                       env={"LIFE_MARKER": marker})
    pids = {slot: w["pid"] for slot, w in table.items()}
    routes = srv.status()["routes"]
    load = Load(tb, workers).start()
    try:
        load.wait_answers_since(0.0, generation=1)
        marker.touch()
        srv.send_signal(signal.SIGHUP)
        st = wait_reload(srv, generation=2, state="failed", timeout=60)
        r = st["reload"]
        failed = r["failed_worker"]
        assert failed is not None and failed["slot"] == 1, r
        assert expected_error in r["error"], r
        assert expected_error in failed["error"], r
        assert failed["pid"] in spawned(srv, slot=1, generation=2), (failed, srv.own_lines()[-30:])
        # Every successor is ended: gone from status and from the kernel's process list.
        gen2 = spawned(srv, generation=2)
        assert gen2, "no generation 2 worker was ever spawned"
        wait_gone(srv, gen2)
        st = srv.wait_for(lambda st: all(w["generation"] == 1 for w in st["workers"]),
                          timeout=30, what="no generation 2 worker in status")
        assert not [p for p in gen2 if p in worker_processes(tb.server_ns)]
        # Nothing switched: same routes, same workers, same generation and count.
        st, same = wait_routed(srv, workers, generation=1)
        assert {slot: w["pid"] for slot, w in same.items()} == pids
        assert st["routes"] == routes
        assert st["master"]["generation"] == 1 and st["slots"] == workers
        assert all(w["state"] == "active" for w in st["workers"]), st["workers"]
        load.wait_answers_since(time.monotonic(), generation=1)
    finally:
        load.stop()
    assert load.failures == [], (f"{len(load.failures)} failures of {load.ok + len(load.failures)} "
                                 f"requests across the failed reload: {load.failures[:10]}")
    for (kind, src), answers in load.answers.items():
        served_by = {pid for *_, pid in answers}
        assert served_by == {pids[slot_of(src, workers)]}, (kind, src, served_by)
    assert log_matches(srv, r"reload to generation 2 failed, no slot switched; "
                            r"generation 1 keeps serving every slot")
    assert_pinned(tb, table, generation=1, workers=workers)

    # Fixed: the next reload succeeds, under a new number (2 is never reused).
    marker.unlink()
    srv.send_signal(signal.SIGHUP)
    st = wait_reload(srv, generation=3, timeout=60)
    assert st["reload"]["error"] is None and st["reload"]["failed_worker"] is None
    st, new = wait_routed(srv, workers, generation=3)
    assert st["master"]["generation"] == 3
    wait_gone(srv, list(pids.values()))
    assert_pinned(tb, new, generation=3, workers=workers)
    assert not [w for w in srv.status()["workers"] if w["generation"] == 2]


def test_partial_reload_failure_keeps_every_slot_on_old_generation(testbed, ipserve, tmp_path):
    """A HUP whose slot-1 worker raises at import switches no slot, ends every successor and drops no request."""
    _partial_reload_keeps_old_generation(testbed, ipserve, tmp_path, "life_partial.py", [],
                                         "life_partial refuses to boot slot 1 generation 2")


def test_reload_with_one_slot_past_boot_timeout_switches_nothing(testbed, ipserve, tmp_path):
    """A HUP whose slot-1 worker hangs at import fails at boot_timeout and switches no slot, under load."""
    _partial_reload_keeps_old_generation(testbed, ipserve, tmp_path, "life_hang.py",
                                         ["--boot-timeout", "3"],
                                         "not ready within boot_timeout (3s)")


# --------------------------------------------------------------------------- #
# 3. SIGINT in the middle of a large spawn
# --------------------------------------------------------------------------- #

def test_sigint_during_large_spawn_stops_everything(testbed, ipserve):
    """SIGINT right after the first of 64 workers is ready stops the spawn, every worker and the rules."""
    tb = testbed
    srv, _ = start(ipserve, 64, extra=["--spawn-interval", "0.05"], wait=False)
    try:
        wait_matches(srv, r"worker pid \d+ ready: slot \d+, generation 1", timeout=60)
    except netns.IpserveError:
        if not srv.running():
            pytest.fail(f"-w 64 refused on this machine: {srv.log_tail(5)}")
        raise
    assert f"table ip ipserve_{srv.name}" in nft_ruleset(tb.server_ns)
    sent = time.monotonic()
    srv.send_signal(signal.SIGINT)
    try:
        rc = srv.proc.wait(30)
    except subprocess.TimeoutExpired:
        raise srv.error("the master did not exit within 30s of SIGINT") from None
    exited = time.monotonic()
    assert rc == 0, srv.log_tail()
    # Every worker it ever spawned is gone, and nothing else is left in the namespace.
    pids = spawned(srv)
    assert pids
    wait_until(lambda: not netns.ns_pids(tb.server_ns), 30,
               lambda: f"the server namespace to empty; workers left: {worker_processes(tb.server_ns)}")
    print(f"\nSIGINT after {len(pids)} of 64 spawns: master exited {exited - sent:.2f}s later, "
          f"the namespace was empty {time.monotonic() - sent:.2f}s later")
    lines = srv.own_lines()
    at = next(i for i, line in enumerate(lines) if "received SIGINT" in line)
    late = [line for line in lines[at:] if re.search(SPAWNED, line)]
    assert late == [], f"workers spawned after SIGINT: {late}"
    assert len(pids) < 64, "the whole spawn ran before SIGINT was handled"
    assert f"ipserve_{srv.name}" not in nft_ruleset(tb.server_ns)


# --------------------------------------------------------------------------- #
# 4. Graceful TERM: held connections finish, WebSockets get 1001
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("router", ["nft", "iptables", "iptc", "reuseport"])
def test_graceful_term_sends_websocket_1001_then_exits_0(testbed, ipserve, router):
    """After TERM held connections are served until graceful_timeout (the NAT
    rules drain, they are not removed under them), then a WebSocket gets a 1001
    close frame; exit 0."""
    why = backend_unavailable(router)
    if why:
        pytest.skip(why)
    tb = testbed
    srv, table = start(ipserve, 2, extra=["--graceful-timeout", "2"], router=router)
    ws = ws_connect(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, "/ws", timeout=10)
    result: dict = {}

    def long_poll():
        try:
            result["answer"] = http_get(tb.client_ns, tb.client_ips[1], tb.server_ip, PORT,
                                        "/sleep?s=1", timeout=20)
        except Exception as exc:        # noqa: BLE001 - asserted below
            result["error"] = exc

    poller = threading.Thread(target=long_poll, daemon=True)
    try:
        ws_echo(ws, "before")
        srv.wait_for(lambda st: worker_of(st, table[0]["pid"])["connections"] == 1
                     and worker_of(st, table[1]["pid"]) is not None, timeout=10,
                     what="the WebSocket to be counted")
        poller.start()
        srv.wait_for(lambda st: worker_of(st, table[1]["pid"])["connections"] == 1, timeout=10,
                     what="the long poll to be held by slot 1's worker")
        srv.send_signal(signal.SIGTERM)
        wait_matches(srv, rf"\[{table[0]['pid']}\] .*stopping: 1 connection", timeout=10)
        ws_echo(ws, "during the graceful stop")       # held, not cut
        assert ws_ending(ws, timeout=15) == "close 1001"
        poller.join(30)
        assert "error" not in result, result
        status, _, body = result["answer"]
        assert status == 200 and json.loads(body)["pid"] == table[1]["pid"], result
        try:
            rc = srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            raise srv.error("the master did not exit after the graceful stop") from None
        assert rc == 0, srv.log_tail()
        srv.wait_workers_gone(30)
        if router == "nft":
            assert f"ipserve_{srv.name}" not in nft_ruleset(tb.server_ns)
        assert not log_matches(srv, r"still running at the deadline: SIGKILL")
    finally:
        ws.close()


# --------------------------------------------------------------------------- #
# 5. Stickiness at start: a slow slot's clients wait for their own worker
# --------------------------------------------------------------------------- #

class StartupClients:
    """One thread per client address making requests on fresh connections,
    retrying refused connections (before the master routes anything, the
    public port refuses). Records, per request, when the TCP connection was
    established, when the answer came, and what it said; per refusal, when
    the attempt began."""

    def __init__(self, tb, sources, limit: float = 120.0):
        self.tb, self.sources, self.limit = tb, list(sources), limit
        self.halt = threading.Event()
        self.lock = threading.Lock()
        self.answers: dict[str, list[tuple[float, float, int, dict]]] = {s: [] for s in sources}
        self.in_flight: dict[str, float | None] = {s: None for s in sources}
        self.refused: list[tuple[str, float]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(s,), daemon=True) for s in sources]

    def start(self) -> StartupClients:
        for t in self.threads:
            t.start()
        return self

    def _one(self, src: str) -> None:
        tb = self.tb
        attempt = time.monotonic()
        try:
            sock = tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=60)
        except ConnectionRefusedError:
            with self.lock:
                self.refused.append((src, attempt))
            time.sleep(0.02)
            return
        connected = time.monotonic()
        with self.lock:
            self.in_flight[src] = connected
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
            with self.lock:
                self.in_flight[src] = None
        answered = time.monotonic()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1]) if head.startswith(b"HTTP/1.") else 0
        if status != 200:
            raise AssertionError(f"HTTP {status}: {data[:200]!r}")
        with self.lock:
            self.answers[src].append((connected, answered, status, json.loads(body)))
        time.sleep(0.02)

    def _run(self, src: str) -> None:
        deadline = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < deadline:
            try:
                self._one(src)
            except Exception as exc:        # noqa: BLE001 - counted
                with self.lock:
                    self.failures.append(f"{src}: {exc!r}")
                time.sleep(0.1)

    def stop(self) -> None:
        self.halt.set()
        for t in self.threads:
            t.join(90)
        assert not any(t.is_alive() for t in self.threads), "client threads did not stop"


def test_slow_slot_clients_wait_for_their_own_worker_at_start(testbed, ipserve, tmp_path):
    """At start, clients of a slot whose worker is still importing wait for it; no other worker ever answers them."""
    tb = testbed
    workers = 4
    gate = tmp_path / "gate"
    srv, _ = start(ipserve, workers, app("life_slowslot.py"), wait=False,
                   env={"LIFE_GATE": gate})
    clients = StartupClients(tb, tb.client_ips).start()
    slow = slot_addrs(tb, 2, workers)
    try:
        # The three other slots serve; slot 2's worker is still importing and
        # each of its clients holds an established connection, waiting.
        st = srv.wait_for(lambda st: all(
            (h := worker_of(st, st["slot_table"][s]["holder"] or -1)) and h["state"] == "active"
            for s in (0, 1, 3)), timeout=60, what="slots 0, 1 and 3 active")
        wait_until(lambda: all(clients.answers[a] for a in tb.client_ips if a not in slow), 30,
                   "an answer to every client of slots 0, 1 and 3")
        wait_until(lambda: all(clients.in_flight[a] is not None for a in slow), 30,
                   "an established, unanswered connection from every client of slot 2")
        waiting_since = {a: clients.in_flight[a] for a in slow}
        st = srv.status()
        holder = worker_of(st, st["slot_table"][2]["holder"] or -1)
        assert holder is not None and holder["state"] == "booting", st["slot_table"][2]
        assert st["slot_table"][2]["waiting_s"] is not None, st["slot_table"][2]
        assert str(2) in st["routes"], st["routes"]          # routed from the start: it queues
        assert all(not clients.answers[a] for a in slow), {a: clients.answers[a] for a in slow}
        gate.touch()
        _, table = wait_routed(srv, workers, generation=1, timeout=60)
        since = time.monotonic()
        wait_until(lambda: all(any(c > since for c, *_ in clients.answers[a]) for a in tb.client_ips),
                   30, "an answer to every client after slot 2 became active")
    finally:
        clients.stop()
    assert clients.failures == [], clients.failures[:10]
    wrong = [(src, data) for src, answers in clients.answers.items() for *_, data in answers
             if data["worker"]["slot"] != slot_of(src, workers)
             or data["pid"] != table[slot_of(src, workers)]["pid"]
             or data["worker"]["generation"] != 1]
    assert wrong == [], f"answered by another slot's worker: {wrong[:5]}"
    # The connections made while slot 2 booted were answered by slot 2's worker.
    for src in slow:
        first = clients.answers[src][0]
        assert first[0] == waiting_since[src] and first[3]["pid"] == table[2]["pid"], (src, first)
    # Every slot was routed in one write: no connection attempted after any
    # connection was established was refused.
    first = min(c for answers in clients.answers.values() for c, *_ in answers)
    late = [(src, round(t - first, 3)) for src, t in clients.refused if t > first]
    assert late == [], f"refused after a connection was established: {late[:10]}"


# --------------------------------------------------------------------------- #
# 6. No fork storm when the code on disk no longer imports
# --------------------------------------------------------------------------- #

OBSERVE = 20.0       # seconds of crashing watched
MAX_ATTEMPTS = 7     # 1, 2, 4, 8 s apart: about 5 in 20 s; without back-off, dozens


def test_crashing_slot_backs_off_exponentially(testbed, ipserve, tmp_path):
    """A slot whose workers crash at import is respawned ever more slowly (no storm); the other slot serves on."""
    tb = testbed
    marker = tmp_path / "marker"
    srv, table = start(ipserve, 2, app("life_crash.py"), env={"LIFE_MARKER": marker})
    marker.touch()
    before = len(spawned(srv, slot=1))
    pidfd_signal(table[1]["pid"], signal.SIGKILL)
    stable = slot_addrs(tb, 0, 2)
    served, i = [], 0
    end = time.monotonic() + OBSERVE
    while time.monotonic() < end:
        data = http_json(tb.client_ns, stable[i % len(stable)], tb.server_ip, PORT, timeout=10)
        served.append(data["pid"])
        i += 1
        time.sleep(0.1)
    attempts = spawned(srv, slot=1)[before:]
    crashed = log_matches(srv, r"worker pid \d+ \(slot 1, generation 1, booting\) exited with status 1")
    print(f"\nslot 1: {len(attempts)} spawn attempts in {OBSERVE:g}s of crashing")
    assert len(attempts) >= 3, f"slot 1 was not retried: {srv.own_lines()[-20:]}"
    assert len(attempts) <= MAX_ATTEMPTS, f"{len(attempts)} spawns in {OBSERVE:g}s: no back-off"
    assert len(crashed) >= len(attempts) - 1, crashed
    assert log_matches(srv, r"slot 1: next worker in \d+s \(\d+ ended young in a row\)")
    st = srv.status()
    assert st["slot_table"][1]["failures"] >= 3, st["slot_table"][1]
    assert set(served) == {table[0]["pid"]}, set(served)
    assert worker_of(st, table[0]["pid"])["state"] == "active"

    # The code imports again: the next (backed-off) attempt takes the slot.
    marker.unlink()
    _, again = wait_routed(srv, 2, timeout=90)
    assert again[0]["pid"] == table[0]["pid"] and again[1]["pid"] not in (table[1]["pid"],)
    for src in slot_addrs(tb, 1, 2)[:3]:
        data = http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=30)
        assert data["pid"] == again[1]["pid"] and data["worker"]["slot"] == 1, data


# --------------------------------------------------------------------------- #
# 7. 0 disables a timeout or a limit; chdir
# --------------------------------------------------------------------------- #

def test_timeout_zero_never_kills_a_blocked_worker(testbed, ipserve):
    """With timeout = 0 a worker that blocks its hub (no heartbeat) for 3 s is neither signalled nor replaced."""
    tb = testbed
    srv, table = start(ipserve, 1, extra=["--timeout", "0"])
    pid = table[0]["pid"]
    data = http_json(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, "/block?s=3", timeout=30)
    assert data["pid"] == pid and data["blocked"] == 3, data
    # A few more ticks and heartbeats after the silence.
    srv.wait_for(lambda st: worker_of(st, pid) and worker_of(st, pid)["requests"] >= 1, timeout=10,
                 what="a heartbeat after the block")
    for src in tb.client_ips[:4]:
        assert http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=10)["pid"] == pid
    st = srv.status()
    assert [w["pid"] for w in st["workers"]] == [pid] and st["workers"][0]["state"] == "active"
    assert netns._is_alive(pid)
    assert not log_matches(srv, r"SIGABRT|no heartbeat|Fatal Python error"), srv.own_lines()[-20:]
    assert len(spawned(srv)) == 1


def long_path(total: int) -> str:
    """A path making the request line `GET <path> HTTP/1.1\\r\\n` exactly `total` bytes."""
    fixed = len("GET /? HTTP/1.1\r\n")
    return "/?" + "a" * (total - fixed)


def test_limit_request_line_zero_means_no_limit(testbed, ipserve):
    """limit_request_line = 0 accepts a 6000-byte request line that the default limit answers with 414."""
    tb = testbed
    _, dtable = start(ipserve, 1)
    _, utable = start(ipserve, 1, extra=["--limit-request-line", "0"], port=PORT + 1)
    # Two masters, two public ports: the second one listens on PORT + 1.
    assert dtable and utable
    path = long_path(6000)
    status, _, body = http_get(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, path, timeout=10)
    assert status == 414, (status, body[:200])
    status, _, body = http_get(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT + 1, path,
                               timeout=10)
    assert status == 200 and json.loads(body)["pid"] == utable[0]["pid"], (status, body[:200])


def test_keepalive_zero_closes_after_every_response(testbed, ipserve):
    """keepalive = 0: every response says Connection: close and the server closes the connection."""
    tb = testbed
    _, table = start(ipserve, 1, extra=["--keepalive", "0"])
    sock = tcp_connect(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, timeout=10)
    try:
        # HTTP/1.1 without "Connection: close": the client asks to keep it alive.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a response: {data!r}"
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 200"), lines
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        assert headers.get("connection", "").lower() == "close", headers
        length = int(headers["content-length"])
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "closed inside the body"
            body += chunk
        assert json.loads(body[:length])["pid"] == table[0]["pid"]
        # The server closes its end: EOF, not a wait for a next request.
        assert body[length:] == b"" and sock.recv(1) == b"", "the server kept the connection open"
    finally:
        sock.close()


def test_chdir_sets_the_workers_working_directory(testbed, ipserve, tmp_path):
    """--chdir DIR: the application runs with DIR as its working directory."""
    tb = testbed
    wd = tmp_path / "wd"
    wd.mkdir()
    _, table = start(ipserve, 1, app("life_cwd.py"), ["--chdir", wd])
    data = http_json(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, "/cwd", timeout=10)
    assert data["cwd"] == os.path.realpath(wd), data
    assert data["pid"] == table[0]["pid"]
    assert os.readlink(f"/proc/{data['pid']}/cwd") == os.path.realpath(wd)


# --------------------------------------------------------------------------- #
# 8. PID 1 reaps the orphans it inherits
# --------------------------------------------------------------------------- #

def proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        return {}
    return out


def pidns_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def pidns_members(ns_inode: int) -> dict[int, dict[str, str]]:
    """Every process (host pid -> /proc status) in the PID namespace `ns_inode`."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and pidns_of(int(entry)) == ns_inode:
            st = proc_status(int(entry))
            if st:
                out[int(entry)] = st
    return out


def test_master_as_pid1_reaps_orphaned_zombies(testbed, tmp_path):
    """As PID 1 of a PID namespace the master reaps the orphans its workers leave; no zombie remains."""
    tb = testbed
    name = netns.unique_name()
    workdir = tempfile.mkdtemp(prefix="ips-")
    tb.add_path(workdir)
    runtime_dir = os.path.join(workdir, "run")
    os.makedirs(runtime_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPSERVE_")}
    env.update(PYTHONPATH=netns.REPO_ROOT, PYTHONUNBUFFERED="1")
    log_path = tmp_path / f"ipserve-{name}.log"
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child",
            sys.executable, "-m", "ipserve.cli", app("life_pid1.py"), "-w", "2", "--router", "nft",
            "-b", f"0.0.0.0:{PORT}", "-n", name, "--runtime-dir", runtime_dir]
    ctl = [sys.executable, "-m", "ipserve.ctl", "-n", name, "--runtime-dir", runtime_dir]
    with open(log_path, "ab") as log:
        unshare = tb.run_in(tb.server_ns, argv, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=env, cwd=netns.REPO_ROOT,
                            start_new_session=True)
    master = None
    try:
        def status():
            proc = subprocess.run(netns.netns_argv(tb.server_ns, [*ctl, "status", "--json"]),
                                  capture_output=True, text=True, env=env, timeout=15,
                                  check=False)
            return json.loads(proc.stdout) if proc.returncode == 0 else None

        def serving():
            assert unshare.poll() is None, log_path.read_text()[-3000:]
            st = status()
            return st if st and st["master"]["serving"] else None

        st = wait_until(serving, 60, "the master in its PID namespace to serve", interval=0.2)
        assert st["master"]["pid"] == 1, st["master"]
        with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
            (master,) = [int(p) for p in f.read().split()]
        assert proc_status(master)["NSpid"].split()[-1] == "1"
        ns_inode = pidns_of(master)

        orphans = []
        for i in range(6):
            status_code, _, body = http_get(tb.client_ns, tb.client_ips[i], tb.server_ip, PORT,
                                            "/orphan?s=1", timeout=15)
            assert status_code == 200, body
            orphans.append(json.loads(body)["orphan"])
        # While they run, the orphans are the master's children (re-parented to PID 1).
        members = pidns_members(ns_inode)
        by_nspid = {int(st["NSpid"].split()[-1]): (pid, st) for pid, st in members.items()}
        adopted = [n for n in orphans if n in by_nspid and by_nspid[n][1]["PPid"] == str(master)]
        assert adopted, f"no orphan was seen re-parented to the master: {orphans}, {by_nspid.keys()}"

        def no_zombie():
            members = pidns_members(ns_inode)
            zombies = {p: st for p, st in members.items() if st["State"].startswith("Z")}
            left = [n for n in orphans if any(st["NSpid"].split()[-1] == str(n)
                                              for st in members.values())]
            return not zombies and not left
        wait_until(no_zombie, 20, "every orphan to be reaped (no zombie in the PID namespace)")
        assert unshare.poll() is None
        st = status()
        assert st and len([w for w in st["workers"] if w["state"] == "active"]) == 2, st

        # Graceful stop of PID 1: its workers go, then it (and the namespace) exits 0.
        pidfd_signal(master, signal.SIGTERM)
        assert unshare.wait(30) == 0, log_path.read_text()[-3000:]
        assert f"ipserve_{name}" not in nft_ruleset(tb.server_ns)
    finally:
        if unshare.poll() is None:
            if master is not None and netns._is_alive(master):
                pidfd_signal(master, signal.SIGKILL)    # PID 1 gone: the kernel kills the rest
            unshare.kill()
            unshare.wait(10)


# --------------------------------------------------------------------------- #
# 9. No master: a dead worker's slot refuses until a master returns
# --------------------------------------------------------------------------- #

def test_no_master_dead_worker_refused_until_new_master(testbed, ipserve):
    """With the master SIGKILLed, a killed worker's slot is refused; a new master serves it again, other slots throughout."""
    tb = testbed
    workers = 2
    srv, table = start(ipserve, workers, extra=["--graceful-timeout", "5"])
    lost = slot_addrs(tb, 1, workers)
    load = Load(tb, workers, sources=slot_addrs(tb, 0, workers)).start()
    probe_stop = threading.Event()
    probe: dict = {"refused": 0, "first_ok": None}

    def probe_slot1():
        while not probe_stop.is_set():
            try:
                tcp_connect(tb.client_ns, lost[0], tb.server_ip, PORT, timeout=2).close()
            except ConnectionRefusedError:
                probe["refused"] += 1
                time.sleep(0.01)
                continue
            except OSError:
                time.sleep(0.01)
                continue
            probe["first_ok"] = time.monotonic()
            return

    prober = threading.Thread(target=probe_slot1, daemon=True)
    try:
        load.wait_answers_since(0.0, generation=1)
        srv.kill_master()
        victim = table[1]["pid"]
        pidfd_signal(victim, signal.SIGKILL)
        wait_gone(srv, [victim])
        died = time.monotonic()
        for src in lost:
            with pytest.raises(ConnectionRefusedError):
                tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=5).close()
        prober.start()
        load.wait_answers_since(time.monotonic(), generation=1)   # slot 0 serves, no master
        assert probe["first_ok"] is None and probe["refused"] > 0

        new = take_over(ipserve, srv, "nft", workers=workers, extra=["--log-level", "debug"])
        launched = time.monotonic()
        prober.join(60)
        assert probe["first_ok"] is not None, "slot 1 was never reachable again"
        window_new = probe["first_ok"] - launched
        window_total = probe["first_ok"] - died
        print(f"\nslot 1 refused {probe['refused']} probes; reachable again "
              f"{window_new:.2f}s after the new master was launched "
              f"({window_total:.2f}s after its worker died, master-less on purpose meanwhile)")
        for src in lost[:3]:
            data = http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=60)
            assert data["worker"]["slot"] == 1 and data["pid"] != victim, data
        print(f"slot 1 served again by pid {data['pid']}, generation {data['worker']['generation']}")
        wait_reload(new, generation=2, timeout=60)
        _, gen2 = wait_routed(new, workers, generation=2, timeout=60)
        load.wait_answers_since(time.monotonic(), generation=2)
        wait_gone(new, [table[0]["pid"]])
    finally:
        probe_stop.set()
        load.stop()
    assert load.failures == [], (f"{len(load.failures)} failures of {load.ok + len(load.failures)} "
                                 f"slot-0 requests: {load.failures[:10]}")
    assert_pinned(tb, gen2, generation=2, workers=workers)


def test_rule_write_stuck_on_the_xtables_lock_holds_nothing_up(testbed, ipserve):
    """A reload whose rule write waits on the xtables lock: the master keeps answering, the
    kernel keeps routing the old generation, and the switch lands once the lock is free."""
    why = backend_unavailable("iptc")    # python-iptables takes /run/xtables.lock (iptables-nft does not)
    if why:
        pytest.skip(why)
    import fcntl
    tb = testbed
    srv, table = start(ipserve, 2, router="iptc")
    old_routes = srv.status()["routes"]
    lock = os.open("/run/xtables.lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        srv.send_signal(signal.SIGHUP)
        # The new generation boots and is committed; its rule write then waits on the lock.
        st = wait_reload(srv, generation=2)
        answered = 0
        for _ in range(10):      # a couple of seconds of it: status is answered throughout
            st = srv.status(timeout=5)
            answered += 1
            assert st["routes"] == old_routes, st["routes"]
            assert_pinned(tb, table, generation=1)
            time.sleep(0.2)
        assert any(w["generation"] == 2 and w["state"] == "ready" for w in st["workers"]), st
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    st, new = wait_routed(srv, 2, generation=2, timeout=60)
    assert st["routes"] != old_routes
    assert_pinned(tb, new, generation=2)
    print(f"status answered {answered} times while the rule write waited on the xtables lock")
