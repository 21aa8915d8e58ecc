"""Pure decisions of the master: no processes, sockets or rules in here."""

from __future__ import annotations

from typing import Iterable

from ipserve.routing.slots import route_table


def routable_ports(workers: Iterable, slots: int) -> dict[int, int]:
    """slot -> port of the worker that should receive the slot's new connections:
    the newest-generation active worker of each slot."""
    best: dict[int, object] = {}
    for w in workers:
        if w.state != "active" or w.port is None or w.slot >= slots:
            continue
        if w.slot not in best or newest_key(w) > newest_key(best[w.slot]):
            best[w.slot] = w
    return {slot: w.port for slot, w in best.items()}


def desired_routes(workers: Iterable, slots: int) -> dict[int, int]:
    return route_table(slots, routable_ports(workers, slots))


def slots_to_spawn(workers: Iterable, slots: int) -> list[int]:
    """Slots that no booting or active worker (of any generation) holds."""
    held = {w.slot for w in workers if w.state in ("booting", "active")}
    return [slot for slot in range(slots) if slot not in held]


def respawn_delay(quick_failures: int) -> float:
    """Back off a slot whose workers keep dying young: 0, 1, 2, 4 ... 30 s."""
    if quick_failures <= 0:
        return 0.0
    return float(min(30, 2 ** (quick_failures - 1)))


def superseded(workers: Iterable, slots: int) -> list:
    """Active workers that no longer receive new connections: a newer active
    worker holds their slot, or their slot is beyond the current slot count."""
    workers = list(workers)
    newest: dict[int, tuple] = {}
    for w in workers:
        if w.state == "active":
            newest[w.slot] = max(newest.get(w.slot, (-1,)), newest_key(w))
    return [w for w in workers if w.state == "active"
            and (w.slot >= slots or newest_key(w) < newest[w.slot])]


def overdue_retirees(workers: Iterable, now: float, retired_timeout: float | None) -> list:
    """Retiring workers whose drain has lasted longer than `retired_timeout`."""
    if retired_timeout is None:
        return []
    return [w for w in workers if w.state == "retiring" and w.retired_at is not None
            and now - w.retired_at >= retired_timeout]


def next_generation(current: int, workers: Iterable) -> int:
    """A generation number above every worker's, adopted ones included."""
    return max([current] + [w.generation for w in workers]) + 1


# ---------------------------------------------------------------- health

def newest_key(w) -> tuple:
    """Order of succession within a slot: generation, then spawn order."""
    return (w.generation, getattr(w, "serial", 0))


def health_replacements(workers: Iterable, now: float, *, worker_memory: int | None,
                        max_requests: bool, busy_retire_after: float) -> list[tuple]:
    """(worker, reason, rate_limited) for active workers that should be replaced.

    Memory and load replacements are rate-limited by the caller; max_requests
    ones are not (their jitter already spreads them out)."""
    out = []
    for w in workers:
        if w.state != "active" or w.replacing:
            continue
        if worker_memory and w.rss > worker_memory:
            out.append((w, f"RSS {w.rss >> 20} MiB above worker_memory {worker_memory >> 20} MiB", True))
        elif max_requests and w.max_requests and w.requests >= w.max_requests:
            out.append((w, f"served {w.requests} requests (max_requests)", False))
        elif w.busy_since is not None and now - w.busy_since >= busy_retire_after:
            out.append((w, f"too busy for {now - w.busy_since:.0f}s", True))
    return out


def cluster_memory_actions(workers: Iterable, limit: int | None) -> list[tuple[str, object]]:
    """What to do when all workers together use too much memory.

    Above 80% of `limit`, retiring workers are asked to exit ("close"), above
    95% they are killed ("kill"): fewest connections first, then largest RSS,
    then oldest, until the rest fits under 80%. Over the limit with no retiring
    worker, the largest active worker is replaced ("replace")."""
    workers = list(workers)
    total = sum(w.rss for w in workers)
    if not limit or total <= 0.8 * limit:
        return []
    retiring = sorted((w for w in workers if w.state == "retiring"),
                      key=lambda w: (w.connections, -w.rss, w.spawned_at))
    action = "kill" if total > 0.95 * limit else "close"
    out: list[tuple[str, object]] = []
    projected = total
    for w in retiring:
        if projected <= 0.8 * limit:
            break
        out.append((action, w))
        projected -= w.rss
    active = [w for w in workers if w.state == "active" and not w.replacing]
    if not retiring and total > limit and active:
        out.append(("replace", max(active, key=lambda w: w.rss)))
    return out


def hung(workers: Iterable, now: float, timeout: float) -> list:
    """Connected workers whose last heartbeat is older than `timeout`."""
    return [w for w in workers if w.state in ("active", "retiring") and now - w.last_seen > timeout]
