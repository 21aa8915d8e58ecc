"""The master's side of its workers' control connections.

A worker is believed only as the kernel identifies it: the pid SO_PEERCRED
reports must be one this master spawned or adopted, with the same process
start time; its slot and generation come from the master's record and a
hello claiming others is refused. Every message is parsed by
ipserve.messages first: a malformed one closes that connection and nothing
else. Admin requests on the same socket go to master.commands.
"""

from __future__ import annotations

import os
import socket

from ipserve import messages
from ipserve.master import commands, settle
from ipserve.master.connections import Connection
from ipserve.master.leakreports import on_leak_report
from ipserve.master.registry import WorkerRecord, WorkerState
from ipserve.messages import BadMessage, Phase, ToWorker


def on_messages(master, conn: Connection, raw_messages: list[dict]) -> None:
    for raw in raw_messages:
        if conn.closed or conn.closing:
            return
        if messages.is_request(raw):
            commands.handle(master, conn, raw)
            return
        try:
            message = messages.parse_from_worker(raw)
        except BadMessage as exc:
            master.log.warning("control: closing the connection of pid %d (uid %d): bad message: %s",
                               conn.peer.pid, conn.peer.uid, exc)
            master.control.close(conn)
            return
        if isinstance(message, messages.Hello):
            on_hello(master, conn, message)
        elif isinstance(message, messages.BootFailed):
            on_boot_failed(master, conn, message)
        elif conn.worker is None:
            master.log.warning("control: pid %d (uid %d) sent %s before saying who it is; closing",
                               conn.peer.pid, conn.peer.uid, type(message).__name__)
            master.control.close(conn)
            return
        elif isinstance(message, messages.LeakReport):
            on_leak_report(master, conn.worker, message)
        else:
            on_heartbeat(master, conn.worker, message)


def known_worker(master, conn: Connection) -> WorkerRecord | None:
    """The worker at the other end, by the kernel's word: the pid that
    connected (SO_PEERCRED), that process's start time read at accept, and it
    being alive now (its pidfd) — not a process that took over its pid later,
    nor a child it left the connection to. None if it is not one of ours."""
    record = master.registry.get(conn.peer.pid)
    if record is None or not conn.peer_is(record.pid, record.start_time):
        return None
    return record


def on_hello(master, conn: Connection, hello: messages.Hello) -> None:
    record = known_worker(master, conn)
    if record is None or hello.name != master.name or hello.pid != conn.peer.pid \
            or hello.slot != record.slot or hello.generation != record.generation:
        master.log.warning("control: refused a worker hello from pid %d (uid %d) claiming slot %d "
                           "generation %d: %s", conn.peer.pid, conn.peer.uid, hello.slot,
                           hello.generation, "not a worker this master started or recorded"
                           if record is None else "its claims do not match the record")
        conn.closing = True
        conn.send(messages.order(ToWorker.REFUSED))
        master.control.after_send(conn)
        return
    if record.conn is not None and record.conn is not conn:
        master.control.close(record.conn)
    conn.worker = record
    record.conn = conn
    record.last_seen = master.clock()
    record.connections, record.requests = hello.connections, hello.requests
    take_back_sockets(master, record, conn)
    if record.state is WorkerState.BOOTING and hello.phase is Phase.READY:
        record.state = WorkerState.READY
        record.ready_at = master.clock()
        master.state_dirty = True
        master.log.info("worker pid %d ready: slot %d, generation %d", record.pid, record.slot,
                        record.generation)
    elif record.state is WorkerState.ACTIVE and hello.phase is Phase.RETIRING:
        record.state = WorkerState.RETIRING     # an adopted worker knows it better
        record.retired_at = master.clock()
        record.connections_at_retire = hello.connections
        master.state_dirty = True
    if record.state is WorkerState.RETIRING:
        settle.send(master, record, ToWorker.RETIRE)      # a reconnecting worker learns it again
    elif record.state is WorkerState.ACTIVE and hello.phase is Phase.READY:
        settle.send(master, record, ToWorker.ACTIVATE)    # it missed it while disconnected
    if not master.stopping:
        master.reconcile(master.clock())


def take_back_sockets(master, record: WorkerRecord, conn: Connection) -> None:
    """An adopted worker hands its listening sockets back with its hello:
    keep them if their inodes are the recorded ones."""
    fds, conn.fds = conn.fds, []
    placeholder = record.adopted and record.listeners is not None and not record.listeners.sockets
    if not fds or not placeholder:
        for fd in fds:
            os.close(fd)
        return
    sockets = [socket.socket(fileno=fd) for fd in fds]
    taken = master.sockets.take_back(sockets, record.listeners.inodes)
    if taken is None:
        master.log.warning("worker pid %d handed back sockets that are not the recorded ones; "
                           "ignored", record.pid)
        for sock in sockets:
            sock.close()
        return
    for slot in master.slots:
        if slot.listeners is record.listeners:
            slot.listeners = taken
    record.listeners = taken


def on_boot_failed(master, conn: Connection, message: messages.BootFailed) -> None:
    record = conn.worker or known_worker(master, conn)
    if record is not None:
        record.boot_error = message.error
    else:
        master.log.warning("control: ignored a boot-failed message from pid %d (uid %d): not a "
                           "worker of this master", conn.peer.pid, conn.peer.uid)
    conn.closing = True
    master.control.after_send(conn)


def on_heartbeat(master, record: WorkerRecord, beat: messages.Heartbeat) -> None:
    record.last_seen = master.clock()
    record.connections = beat.connections
    record.count_requests(beat.requests, record.last_seen)
    record.responses = beat.responses
    record.durations = beat.durations
    record.duration_sum = beat.duration_sum
    record.lag_ms = beat.lag_ms
    record.websockets = beat.websockets
    record.shed = beat.shed
    record.too_busy = beat.too_busy
    if not beat.too_busy:
        record.busy_since = None
    elif record.busy_since is None:
        record.busy_since = record.last_seen


def on_closed(master, conn: Connection) -> None:
    if conn.worker is not None and conn.worker.conn is conn:
        conn.worker.conn = None
