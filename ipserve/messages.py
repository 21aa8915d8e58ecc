"""Every message of the control protocol, type- and range-checked.

A worker's claims are never trusted for what matters (which slot it holds,
which port is routed): the master knows those from what it spawned or
recorded. Still, every field of every message is checked here, so a
malformed message is refused whole, with one line saying why, before any of
it is used. Unknown keys are ignored: a newer worker may say more to an older
master, or the other way round, across a takeover.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

MAX_COUNT = 1 << 40          # connections, requests: far above anything real
MAX_TEXT = 2000              # an error line shown in status


class BadMessage(ValueError):
    """A message that breaks the protocol; the connection that sent it is closed."""


class Phase(enum.Enum):
    """What a worker says it is doing."""
    READY = "ready"          # app loaded; not accepting until the master activates it
    ACTIVE = "active"        # accepting its slot's connections
    RETIRING = "retiring"    # draining, listener closed
    STOPPING = "stopping"    # TERM/QUIT received, ending


class Command(enum.Enum):
    """What ipservectl (or a new master) may ask of a master."""
    STATUS = "status"
    STOP = "stop"
    RELOAD = "reload"
    KILL_RETIRED = "kill-retired"
    HANDOVER = "handover"


class ToWorker(enum.Enum):
    """What a master may tell a worker."""
    ACTIVATE = "activate"    # you hold your slot: start accepting
    RETIRE = "retire"        # a newer worker holds your slot: drain and exit
    CLOSE = "close"          # end your connections now (WebSockets get 1001) and exit
    REOPEN = "reopen"        # reopen the log files
    REFUSED = "refused"      # this master does not know you


# ---------------------------------------------------------------- field checks

def _field(message: dict, key: str, required: bool):
    if key not in message:
        if required:
            raise BadMessage(f"{key!r} is missing")
        return None
    return message[key]


def integer(message: dict, key: str, low: int = 0, high: int = MAX_COUNT,
            required: bool = True) -> int | None:
    value = _field(message, key, required)
    if value is None and not required:
        return None
    if type(value) is not int or not low <= value <= high:
        raise BadMessage(f"{key!r} must be a whole number from {low} to {high}")
    return value


def number(message: dict, key: str, low: float = 0.0, high: float = 1e9,
           required: bool = True) -> float | None:
    value = _field(message, key, required)
    if value is None and not required:
        return None
    if type(value) not in (int, float) or not math.isfinite(value) or not low <= value <= high:
        raise BadMessage(f"{key!r} must be a number from {low:g} to {high:g}")
    return float(value)


def boolean(message: dict, key: str, required: bool = True) -> bool | None:
    value = _field(message, key, required)
    if value is None and not required:
        return None
    if type(value) is not bool:
        raise BadMessage(f"{key!r} must be true or false")
    return value


def text(message: dict, key: str, limit: int = MAX_TEXT, required: bool = True) -> str | None:
    value = _field(message, key, required)
    if value is None and not required:
        return None
    if type(value) is not str or len(value) > limit:
        raise BadMessage(f"{key!r} must be a string of at most {limit} characters")
    return value


def shown(value: str | None) -> str | None:
    """A worker's text as a person will see it (ipservectl, top, the log):
    application code chose it, so control characters (a terminal escape, a
    newline that forges a log line) are written out as \\xHH, \\n, ..."""
    if value is None or value.isprintable():
        return value
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in value)


def choice(message: dict, key: str, kind: type[enum.Enum], required: bool = True):
    value = _field(message, key, required)
    if value is None and not required:
        return None
    try:
        return kind(value)
    except (ValueError, TypeError):
        allowed = ", ".join(str(m.value) for m in kind)
        raise BadMessage(f"{key!r} must be one of {allowed}") from None


# ---------------------------------------------------------------- worker -> master

@dataclasses.dataclass(frozen=True)
class Hello:
    """First message on a worker's connection: who it says it is. The master
    believes the pid only from SO_PEERCRED and the rest only from its records."""
    name: str
    pid: int
    slot: int
    generation: int
    phase: Phase
    connections: int
    requests: int


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    connections: int
    requests: int
    lag_ms: float
    too_busy: bool
    shed: int
    websockets: int
    phase: Phase
    # Counted since the worker started (absent from an older worker): responses
    # by status class 1xx..5xx, and request durations as histogram bucket
    # counts (ipserve.histogram.REQUEST_BOUNDS) with their sum in seconds.
    responses: tuple[int, ...] = ()
    durations: tuple[int, ...] = ()
    duration_sum: float = 0.0


class LeakMode(enum.Enum):
    TYPES = "types"              # a census of live objects by type
    TRACEMALLOC = "tracemalloc"  # allocation sites


@dataclasses.dataclass(frozen=True)
class Growth:
    what: str        # "module.Class", or "file.py:123" for tracemalloc
    count: int       # objects (or allocations) more than at the baseline
    size: int        # bytes more (approximate for types)


@dataclasses.dataclass(frozen=True)
class LeakReport:
    """What grew in a retired worker between its baseline and its last
    connection closing; sent once, just before it exits."""
    mode: LeakMode
    lifetime_s: float
    requests: int
    growth: tuple[Growth, ...]
    error: str | None = None     # why no census could be taken


@dataclasses.dataclass(frozen=True)
class BootFailed:
    error: str


@dataclasses.dataclass(frozen=True)
class Request:
    """An admin command. `pid` is the pid a taking-over master says it has."""
    command: Command
    pid: int | None = None


FromWorker = Hello | Heartbeat | BootFailed | LeakReport

MAX_LIST = 64                # counts in a heartbeat
MAX_GROWTH = 50              # entries in a leak report


def counts(message: dict, key: str) -> tuple[int, ...]:
    """An optional list of at most MAX_LIST counts; () if absent."""
    value = message.get(key, [])
    if type(value) is not list or len(value) > MAX_LIST or not all(
            type(n) is int and 0 <= n <= MAX_COUNT for n in value):
        raise BadMessage(f"{key!r} must be a list of at most {MAX_LIST} whole numbers")
    return tuple(value)


def growth(message: dict) -> tuple[Growth, ...]:
    value = message.get("growth")
    if type(value) is not list or len(value) > MAX_GROWTH:
        raise BadMessage(f"'growth' must be a list of at most {MAX_GROWTH} entries")
    entries = []
    for entry in value:
        if type(entry) is not dict:
            raise BadMessage("a 'growth' entry is not an object")
        entries.append(Growth(what=shown(text(entry, "what", 300)),
                              count=integer(entry, "count", -MAX_COUNT, MAX_COUNT),
                              size=integer(entry, "size", -MAX_COUNT, MAX_COUNT)))
    return tuple(entries)


def parse_from_worker(message: dict) -> FromWorker:
    kind = message.get("type")
    if kind == "hello":
        return Hello(name=text(message, "name", 64), pid=integer(message, "pid", 1, 1 << 22),
                     slot=integer(message, "slot", 0, 1 << 16),
                     generation=integer(message, "generation", 1, 1 << 40),
                     phase=choice(message, "phase", Phase),
                     connections=integer(message, "connections"),
                     requests=integer(message, "requests"))
    if kind == "heartbeat":
        return Heartbeat(connections=integer(message, "connections"),
                         requests=integer(message, "requests"),
                         lag_ms=number(message, "lag_ms", 0.0, 1e9),
                         too_busy=boolean(message, "too_busy"),
                         shed=integer(message, "shed"), websockets=integer(message, "websockets"),
                         phase=choice(message, "phase", Phase),
                         responses=counts(message, "responses"),
                         durations=counts(message, "durations"),
                         duration_sum=number(message, "duration_sum", 0.0, 1e15, required=False)
                         or 0.0)
    if kind == "leak-report":
        return LeakReport(mode=choice(message, "mode", LeakMode),
                          lifetime_s=number(message, "lifetime_s", 0.0, 1e10),
                          requests=integer(message, "requests"), growth=growth(message),
                          error=shown(text(message, "error", MAX_TEXT, required=False)))
    if kind == "boot-failed":
        return BootFailed(error=shown(text(message, "error", MAX_TEXT)))
    raise BadMessage(f"unknown message type {str(kind)[:40]!r}")


def parse_request(message: dict) -> Request:
    return Request(command=choice(message, "cmd", Command),
                   pid=integer(message, "pid", 1, 1 << 22, required=False))


def is_request(message: dict) -> bool:
    return "cmd" in message


# ---------------------------------------------------------------- master -> worker

@dataclasses.dataclass(frozen=True)
class Order:
    kind: ToWorker


def parse_order(message: dict) -> Order:
    return Order(kind=choice(message, "type", ToWorker))


def order(kind: ToWorker) -> dict[str, Any]:
    return {"type": kind.value}
