"""Pure decisions of the master: no processes, sockets or rules in here.

Functions take workers (anything with the WorkerRecord attributes they read)
and return what should happen; master.loop carries it out.
"""

from __future__ import annotations

import os
from typing import Iterable, NamedTuple, Sequence

from ipserve.master.registry import ExitReason, WorkerState

DIED_YOUNG = 5.0     # a worker that ends sooner than this after it was activated died young
CLUSTER_RETIRE_AT = 0.80   # of cluster_memory: retiring workers are asked to exit
CLUSTER_KILL_AT = 0.95     # of cluster_memory: retiring workers are killed


def backoff_delay(failures: int, base: float = 1.0, cap: float = 30.0) -> float:
    """0 after no failure, then base, 2*base, 4*base ... up to cap."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 32)))


def max_booting(cpu_count: int | None = None) -> int:
    """Workers allowed to boot at once: importing an app is CPU-bound, so more
    than the cores only makes every boot slower and the machine unresponsive."""
    return max(2, cpu_count or os.cpu_count() or 1)


def died_young(w, now: float) -> bool:
    """Ended before it was ever activated, or soon after."""
    return w.activated_at is None or now - w.activated_at < DIED_YOUNG


def next_generation(current: int, workers: Iterable) -> int:
    """A generation number above every worker's, adopted ones included."""
    return max([current] + [w.generation for w in workers]) + 1


# ---------------------------------------------------------------- routing

def settle(holders: Sequence, slot_ports: Sequence[int | None], installed: dict[int, int] | None,
           workers: Iterable) -> tuple[list, list]:
    """Once the kernel routes a slot to its holder's sockets: activate the
    holder if it waits READY, retire every other ACTIVE worker of the slot.
    Workers of slots beyond the current count retire once the kernel routes
    exactly the current count. Returns (to_activate, to_retire)."""
    activate, retire = [], []
    if installed is None:
        return activate, retire
    n = len(slot_ports)
    routed = {i for i in range(n) if slot_ports[i] is not None and installed.get(i) == slot_ports[i]}
    for i in routed:
        h = holders[i]
        if h is not None and h.state is WorkerState.READY:
            activate.append(h)
    for w in workers:
        if w.state is not WorkerState.ACTIVE:
            continue
        if w.slot < n and w.slot in routed and w is not holders[w.slot]:
            retire.append(w)
        elif w.slot >= n and len(installed) == n:
            retire.append(w)
    return activate, retire


def strays(workers: Iterable, expected: set[int]) -> list:
    """Workers still booting or ready that no slot and no reload expects any
    more (a respawn overtaken by a generation switch): kill them."""
    return [w for w in workers if w.state in (WorkerState.BOOTING, WorkerState.READY)
            and w.pid not in expected]


# ---------------------------------------------------------------- health

def overdue_boots(workers: Iterable, now: float, boot_timeout: float) -> list:
    """Workers not ready within boot_timeout (0: no limit)."""
    if not boot_timeout:
        return []
    return [w for w in workers if w.state is WorkerState.BOOTING and now - w.spawned_at > boot_timeout]


def hung(workers: Iterable, now: float, timeout: float) -> list:
    """Workers that should heartbeat and have been silent past `timeout` (0: never)."""
    if not timeout:
        return []
    return [w for w in workers if w.state in (WorkerState.READY, WorkerState.ACTIVE,
                                              WorkerState.RETIRING)
            and now - w.last_seen > timeout]


def overdue_retirees(workers: Iterable, now: float, retired_timeout: float | None) -> list:
    """Retiring workers whose drain has lasted longer than `retired_timeout`."""
    if not retired_timeout:
        return []
    return [w for w in workers if w.state is WorkerState.RETIRING and w.retired_at is not None
            and now - w.retired_at >= retired_timeout]


class Replacement(NamedTuple):
    worker: object
    cause: ExitReason
    reason: str              # for the log and status
    rate_limited: bool


def health_replacements(workers: Iterable, now: float, *, worker_memory: int | None,
                        max_requests: bool, busy_retire_after: float) -> list[Replacement]:
    """Active workers that should be replaced, and why.

    Memory and load replacements are rate-limited by the caller; max_requests
    ones are not (their jitter already spreads them out)."""
    out = []
    for w in workers:
        if w.state is not WorkerState.ACTIVE or w.replacing:
            continue
        if worker_memory and w.rss > worker_memory:
            out.append(Replacement(w, ExitReason.MEMORY, f"RSS {w.rss >> 20} MiB above "
                                   f"worker_memory {worker_memory >> 20} MiB", True))
        elif max_requests and w.max_requests and w.requests >= w.max_requests:
            out.append(Replacement(w, ExitReason.MAX_REQUESTS,
                                   f"served {w.requests} requests (max_requests)", False))
        elif busy_retire_after and w.busy_since is not None and now - w.busy_since >= busy_retire_after:
            out.append(Replacement(w, ExitReason.BUSY, f"too busy for {now - w.busy_since:.0f}s",
                                   True))
    return out


def exit_reason(worker, stopping: bool) -> ExitReason:
    """Why a worker that just exited ended, for ipserve_worker_exits_total."""
    if worker.state is WorkerState.HUNG:
        return ExitReason.HUNG
    if worker.replace_cause is not None:
        return worker.replace_cause       # replaced for memory, load or max_requests
    if worker.boot_error is not None:
        return ExitReason.CRASHED         # never became ready (even if we killed it for that)
    if stopping or worker.state in (WorkerState.RETIRING, WorkerState.KILLED):
        return ExitReason.RETIRED         # superseded, rolled back, or stopped with us
    return ExitReason.CRASHED             # it ended on its own while booting, ready or active


def cluster_memory_actions(workers: Iterable, limit: int | None) -> list[tuple[str, object]]:
    """What to do when all workers together use too much memory.

    Above 80% of `limit`, retiring workers are asked to exit ("close"), above
    95% they are killed ("kill"): fewest connections first, then largest RSS,
    then oldest, until the rest fits under 80%. Over the limit with no retiring
    worker, the largest active worker is replaced ("replace")."""
    workers = list(workers)
    total = sum(w.rss for w in workers)
    if not limit or total <= CLUSTER_RETIRE_AT * limit:
        return []
    retiring = sorted((w for w in workers if w.state is WorkerState.RETIRING),
                      key=lambda w: (w.connections, -w.rss, w.spawned_at))
    action = "kill" if total > CLUSTER_KILL_AT * limit else "close"
    out: list[tuple[str, object]] = []
    projected = total
    for w in retiring:
        if projected <= CLUSTER_RETIRE_AT * limit:
            break
        out.append((action, w))
        projected -= w.rss
    active = [w for w in workers if w.state is WorkerState.ACTIVE and not w.replacing]
    if not retiring and total > limit and active:
        out.append(("replace", max(active, key=lambda w: w.rss)))
    return out
