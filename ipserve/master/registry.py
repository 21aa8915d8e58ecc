"""What the master knows of each worker, and the states a worker goes through.

    BOOTING ─▶ READY ─▶ ACTIVE ─▶ RETIRING ─▶ (exit)
       │         │        │
       └─────────┴────────┴─▶ KILLED / HUNG ─▶ (exit)

A worker accepts connections only once ACTIVE: the master activates the
worker that holds a slot when the kernel routes that slot to the worker's
sockets. Everything here is bookkeeping; signals go through `process`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterator

import psutil

from ipserve.master.sockets import Listeners


class WorkerState(enum.Enum):
    BOOTING = "booting"      # spawned, loading the app
    READY = "ready"          # app loaded, waiting to be given its slot (not accepting)
    ACTIVE = "active"        # holds its slot: accepts the slot's new connections
    RETIRING = "retiring"    # superseded: no new connections, drains at a lower priority
    HUNG = "hung"            # silent past `timeout`: SIGABRT sent, SIGKILL follows
    KILLED = "killed"        # ended by the master (boot failure, rollback, stop); exit expected


@dataclasses.dataclass(eq=False)
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    serial: int                       # spawn order; a replacement outranks its predecessor
    process: object                   # spawner.ProcessHandle: signals through a pidfd
    start_time: int                   # with the pid, the worker's identity (/proc/pid/stat)
    spawned_at: float
    state: WorkerState = WorkerState.BOOTING
    listeners: Listeners | None = None   # the sockets it accepts on (the master keeps copies)
    adopted: bool = False             # started by a previous master
    ready_at: float | None = None
    activated_at: float | None = None
    retired_at: float | None = None
    hung_at: float | None = None
    last_seen: float = 0.0            # last message on its control connection
    boot_error: str | None = None     # why it never became ready, if it said
    max_requests: int = 0             # this worker's max_requests, jitter included
    replacing: str | None = None      # why a successor is booting for it
    asked_to_exit: bool = False       # cluster memory pressure already asked it
    conn: object = None               # its control connection, when connected
    # what its heartbeats say
    connections: int = 0
    requests: int = 0
    lag_ms: float = 0.0
    too_busy: bool = False
    busy_since: float | None = None
    websockets: int = 0
    shed: int = 0
    # what the master measures
    rss: int = 0
    nice: int = 0
    _ps: psutil.Process | None = None

    @property
    def port(self) -> int | None:
        return None if self.listeners is None else self.listeners.port

    def signal(self, signum: int) -> bool:
        return self.process.signal(signum)

    def measure(self) -> None:
        """RSS and nice as the kernel reports them, from the first second on."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            self.rss = self._ps.memory_info().rss
            self.nice = self._ps.nice()
        except psutil.Error:
            pass

    def as_status(self, now: float) -> dict:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "serial": self.serial, "port": self.port, "state": self.state.value,
                "rss": self.rss, "connections": self.connections, "requests": self.requests,
                "websockets": self.websockets, "lag_ms": self.lag_ms, "too_busy": self.too_busy,
                "nice": self.nice, "adopted": self.adopted, "replacing": self.replacing,
                "connected": self.conn is not None, "boot_error": self.boot_error,
                "age_s": round(now - self.spawned_at, 1),
                "retired_for_s": None if self.retired_at is None else round(now - self.retired_at, 1)}


class Registry:
    """Every worker the master is responsible for, by pid."""

    def __init__(self) -> None:
        self._by_pid: dict[int, WorkerRecord] = {}

    def add(self, record: WorkerRecord) -> None:
        self._by_pid[record.pid] = record

    def remove(self, record: WorkerRecord) -> None:
        self._by_pid.pop(record.pid, None)

    def get(self, pid: int) -> WorkerRecord | None:
        return self._by_pid.get(pid)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._by_pid.values()))

    def __len__(self) -> int:
        return len(self._by_pid)

    def in_state(self, *states: WorkerState) -> list[WorkerRecord]:
        return [w for w in self._by_pid.values() if w.state in states]

    def booting_count(self) -> int:
        return sum(1 for w in self._by_pid.values() if w.state is WorkerState.BOOTING)

