"""Telling systemd what the master is doing (sd_notify), without libsystemd.

The protocol is one datagram of `KEY=value` lines to the AF_UNIX socket named
by $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace); with no
$NOTIFY_SOCKET nothing is sent. The pure parts (`message`, `messages`,
`status_line`, `address`, `watchdog_interval`) decide what to send; `Notifier`
sends it, and never raises: systemd not listening must never stop a master.

What the master says, and when (the calls are in master/loop, settle, reload,
adoption and main):

    READY=1       every slot served for the first time; a reload over (done,
                  failed or refused: each RELOADING=1 gets its READY=1)
    RELOADING=1   a deploy starts (HUP, TTIN/TTOU, ipservectl reload), with
                  MONOTONIC_USEC as Type=notify-reload wants
    STOPPING=1    TERM, INT, QUIT (ipservectl stop)
    MAINPID=      after a takeover: the master that hands over names its
                  successor, the successor names itself
    STATUS=       a line for `systemctl status`, sent when it changes
    WATCHDOG=1    every WATCHDOG_USEC/2, from the loop's tick: a hung loop stops it
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import socket
import time
from collections.abc import Callable, MutableMapping

from ipserve.master.registry import WorkerState

_KEY = re.compile(r"[A-Z][A-Z0-9_]*\Z")


class Event(enum.Enum):
    READY = "ready"                    # serving; or a reload is over
    RELOADING = "reloading"            # a new generation is booting
    RELOAD_REFUSED = "reload refused"  # the configuration did not read: RELOADING then READY
    STOPPING = "stopping"
    MAIN_PID = "main pid"              # a takeover: `pid` is the master now


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    RELOADING = "reloading"
    STOPPING = "stopping"


# ---------------------------------------------------------------- pure: what to send

def message(**fields) -> bytes:
    """One notification: `KEY=value` lines in the order given. A newline in a
    value would start a forged assignment: it becomes a space."""
    lines = []
    for key, value in fields.items():
        if not _KEY.match(key):
            raise ValueError(f"not an sd_notify key: {key!r}")
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8", "replace")


def messages(event: Event, status: str, *, monotonic_usec: int,
             pid: int | None = None) -> list[bytes]:
    """The datagrams that tell systemd about `event`, in order."""
    if event is Event.READY:
        return [message(READY=1, STATUS=status)]
    if event is Event.RELOADING:
        return [message(RELOADING=1, MONOTONIC_USEC=monotonic_usec, STATUS=status)]
    if event is Event.RELOAD_REFUSED:
        # Type=notify-reload waits for RELOADING=1 and then READY=1 after each
        # SIGHUP, whatever became of it: a refused reload is one that ended at once.
        return [message(RELOADING=1, MONOTONIC_USEC=monotonic_usec),
                message(READY=1, STATUS=status)]
    if event is Event.STOPPING:
        return [message(STOPPING=1, STATUS=status)]
    if event is Event.MAIN_PID:
        return [] if pid is None else [message(MAINPID=pid, STATUS=status)]
    raise ValueError(event)


def address(value: str | None) -> str | None:
    """$NOTIFY_SOCKET as an AF_UNIX address ("@x" is the abstract "\\0x"),
    or None when unset or not an address sd_notify(3) would use."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:] if len(value) > 1 else None
    return value if value.startswith("/") else None


def watchdog_interval(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """Seconds between WATCHDOG=1 (half of WATCHDOG_USEC, as sd_watchdog_enabled
    advises), or None: unset, unparsable, or meant for another process."""
    try:
        micros = int(usec or "")
        if pid and int(pid) != own_pid:
            return None
    except ValueError:
        return None
    return micros / 2e6 if micros > 0 else None


# ---------------------------------------------------------------- pure: STATUS=

@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What STATUS= says, counted from the master."""
    phase: Phase
    slots: int
    generation: int
    served: int = 0                  # slots whose worker is ready or active
    retiring: int = 0                # workers that no longer hold a slot, draining
    reload_generation: int = 0
    reload_ready: int = 0
    reload_targets: int = 0
    finishing: int = 0               # workers still running while stopping
    last_reload_failed: bool = False


def workers(count: int) -> str:
    return f"{count} worker" + ("" if count == 1 else "s")


def status_line(s: Snapshot) -> str:
    if s.phase is Phase.STOPPING:
        return f"stopping: {workers(s.finishing)} finishing"
    if s.phase is Phase.STARTING:
        return f"starting: {s.served}/{workers(s.slots)} ready"
    if s.phase is Phase.RELOADING:
        line = (f"reloading: {s.reload_ready}/{s.reload_targets} of generation "
                f"{s.reload_generation} ready")
        return line + (f"; {s.retiring} retiring" if s.retiring else "")
    line = (f"{workers(s.slots)}, generation {s.generation}" if s.served == s.slots else
            f"{s.served} of {workers(s.slots)} serving, generation {s.generation}")
    if s.retiring:
        line += f", {s.retiring} retiring"
    if s.last_reload_failed:
        line += " (the last reload failed: see ipservectl status)"
    return line


def snapshot(master) -> Snapshot:
    """Count what status_line() needs from a running master."""
    if master.stopping is not None:
        return Snapshot(Phase.STOPPING, master.slot_count, master.generation,
                        finishing=len(master.registry))
    holders = {s.holder.pid for s in master.slots if s.holder is not None}
    successors = {w.pid for r in master.reloads() for w in r.successors.values()}
    # READY holders count: a committed generation holds its slots from the
    # rule write on, its workers are activated once the kernel routes them.
    served = sum(1 for s in master.slots if s.holder is not None
                 and s.holder.state in (WorkerState.READY, WorkerState.ACTIVE))
    retiring = sum(1 for w in master.registry if w.pid not in holders | successors
                   and w.state in (WorkerState.ACTIVE, WorkerState.RETIRING))
    if master.serving_since is None:
        return Snapshot(Phase.STARTING, master.slot_count, master.generation, served=served)
    deploy = master.deploy
    if deploy is not None:
        return Snapshot(Phase.RELOADING, master.slot_count, master.generation, served=served,
                        retiring=retiring, reload_generation=deploy.generation,
                        reload_ready=sum(1 for w in deploy.successors.values()
                                         if w.state is WorkerState.READY),
                        reload_targets=len(deploy.targets))
    last = master.last_reload
    return Snapshot(Phase.SERVING, master.slot_count, master.generation, served=served,
                    retiring=retiring,
                    last_reload_failed=last is not None and last.error is not None)


def status_text(master) -> str:
    return status_line(snapshot(master))


# ---------------------------------------------------------------- sending

def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends to one notify socket; with no address, does nothing at all."""

    def __init__(self, address: str | None, log: logging.Logger, *,
                 watchdog: float | None = None):
        self.address = address
        self.log = log
        self.watchdog = watchdog if address else None
        self.last_watchdog: float | None = None
        self.last_status: str | None = None
        self.sock: socket.socket | None = None
        self.failed = False          # a send failed: logged once
        self.status_failed = False   # describing the master failed: logged once

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str], log: logging.Logger) -> Notifier:
        """Take the variables out of `environ`: workers (application code) and
        the tools the master runs must not inherit them and talk to systemd
        in the master's name."""
        raw = environ.pop("NOTIFY_SOCKET", None)
        usec = environ.pop("WATCHDOG_USEC", None)
        pid = environ.pop("WATCHDOG_PID", None)
        where = address(raw)
        if raw and where is None:
            log.warning("NOTIFY_SOCKET=%r is not a socket address: systemd is not notified", raw)
        return cls(where, log, watchdog=watchdog_interval(usec, pid, os.getpid()))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, data: bytes) -> bool:
        """One datagram; False (logged the first time only) if it was not sent.
        Non-blocking: a systemd that does not read never holds up the loop."""
        if self.address is None:
            return False
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX,
                                          socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
            self.sock.sendto(data, self.address)
            return True
        except OSError as exc:
            if not self.failed:
                self.failed = True
                self.log.warning("cannot notify systemd at %s: %s (further failures are not "
                                 "logged)", self.address.replace("\0", "@"), exc)
            return False

    def notify(self, event: Event, status: str, pid: int | None = None) -> None:
        if self.address is None:
            return
        for data in messages(event, status, monotonic_usec=monotonic_usec(), pid=pid):
            self.send(data)
        self.last_status = status

    def tick(self, now: float, status: Callable[[], str]) -> None:
        """From every turn of the master's loop: STATUS= if it changed, and
        WATCHDOG=1 when due. Nothing is computed when systemd is not listening."""
        if self.address is None:
            return
        fields = {}
        try:
            text = status()
        except Exception:   # a bug in the wording must not cost the tick
            if not self.status_failed:
                self.status_failed = True
                self.log.exception("cannot describe the master for systemd's STATUS=")
            text = self.last_status
        if text is not None and text != self.last_status:
            fields["STATUS"] = text
        if self.watchdog is not None and (self.last_watchdog is None
                                          or now - self.last_watchdog >= self.watchdog):
            fields["WATCHDOG"] = 1
            self.last_watchdog = now
        if fields:
            self.send(message(**fields))
            self.last_status = text

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
