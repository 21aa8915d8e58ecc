"""Taking over a previous master's workers, and handing ours over.

A master that finds a state file adopts the workers it records that still
run with the recorded start time (ipserve.master.state), with the recorded
slot, generation and sockets, keeps the kernel's routes to them, and after a
short window (they reconnect every 0.5 s) starts a fresh generation that
replaces them, as on HUP. A worker adopted late is never routed to again.
"""

from __future__ import annotations

import os
import signal

from ipserve.master import policy, reload, slottable, spawning
from ipserve.master.registry import WorkerRecord, WorkerState
from ipserve.master.slottable import Slot
from ipserve.master.sockets import Listeners
from ipserve.master.state import Recorded

ADOPTION_WINDOW = 1.5      # orphaned workers retry every 0.5 s: three tries to reconnect


def adopt(master, recorded: Recorded) -> bool:
    """A previous master's workers: believe those the state file records
    (same pid and start time), take their slots, generation and sockets from
    the record, and keep the old routes until a fresh generation takes over."""
    now = master.clock()
    master.generation = master.highest_generation = recorded.generation
    master.serial = recorded.serial
    alive = [(entry, process) for entry in recorded.workers
             if (process := master.spawner.attach(entry.pid, entry.start_time)) is not None]
    if not alive:
        return False
    master.log.info("previous master pid %d recorded %d worker(s); %d still run",
                    recorded.master_pid, len(recorded.workers), len(alive))
    master.slots = [Slot(i) for i in range(recorded.slots)]
    for entry, process in alive:
        if entry.state not in ("active", "retiring"):
            # It never held its slot in a way worth keeping: end it.
            master.log.info("ending worker pid %d of the previous master (it was %s)",
                            entry.pid, entry.state)
            process.signal(signal.SIGKILL)
            process.close()
            continue
        record = WorkerRecord(pid=entry.pid, slot=entry.slot, generation=entry.generation,
                              serial=entry.serial, process=process, start_time=entry.start_time,
                              spawned_at=now, adopted=True, last_seen=now, ready_at=now,
                              activated_at=now - policy.DIED_YOUNG,
                              state=WorkerState(entry.state),
                              # a placeholder until the worker hands its sockets back
                              listeners=Listeners([], entry.port, entry.inodes, owned=True))
        if record.state is WorkerState.RETIRING:
            record.retired_at = now
        spawning.track(master, record)
        if entry.holder and entry.slot < len(master.slots) and record.state is WorkerState.ACTIVE:
            master.slots[entry.slot].holder = record
            master.slots[entry.slot].listeners = record.listeners
    master.adopting_until = now + ADOPTION_WINDOW
    # Slots whose holder died while no master ran: new sockets, routed at
    # once, so their clients queue for a new worker instead of being refused.
    for slot in master.slots:
        if slot.holder is None and not master.sockets.shared:
            slot.listeners = master.sockets.open(slot.index)
            slot.waiting_since = now
    master.routes.want(slottable.table(master.slots))
    return True


def all_adopted(master) -> bool:
    return all(w.conn is not None for w in master.registry if w.adopted)


def end_adoption(master) -> None:
    master.adopting_until = None
    adopted = [w for w in master.registry if w.adopted]
    master.log.info("adopted %d worker(s) of the previous master (%d connected)", len(adopted),
                    sum(1 for w in adopted if w.conn is not None))
    if master.sockets.shared:
        try:
            rebuild_reuseport_group(master)
        except Exception as exc:   # RouterUnavailable, OSError
            master.log.error("cannot take over the reuseport group: %s; the adopted workers keep "
                             "serving, no new generation is started (restart them all to recover)",
                             exc)
            return
    if adopted:
        reload.begin_deploy(master, reason="takeover")


def rebuild_reuseport_group(master) -> None:
    """The group lives on only in the adopted workers: rebuild the router's
    from one handed-back copy per slot (RouterUnavailable unless every
    slot's came back), then point every worker and slot at it."""
    by_slot: dict[int, Listeners] = {}
    for w in master.registry:
        if w.adopted and w.listeners is not None and w.listeners.sockets:
            by_slot.setdefault(w.slot, w.listeners)
    master.sockets.rebuild_group(by_slot)
    reload.resize(master, len(by_slot))
    for w in master.registry:
        if w.listeners is not None:
            w.listeners.close()   # our handed-back copies; the router holds its own now
            w.listeners = master.sockets.open(w.slot) if w.slot < len(master.slots) else None
    for slot in master.slots:
        slot.listeners = master.sockets.open(slot.index)
        if slot.holder is None:
            slot.waiting_since = master.clock()
    master.routes.want(slottable.table(master.slots))


def handover(master, new_pid: int | None) -> tuple[dict, list[int]]:
    """A new master of this name takes over: leave workers, rules and files
    to it. Refused while this master is starting, reloading or stopping:
    then the new one exits instead of taking over half a transition."""
    busy = ("it is stopping" if master.stopping else
            "it is still starting" if master.serving_since is None or master.adopting_until else
            "a reload is in progress" if master.deploy is not None else None)
    if busy:
        master.log.warning("handover to pid %s refused: %s", new_pid, busy)
        return {"ok": False, "error": f"master pid {os.getpid()} refuses to hand over: {busy}"}, []
    master.flush_state(force=True)
    master.handed_over = True
    master.successor_pid = new_pid     # named to systemd as the main pid once we let go
    master.log.info("handing over to a new master (pid %s); workers keep serving", new_pid)
    return {"ok": True, "pid": os.getpid()}, [s.fileno() for s in master.sockets.handover_sockets()]
