"""What the master knows of each worker. Rebuildable from the workers alone."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import psutil


@dataclasses.dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int
    pidfd: int
    state: str = "booting"           # booting | active | retiring
    port: int | None = None
    spawned_at: float = dataclasses.field(default_factory=time.monotonic)
    ready_at: float | None = None
    retired_at: float | None = None
    adopted: bool = False
    boot_error: str | None = None     # why it never became ready, if it said
    serial: int = 0                   # spawn order; a replacement outranks its predecessor
    max_requests: int = 0             # this worker's max_requests, jitter included
    requests: int = 0
    too_busy: bool = False
    busy_since: float | None = None
    replacing: str | None = None      # why a replacement is booting for it
    replaces: int | None = None       # pid of the worker this one replaces
    asked_to_exit: bool = False       # cluster memory pressure already asked it
    hung_at: float | None = None
    listeners: list = dataclasses.field(default_factory=list)   # the master's copies (NAT backends)
    handed_fds: list = dataclasses.field(default_factory=list)  # reuseport sockets handed back
    last_seen: float = dataclasses.field(default_factory=time.monotonic)
    conn: object = None               # the worker's control connection, if any
    popen: object = None              # set when this master spawned it (to reap it)
    connections: int = 0
    lag_ms: float = 0.0
    rss: int = 0
    nice: int = 0
    process: psutil.Process | None = None

    def signal(self, signum: int) -> bool:
        """Signal through the pidfd: a recycled pid can never be hit."""
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
            return True
        except ProcessLookupError:
            return False

    def measure(self) -> None:
        """RSS and nice as the kernel reports them, from the first second on."""
        try:
            if self.process is None:
                self.process = psutil.Process(self.pid)
            self.rss = self.process.memory_info().rss
            self.nice = self.process.nice()
        except psutil.Error:
            pass

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def as_status(self) -> dict:
        return {"pid": self.pid, "slot": self.slot, "generation": self.generation,
                "port": self.port, "state": self.state, "rss": self.rss,
                "connections": self.connections, "requests": self.requests,
                "lag_ms": self.lag_ms, "too_busy": self.too_busy, "nice": self.nice,
                "adopted": self.adopted, "replacing": self.replacing,
                "age_s": round(time.monotonic() - self.spawned_at, 1),
                "retired_for_s": None if self.retired_at is None
                else round(time.monotonic() - self.retired_at, 1)}
