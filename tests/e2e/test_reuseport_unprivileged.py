"""The real `ipserve --router reuseport` with no privilege at all: no network
namespace, no kernel rule, no capability.

127.0.0.0/8 is local on every host's loopback, so a client socket may bind any
127.0.0.x source before connecting to 127.0.0.1: the 16 sources 127.0.0.16..31
(low bits 0..15) cover every slot. Run as root, the master is started as uid
65534 through setpriv (when that user can run this checkout's Python), so the
claim "reuseport needs nothing" is tested either way; run as a user, it runs as
that user. Every process is stopped by pidfd at teardown, even on failure
(the `loopback_ipserve` fixture).

Runs unprivileged: ``setpriv --reuid 65534 --regid 65534 --clear-groups
.venv/bin/python -m pytest -q tests/e2e/test_reuseport_unprivileged.py -p no:cacheprovider``
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys

import netns
from backends import routed_workers
from netns import LOOPBACK_SERVER, LOOPBACK_SOURCES, HttpClient, http_json

WORKERS = 4
NOBODY = 65534
LONGPOLL_APP = os.path.join(netns.REPO_ROOT, "examples", "longpoll.py") + ":application"


def expected_slot(source: str) -> int:
    """saddr & (workers - 1), from the address itself: for 127.0.0.x, its last octet."""
    return int(source.rsplit(".", 1)[1]) & (WORKERS - 1)


@functools.cache
def master_uid() -> int | None:
    """Who the master runs as: uid 65534 when the tests run as root and that user
    can run this interpreter and import ipserve from this checkout; else None
    (the test's own uid). A python under /root (pyenv) may be unreadable to it."""
    if os.geteuid() != 0:
        return None
    probe = ("import sys, ipserve; "
             "print(sys.prefix, sys.version_info >= (3, 11), ipserve.__file__)")
    proc = subprocess.run([*netns.setpriv_argv(NOBODY), sys.executable, "-c", probe],
                          check=False, capture_output=True, text=True, timeout=30,
                          cwd=netns.REPO_ROOT,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": netns.REPO_ROOT})
    if proc.returncode != 0 or proc.stdout.split()[:2] != [sys.prefix, "True"]:
        print(f"uid {NOBODY} cannot run {sys.executable} here; the master runs as root: "
              f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        return None
    return NOBODY


def real_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("Uid:")).split()[1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK_SERVER, 0))
        return sock.getsockname()[1]


def serve(loopback_ipserve, app: str = netns.PROBE_APP, extra=()) -> tuple:
    """Start the master on 127.0.0.1:<free port>; returns (srv, port, {slot: worker})
    once every slot is routed to an active worker of generation 1."""
    port = free_port()
    srv = loopback_ipserve([app, "--router", "reuseport", "-w", WORKERS,
                            "-b", f"{LOOPBACK_SERVER}:{port}", "--graceful-timeout", "5", *extra],
                           run_as=master_uid())
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS, 1) is not None, timeout=60,
                      what=f"{WORKERS} slots routed to active workers of generation 1")
    assert st["router"] == "reuseport", st["router"]
    return srv, port, routed_workers(st, WORKERS, 1)


def whoami(source: str, port: int) -> dict:
    """GET /whoami on a fresh connection from `source`."""
    return http_json(None, source, LOOPBACK_SERVER, port, "/whoami")


def assert_pinned(port: int, table: dict[int, dict], rounds: int = 3) -> None:
    """Every source, on every fresh connection, reaches its slot's worker and
    that worker sees the client's own address."""
    for _ in range(rounds):
        for source in LOOPBACK_SOURCES:
            answer = whoami(source, port)
            want = table[expected_slot(source)]["pid"]
            assert (answer["pid"], answer["remote_addr"]) == (want, source), (source, answer)


def test_sources_pin_to_their_slot_and_a_held_connection_survives_a_reload(loopback_ipserve):
    srv, port, table = serve(loopback_ipserve, extra=["--keepalive", "300"])
    expected_uid = os.geteuid() if master_uid() is None else master_uid()
    assert {real_uid(w["pid"]) for w in table.values()} | {real_uid(srv.pid)} == {expected_uid}
    assert len({w["pid"] for w in table.values()}) == WORKERS
    assert_pinned(port, table)

    # The status shows what the workers counted as of their last heartbeat, and when that was.
    served = 3 * len(LOOPBACK_SOURCES)
    st = srv.wait_for(lambda st: sum(w["requests"] for w in st["workers"]) == served, timeout=30,
                      what=f"the {served} requests counted in the status")
    assert all(w["heartbeat_age_s"] >= 0 for w in st["workers"]), st["workers"]
    table_text = srv.ctl("status").stdout
    assert "beat_s" in table_text and "last heartbeat" in table_text, table_text

    # A keep-alive connection from slot 1's first source, held across a HUP.
    source = LOOPBACK_SOURCES[1]
    slot = expected_slot(source)
    with HttpClient(None, source, LOOPBACK_SERVER, port) as held:
        before = json.loads(held.get("/whoami")[2])
        assert before["pid"] == table[slot]["pid"]

        srv.send_signal(signal.SIGHUP)
        st = srv.wait_for(lambda st: routed_workers(st, WORKERS, 2) is not None, timeout=60,
                          what=f"{WORKERS} slots routed to active workers of generation 2")
        new = routed_workers(st, WORKERS, 2)
        assert not {w["pid"] for w in new.values()} & {w["pid"] for w in table.values()}
        holder = table[slot]["pid"]
        srv.wait_for(lambda st: any((w["pid"], w["state"], w["connections"]) == (holder, "retiring", 1)
                                    for w in st["workers"]),
                     timeout=30, what=f"worker {holder} retiring with the held connection")

        # New connections go to the new generation, still by source address...
        assert_pinned(port, new, rounds=1)
        # ...while the held one is still served by its old worker (which then
        # closes it: a retiring worker keeps no connection alive for longer).
        status, headers, body = held.get("/whoami")
        assert status == 200 and json.loads(body)["pid"] == before["pid"], (status, body)
        assert headers.get("connection") == "close", headers

    # The old generation exits on its own once it holds nothing.
    srv.wait_workers_gone(timeout=30, pids=[w["pid"] for w in table.values()])
    assert srv.stop() == 0
    srv.wait_workers_gone(timeout=30)


def test_longpoll_example_answers_by_session(loopback_ipserve):
    """examples/longpoll.py, as `./run example` serves it to a user without
    privilege: a session lives in the worker that made it. A made-up id is 404
    (not a routing fault); an id made by another worker is 409 and names it."""
    srv, port, table = serve(loopback_ipserve, app=LONGPOLL_APP)
    by_slot = {expected_slot(s): s for s in LOOPBACK_SOURCES[:WORKERS]}
    joined = {slot: http_json(None, by_slot[slot], LOOPBACK_SERVER, port, "/join")
              for slot in range(WORKERS)}
    for slot, answer in joined.items():
        assert answer["worker_pid"] == table[slot]["pid"], (slot, answer)

    def ask(slot: int, target: bytes, body: bytes = b"") -> tuple[int, dict]:
        """One request from slot's source (the target as given: bytes)."""
        method = b"POST" if body else b"GET"
        with netns.tcp_connect(None, by_slot[slot], LOOPBACK_SERVER, port) as sock:
            sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (method, target, len(body), body))
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, payload = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(payload)

    own = table[0]["pid"]
    # The README's placeholder "…" as a browser sends it (curl 7.88 sends the
    # raw bytes, which the HTTP engine refuses with 400 before the app sees them).
    for made_up in (b"%E2%80%A6", b"nope", b"%d-0123" % own, b"%d-%s" % (own, b"0" * 16)):
        status, answer = ask(0, b"/poll?session=" + made_up)
        assert status == 404 and answer["error"].startswith("unknown session"), (made_up, answer)
        assert "different worker" not in answer["error"], answer
    status, answer = ask(0, b"/poll")
    assert status == 400 and "/join" in answer["error"], answer

    # Slot 1's session, asked of slot 0's worker: a routing fault, said as one.
    theirs = joined[1]["session"].encode()
    status, answer = ask(0, b"/say?session=" + theirs, b"lost")
    assert status == 409, answer
    assert f"worker {table[1]['pid']}" in answer["error"], answer
    assert "different worker" in answer["error"], answer

    # Its own worker knows it: what is said there is waiting in its poll.
    status, answer = ask(1, b"/say?session=" + theirs, b"hello")
    assert (status, answer["delivered"]) == (200, 1), answer
    status, answer = ask(1, b"/poll?session=" + theirs)
    assert status == 200 and [m["text"] for m in answer["messages"]] == ["hello"], answer
    assert srv.stop() == 0
