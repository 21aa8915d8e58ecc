"""Acting on what the kernel routes: activate, retire, end, refuse.

Once a rule write has landed, `settle()` activates the holder of every slot
the kernel now routes to its sockets, retires every other active worker of
those slots, and ends booting workers nobody expects any more. A slot whose
clients have waited longer than boot_timeout for a worker gets its new
connections reset instead (`refuse_*`).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct

from ipserve import messages, sdnotify
from ipserve.master import policy
from ipserve.master.events import Event
from ipserve.master.registry import WorkerRecord, WorkerState
from ipserve.master.slottable import Slot
from ipserve.messages import ToWorker


def settle(master) -> None:
    """Act on what the kernel now routes: activate holders it routes to,
    retire workers it no longer routes to, end workers nobody expects."""
    if master.stopping:
        return
    holders = [s.holder for s in master.slots]
    ports = [s.port for s in master.slots]
    to_activate, to_retire = policy.settle(holders, ports, master.routes.installed, master.registry)
    for record in to_activate:
        activate(master, record)
    for record in to_retire:
        retire(master, record)
    close_unrouted(master)
    expected = {s.holder.pid for s in master.slots if s.holder is not None}
    for pending in master.reloads():
        expected |= {w.pid for w in pending.successors.values()}
    for record in policy.strays(master.registry, expected):
        master.log.info("ending worker pid %d (slot %d): no longer needed", record.pid, record.slot)
        kill(master, record)


def close_unrouted(master) -> None:
    """Our copies of sockets no slot holds any more, once the kernel no longer
    routes to them: what queued there before the switch is reset, not stranded."""
    installed = master.routes.installed
    if installed is None:
        return
    ports = set(installed.values())
    keep = []
    for listeners in master.unrouted:
        if listeners.port in ports or any(s.listeners is listeners for s in master.slots):
            keep.append(listeners)
        else:
            listeners.close()
    master.unrouted = keep


def activate(master, record: WorkerRecord) -> None:
    now = master.clock()
    record.state = WorkerState.ACTIVE
    record.activated_at = now
    send(master, record, ToWorker.ACTIVATE)
    slot = master.slots[record.slot]
    slot.waiting_since = None
    stop_refusing(master, slot)
    master.state_dirty = True
    master.log.info("worker pid %d (slot %d, generation %d) active on port %s", record.pid,
                    record.slot, record.generation, record.port)
    if master.serving_since is None and all(
            s.holder is not None and s.holder.state is WorkerState.ACTIVE for s in master.slots):
        master.serving_since = now
        master.log.info("every slot is served (%.2fs after start)", now - master.started)
        master.notify(sdnotify.Event.READY)


def retire(master, record: WorkerRecord) -> None:
    """Stop giving it work: it closes its listener and drains at a lower priority."""
    record.state = WorkerState.RETIRING
    record.retired_at = master.clock()
    # Our copy of its sockets is no longer routed to (its own copy lets it
    # take what is already queued).
    if record.listeners is not None and all(s.listeners is not record.listeners for s in master.slots):
        record.listeners.close()
    renice(record.pid, master.cfg.retired_nice, master.log)
    record.measure(master.clock())
    record.connections_at_retire = record.connections
    send(master, record, ToWorker.RETIRE)
    master.state_dirty = True
    master.log.info("worker pid %d (slot %d, generation %d) retiring with %d connection(s)",
                    record.pid, record.slot, record.generation, record.connections)


def send(master, record: WorkerRecord, kind: ToWorker) -> bool:
    conn = record.conn
    if conn is None:
        return False
    ok = conn.send(messages.order(kind))
    master.control.after_send(conn)
    return ok and not conn.closed


def ask_to_close(master, record: WorkerRecord) -> None:
    """End its connections now (WebSockets get 1001); SIGQUIT if unreachable."""
    if not send(master, record, ToWorker.CLOSE):
        record.signal(signal.SIGQUIT)


def kill(master, record: WorkerRecord) -> None:
    record.signal(signal.SIGKILL)
    record.state = WorkerState.KILLED
    master.state_dirty = True


def refuse_waiting_slots(master, now: float) -> None:
    """A slot without an active worker for longer than boot_timeout: its
    queued and new connections are reset instead of waiting for ever."""
    if not master.cfg.boot_timeout:
        return
    for slot in master.slots:
        if (not slot.refusing and slot.waiting_since is not None and slot.listeners is not None
            and now - slot.waiting_since > master.cfg.boot_timeout):
            master.log.warning("slot %d has had no worker for %.0fs (boot_timeout): resetting its "
                               "connections until one is ready", slot.index, now - slot.waiting_since)
            slot.refusing = True
            for sock in slot.listeners.sockets:
                master.selector.register(sock, selectors.EVENT_READ, (Event.REFUSE, slot))


def refuse_connections(master, slot: Slot, sock: socket.socket) -> None:
    for _ in range(64):
        try:
            conn, _ = sock.accept()
        except OSError:
            return
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()   # RST: the client learns at once


def stop_refusing(master, slot: Slot) -> None:
    if not slot.refusing:
        return
    slot.refusing = False
    for sock in slot.listeners.sockets if slot.listeners else []:
        try:
            master.selector.unregister(sock)
        except (KeyError, ValueError):
            pass


def renice(pid: int, nice: int, log: logging.Logger) -> None:
    """On Linux a nice value belongs to a thread: renice every one of them
    (gevent's monitor thread and resolver threads too)."""
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
    except OSError as exc:
        log.warning("could not renice worker pid %d: %s", pid, exc)
