"""The state file: what a master records so the next one can verify its workers.

`<runtime_dir>/<name>.state` (0600, owned by the master's uid, in a runtime
directory nobody else can write) lists every worker the master is responsible
for: pid and process start time (an identity nobody can forge), slot,
generation, state, and the inodes and port of the listening sockets the
master opened for it. A master taking over believes a worker only if the
worker's pid and start time are in this file, takes its slot and generation
from here and never from the worker, and keeps a handed-back socket only if
its inode is recorded. `ipservectl stop` and `cleanup` read it to find the
workers and rules of a master that is gone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ipserve.messages import BadMessage, integer, number, text

VERSION = 1
STATES = ("booting", "ready", "active", "retiring", "hung", "killed")


@dataclasses.dataclass(frozen=True)
class RecordedWorker:
    pid: int
    start_time: int
    slot: int
    generation: int
    serial: int
    state: str
    port: int
    inodes: tuple[int, ...]
    holder: bool          # the worker its slot is routed to


@dataclasses.dataclass(frozen=True)
class Recorded:
    name: str
    master_pid: int
    router: str
    binds: tuple[str, ...]
    generation: int
    serial: int
    slots: int
    workers: tuple[RecordedWorker, ...]
    graceful_timeout: float = 30.0    # how long its workers take to finish on TERM


def render(name: str, master_pid: int, router: str, binds: list[str], generation: int,
           serial: int, slots: int, workers: list[RecordedWorker],
           graceful_timeout: float = 30.0) -> dict[str, Any]:
    return {"version": VERSION, "name": name, "master_pid": master_pid, "router": router,
            "binds": binds, "generation": generation, "serial": serial, "slots": slots,
            "graceful_timeout": graceful_timeout,
            "workers": [dataclasses.asdict(w) | {"inodes": list(w.inodes)} for w in workers]}


def parse(data: dict) -> Recorded:
    """The file's content, every field checked (it is ours, but a half-written
    or hand-edited file must not crash a master). Raises BadMessage."""
    if data.get("version") != VERSION:
        raise BadMessage(f"unknown state file version {data.get('version')!r}")
    binds = data.get("binds")
    if not isinstance(binds, list) or not all(isinstance(b, str) and len(b) < 64 for b in binds):
        raise BadMessage("'binds' must be a list of addresses")
    raw_workers = data.get("workers")
    if not isinstance(raw_workers, list) or len(raw_workers) > 1 << 16:
        raise BadMessage("'workers' must be a list")
    workers = []
    for raw in raw_workers:
        if not isinstance(raw, dict):
            raise BadMessage("a worker entry is not an object")
        state = text(raw, "state", 16)
        if state not in STATES:
            raise BadMessage(f"unknown worker state {state!r}")
        inodes = raw.get("inodes")
        if not isinstance(inodes, list) or len(inodes) > 16 or not all(
                type(i) is int and 0 <= i < 1 << 64 for i in inodes):
            raise BadMessage("'inodes' must be a list of inode numbers")
        holder = raw.get("holder")
        if type(holder) is not bool:
            raise BadMessage("'holder' must be true or false")
        workers.append(RecordedWorker(
            pid=integer(raw, "pid", 1, 1 << 22), start_time=integer(raw, "start_time", 0, 1 << 62),
            slot=integer(raw, "slot", 0, 1 << 16), generation=integer(raw, "generation", 1, 1 << 40),
            serial=integer(raw, "serial", 0, 1 << 40), state=state,
            port=integer(raw, "port", 0, 65535), inodes=tuple(inodes), holder=holder))
    return Recorded(name=text(data, "name", 64), master_pid=integer(data, "master_pid", 1, 1 << 22),
                    router=text(data, "router", 16), binds=tuple(binds),
                    generation=integer(data, "generation", 1, 1 << 40),
                    serial=integer(data, "serial", 0, 1 << 40),
                    slots=integer(data, "slots", 1, 1 << 16), workers=tuple(workers),
                    graceful_timeout=number(data, "graceful_timeout", 0.0, 1e6,
                                            required=False) or 30.0)
