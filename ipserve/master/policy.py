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
        if w.slot not in best or w.generation > best[w.slot].generation:
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
    newest: dict[int, int] = {}
    for w in workers:
        if w.state == "active":
            newest[w.slot] = max(newest.get(w.slot, -1), w.generation)
    return [w for w in workers if w.state == "active"
            and (w.slot >= slots or w.generation < newest[w.slot])]


def overdue_retirees(workers: Iterable, now: float, retired_timeout: float | None) -> list:
    """Retiring workers whose drain has lasted longer than `retired_timeout`."""
    if retired_timeout is None:
        return []
    return [w for w in workers if w.state == "retiring" and w.retired_at is not None
            and now - w.retired_at >= retired_timeout]


def next_generation(current: int, workers: Iterable) -> int:
    """A generation number above every worker's, adopted ones included."""
    return max([current] + [w.generation for w in workers]) + 1
