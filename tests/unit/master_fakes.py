"""A master driven without processes, sockets or kernel rules.

The fakes stand in for the three things the master acts on: the spawner
(processes), the slot sockets and the router (kernel rules). Everything
else is the real master: its loop's handlers, its decisions, its protocol
parsing. Tests call the handlers the loop would dispatch to (`link.on_messages`,
`master.on_worker_exit`, `master.on_signal`, `master.tick`) and read what
the fakes were asked to do.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket

from ipserve import config, control
from ipserve.master import link
from ipserve.master.connections import Connection
from ipserve.master.loop import Master
from ipserve.master.registry import WorkerState
from ipserve.master.sockets import Listeners
from ipserve.routing import RouteError

MASTER_UID = os.geteuid()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRouter:
    name = "fake"

    def __init__(self) -> None:
        self.applied: list[dict[int, int]] = []
        self.drained = 0
        self.removed = 0
        self.failures_left = 0
        self.explode = None        # an exception to raise from apply (not a RouteError)

    def apply(self, table: dict[int, int]) -> None:
        if self.explode is not None:
            raise self.explode
        if self.failures_left:
            self.failures_left -= 1
            raise RouteError("xtables lock held by another process")
        self.applied.append(dict(table))

    def drain(self) -> None:
        self.drained += 1

    def remove(self) -> None:
        self.removed += 1

    @property
    def kernel(self) -> dict[int, int] | None:
        """What the kernel would route now ({} while draining)."""
        if self.removed or not self.applied:
            return None
        return {} if self.drained else self.applied[-1]

    def describe(self) -> dict:
        return {"router": self.name}

    def close(self) -> None:
        pass


class FakeSockets:
    """NAT-like: a fresh port per worker."""
    shared = False
    resizable = True

    def __init__(self) -> None:
        self.ports = itertools.count(40000)
        self.opened: list[Listeners] = []

    def open(self, slot: int) -> Listeners:
        port = next(self.ports)
        listeners = Listeners([], port, (port,), owned=True)
        self.opened.append(listeners)
        return listeners

    def prepare(self, slots, handed_over=()) -> None:
        pass

    def take_back(self, sockets, inodes):
        return None

    def handover_sockets(self) -> list:
        return []

    def describe(self) -> list:
        return []

    def close(self) -> None:
        pass


class FakeProcess:
    def __init__(self, pid: int, start: int):
        self.pid = pid
        self.start_time = start
        self.signals: list[int] = []
        self.exit_code: int | None = None
        self._r, self._w = os.pipe()     # something a selector accepts

    def fileno(self) -> int:
        return self._r

    def signal(self, signum: int) -> bool:
        self.signals.append(signum)
        return True

    def reap(self) -> int | None:
        return self.exit_code

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class FakeSpawner:
    def __init__(self) -> None:
        self.pids = itertools.count(5000)
        self.processes: dict[int, FakeProcess] = {}
        self.specs: list[dict] = []
        self.fail_with: BaseException | None = None

    def spawn(self, spec: dict, fds: list[int]) -> FakeProcess:
        if self.fail_with is not None:
            raise self.fail_with
        pid = next(self.pids)
        process = FakeProcess(pid, start=pid * 10)
        self.processes[pid] = process
        self.specs.append(spec)
        return process

    def start_time(self, pid: int) -> int | None:
        process = self.processes.get(pid)
        return None if process is None else process.start_time

    def attach(self, pid: int, expected_start: int) -> FakeProcess | None:
        process = self.processes.get(pid)
        return process if process is not None and process.start_time == expected_start else None


def make_master(tmp_path, workers: int = 4, router: FakeRouter | None = None,
                spawner: FakeSpawner | None = None, **settings) -> Master:
    cli = {"app": "app:application", "workers": workers, "runtime_dir": str(tmp_path),
           "spawn_interval": 0, **settings}
    cfg = config.resolve(cli, environ={})
    log = logging.getLogger(f"test-master-{id(cli)}")
    log.setLevel(logging.DEBUG)
    master = Master(cfg, router or FakeRouter(), FakeSockets(), spawner or FakeSpawner(), log,
                    state_path=str(tmp_path / "state"), clock=Clock(), threaded_routes=False)
    return master


class Peer:
    """One control connection, as a worker or an admin would open it."""

    def __init__(self, master: Master, pid: int, uid: int = MASTER_UID):
        self.master = master
        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)
        self.theirs.settimeout(0)
        self.conn = Connection(self.ours, control.Peer(pid, uid, uid), master.clock(),
                               peer_start=master.spawner.start_time(pid))
        master.control.connections.add(self.conn)

    def say(self, *messages: dict) -> None:
        link.on_messages(self.master, self.conn, list(messages))

    def heard(self) -> list[dict]:
        """What the master sent us so far."""
        data = b""
        while True:
            try:
                chunk = self.theirs.recv(65536)
            except (BlockingIOError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    @property
    def closed(self) -> bool:
        return self.conn.closed


def hello(record, phase: str = "ready", **overrides) -> dict:
    return {"type": "hello", "name": record_name(record), "pid": record.pid, "slot": record.slot,
            "generation": record.generation, "phase": phase, "connections": 0, "requests": 0,
            **overrides}


def record_name(record) -> str:
    return "ipserve-8000"


def heartbeat(**overrides) -> dict:
    return {"type": "heartbeat", "connections": 1, "requests": 10, "lag_ms": 0.5,
            "too_busy": False, "shed": 0, "websockets": 0, "phase": "active", **overrides}


def booting(master: Master):
    return [w for w in master.registry if w.state is WorkerState.BOOTING]


def say_ready(master: Master, records) -> dict:
    peers = {}
    for record in records:
        peer = Peer(master, record.pid)
        peer.say(hello(record))
        peers[record.pid] = peer
    return peers


def start(master: Master) -> dict:
    """Boot every slot: spawn, say ready, get activated. Returns pid -> Peer."""
    master.begin()
    peers = {}
    for _ in range(50):
        master.tick()
        peers.update(say_ready(master, booting(master)))
        if master.serving_since is not None:
            return peers
    raise AssertionError(f"slots never all served: {master.status()['slot_table']}")


def exit_worker(master: Master, record, code: int = 0) -> None:
    record.process.exit_code = code
    master.on_worker_exit(record)


def sig(master: Master, signum: signal.Signals) -> None:
    master.on_signal(signum)
