"""What the master knows of each worker, and the states a worker goes through.

    BOOTING ─▶ READY ─▶ ACTIVE ─▶ RETIRING ─▶ (exit)
       │         │        │
       └─────────┴────────┴─▶ KILLED / HUNG ─▶ (exit)

A worker accepts connections only once ACTIVE: the master activates the
worker that holds a slot when the kernel routes that slot to the worker's
sockets. Everything here is bookkeeping; signals go through `process`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Iterator

import psutil

from ipserve.histogram import RESPONSE_CLASSES
from ipserve.master.sockets import Listeners


class WorkerState(enum.Enum):
    BOOTING = "booting"      # spawned, loading the app
    READY = "ready"          # app loaded, waiting to be given its slot (not accepting)
    ACTIVE = "active"        # holds its slot: accepts the slot's new connections
    RETIRING = "retiring"    # superseded: no new connections, drains at a lower priority
    HUNG = "hung"            # silent past `timeout`: SIGABRT sent, SIGKILL follows
    KILLED = "killed"        # ended by the master (boot failure, rollback, stop); exit expected


class ExitReason(enum.Enum):
    """Why a worker ended, for ipserve_worker_exits_total."""
    RETIRED = "retired"            # superseded by a deploy, drained; or stopped with the master
    MEMORY = "memory"              # worker_memory, or cluster_memory pressure
    BUSY = "busy"                  # too busy for busy_retire_after
    MAX_REQUESTS = "max_requests"
    HUNG = "hung"                  # silent past `timeout`, killed
    CRASHED = "crashed"            # exited on its own, or never became ready


SERIES_INTERVAL = 2.0     # seconds between two samples of a worker's RSS and lag
SERIES_LENGTH = 90        # 3 minutes of them, for the dashboard's sparklines
RATE_WINDOW = 2.0         # requests/s is measured over at least this long


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
    replace_cause: ExitReason | None = None   # the same, as an exit reason
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
    responses: tuple[int, ...] = ()   # by status class, since it started
    durations: tuple[int, ...] = ()   # request-duration bucket counts, since it started
    duration_sum: float = 0.0
    requests_per_s: float = 0.0
    rate_mark: tuple[float, int] | None = None   # (when, requests) the rate is measured from
    connections_at_retire: int | None = None     # for drain progress
    leak_reported: bool = False       # a retiring worker sends one leak report
    # what the master measures
    rss: int = 0
    nice: int = 0
    series: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=SERIES_LENGTH))  # (rss, lag_ms)
    last_sample: float = -1e9
    _ps: psutil.Process | None = None

    @property
    def port(self) -> int | None:
        return None if self.listeners is None else self.listeners.port

    def signal(self, signum: int) -> bool:
        return self.process.signal(signum)

    def measure(self, now: float) -> None:
        """RSS and nice as the kernel reports them, from the first second on;
        every SERIES_INTERVAL a sample of RSS and lag for the sparklines."""
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            self.rss = self._ps.memory_info().rss
            self.nice = self._ps.nice()
        except psutil.Error:
            pass
        if now - self.last_sample >= SERIES_INTERVAL:
            self.last_sample = now
            self.series.append((self.rss, self.lag_ms))

    def count_requests(self, requests: int, now: float) -> None:
        """A heartbeat's request count; requests/s over at least RATE_WINDOW."""
        self.requests = requests
        if self.rate_mark is None or requests < self.rate_mark[1]:
            self.rate_mark = (now, requests)
        elif now - self.rate_mark[0] >= RATE_WINDOW:
            self.requests_per_s = (requests - self.rate_mark[1]) / (now - self.rate_mark[0])
            self.rate_mark = (now, requests)

    def as_status(self, now: float) -> dict:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "serial": self.serial, "port": self.port, "state": self.state.value,
                "rss": self.rss, "connections": self.connections, "requests": self.requests,
                "websockets": self.websockets, "lag_ms": self.lag_ms, "too_busy": self.too_busy,
                "nice": self.nice, "adopted": self.adopted, "replacing": self.replacing,
                "connected": self.conn is not None, "boot_error": self.boot_error,
                "age_s": round(now - self.spawned_at, 1),
                # The counts above are as of its last heartbeat (one a second): say when.
                "heartbeat_age_s": round(max(0.0, now - self.last_seen), 1),
                "retired_for_s": None if self.retired_at is None else round(now - self.retired_at, 1),
                "requests_per_s": round(self.requests_per_s, 2),
                "connections_at_retire": self.connections_at_retire,
                "responses": dict(zip(RESPONSE_CLASSES, self.responses or (0,) * 5))}


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

