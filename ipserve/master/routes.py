"""What the kernel should route, what it does route, and the writes between.

A rule write normally takes milliseconds, but `iptables-restore` may wait on
the xtables lock and any tool can hang: the master's loop must keep answering
signals meanwhile. So tables are written from one background thread, one at a
time, newest first: a table still queued when a newer one comes is never
written. A failed write leaves the kernel's previous routes in force (every
backend writes in one transaction) and is retried with a growing delay.

Stopping takes two writes: `drain()` routes nothing new but keeps established
connections translated while the workers finish them, `remove()` takes the
rules out once they are gone. Once draining, nothing re-installs routes.
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import threading
from typing import Callable

from ipserve.master import policy
from ipserve.routing import RouteError, Router

Table = dict[int, int]   # slot -> port


class Op(enum.Enum):
    DRAIN = "drain"          # route nothing new; keep established connections translated
    REMOVE = "remove"        # take our rules out


Write = Table | Op


@dataclasses.dataclass(frozen=True)
class Result:
    write: Write
    error: str | None


class RouteWriter:
    """Runs router.apply()/remove() in a thread; `threaded=False` runs them
    inline (unit tests drive the master that way)."""

    def __init__(self, router: Router, wakeup: socket.socket | None = None, threaded: bool = True):
        self.router = router
        self.wakeup = wakeup
        self.threaded = threaded
        self._cond = threading.Condition()
        self._pending: list[Write] = []   # at most one: the newest
        self._running = False
        self._results: list[Result] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="ipserve-routes", daemon=True)
            self._thread.start()

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._running

    def submit(self, write: Write) -> None:
        """Queue a table (or a drain, or the removal), replacing anything queued."""
        if not self.threaded:
            self._results.append(self._write(write))
            return
        with self._cond:
            self._pending = [write]
            self._cond.notify()

    def results(self) -> list[Result]:
        with self._cond:
            out, self._results = self._results, []
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Finish what is queued (a removal at stop), then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _write(self, write: Write) -> Result:
        try:
            if write is Op.REMOVE:
                self.router.remove()
            elif write is Op.DRAIN:
                self.router.drain()
            else:
                self.router.apply(write)
            return Result(write, None)
        except RouteError as exc:
            return Result(write, str(exc))
        except Exception as exc:   # a tool that timed out, a library error: still "not written"
            return Result(write, f"{type(exc).__name__}: {exc}")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                write = self._pending.pop()
                self._running = True
            result = self._write(write)
            with self._cond:
                self._results.append(result)
                self._running = False
            if self.wakeup is not None:
                try:
                    self.wakeup.send(b"r")
                except OSError:
                    pass


class Routes:
    """The master's view of routing: the table it wants, the table the kernel
    holds (`installed`; None until our first write, when a previous master's
    rules may still be in force; {} once draining), and the retry schedule of
    failed writes."""

    def __init__(self, writer: RouteWriter, clock: Callable[[], float]):
        self.writer = writer
        self.clock = clock
        self.wanted: Table | None = None
        self.installed: Table | None = None
        self.in_flight = False
        self.draining = False       # stopping: nothing new is ever routed again
        self.removed = False
        self.error: str | None = None
        self.failures = 0
        self.retry_at = 0.0

    def want(self, table: Table) -> None:
        if not self.draining:
            self.wanted = dict(table)

    def step(self) -> None:
        """Start the next write if one is due."""
        if (self.draining or self.in_flight or self.wanted is None
                or self.wanted == self.installed or self.clock() < self.retry_at):
            return
        self.in_flight = True
        self.writer.submit(dict(self.wanted))

    def drain(self) -> None:
        """Route nothing new from now on; established connections keep going."""
        if self.draining:
            return
        self.draining = True
        self.wanted = None
        self.in_flight = True
        self.writer.submit(Op.DRAIN)

    def remove(self) -> None:
        """Take our rules out (once nothing is left to drain)."""
        if self.removed:
            return
        self.draining = self.removed = True
        self.wanted = None
        self.in_flight = True
        self.writer.submit(Op.REMOVE)

    def collect(self) -> list[Result]:
        """Results of finished writes, applied to our view; returned for logging."""
        results = self.writer.results()
        for result in results:
            self.in_flight = False
            if result.error is None:
                self.installed = (None if result.write is Op.REMOVE else
                                  {} if result.write is Op.DRAIN else result.write)
                self.error = None
                self.failures = 0
                self.retry_at = 0.0
            else:
                self.error = result.error
                self.failures += 1
                self.retry_at = self.clock() + policy.backoff_delay(self.failures, base=0.25, cap=30.0)
        return results
