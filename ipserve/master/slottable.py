"""The slots: what the kernel routes each slot to, and which worker serves it.

A slot's `listeners` are the sockets its clients' connections land on; its
`holder` is the one worker meant to accept on them (still booting, ready or
active). While a slot has no active holder (at start, while a crashed or hung
worker is replaced) its clients wait in the listeners' queue: a client is
served by its own slot's worker or not at all. The wait is bounded by
boot_timeout, after which the master resets the slot's new connections until
a worker is active again.
"""

from __future__ import annotations

import dataclasses

from ipserve.master.registry import WorkerRecord
from ipserve.master.sockets import Listeners


@dataclasses.dataclass(eq=False)
class Slot:
    index: int
    listeners: Listeners | None = None
    holder: WorkerRecord | None = None
    waiting_since: float | None = None   # no active holder since then
    refusing: bool = False               # waited past boot_timeout: new connections are reset
    failures: int = 0                    # workers of this slot that ended young, in a row
    spawn_after: float = 0.0             # no new worker for this slot before this (backoff)

    @property
    def port(self) -> int | None:
        return None if self.listeners is None else self.listeners.port

    def as_status(self, now: float) -> dict:
        return {"slot": self.index, "port": self.port,
                "holder": None if self.holder is None else self.holder.pid,
                "waiting_s": None if self.waiting_since is None else round(now - self.waiting_since, 1),
                "refusing": self.refusing, "failures": self.failures,
                "respawn_in_s": round(max(0.0, self.spawn_after - now), 1) if self.holder is None else None}


def table(slots: list[Slot]) -> dict[int, int]:
    """slot -> port: what the kernel should route."""
    return {s.index: s.port for s in slots if s.port is not None}
