"""Starting workers: their spec, their record, and the back-off of slots
whose workers keep ending young.
"""

from __future__ import annotations

import os
import random
import selectors

from ipserve.config import Config
from ipserve.http import tls
from ipserve.master import policy, slottable
from ipserve.master.events import Event
from ipserve.master.registry import WorkerRecord
from ipserve.master.slottable import Slot
from ipserve.master.sockets import Listeners


def worker_spec(cfg: Config, slot: int, generation: int, serial: int, control_path: str,
                shared: bool) -> dict:
    """What a worker needs to know, on its command line."""
    values = cfg.to_json()
    return {"name": cfg.name, "slot": slot, "generation": generation, "serial": serial,
            "control": control_path, "master_uid": os.geteuid(), "shared_listeners": shared,
            **{key: values[key] for key in (
                "app", "bind", "chdir", "error_log", "access_log", "log_level", "graceful_timeout",
                "busy_lag", "block_report", "limit_request_line", "limit_request_fields",
                "limit_request_field_size", "limit_request_body", "header_timeout",
                "body_timeout", "keepalive", "worker_connections", "ws_send_timeout",
                "ws_max_message", "shed_load", "access_log_format", "log_format",
                "leak_report", "certfile", "keyfile", "ca_certs", "ssl_client_verify",
                "ssl_minimum_version", "ssl_ciphers")}}


def tls_files(cfg: Config) -> tuple[dict[str, int], str | None]:
    """With TLS: the certificate, key and CA files read now, by the master (root:
    the worker's user need not be able to read the key), as sealed anonymous
    files to pass to the worker, which closes them once loaded. Read at every
    spawn, as the worker reads the application's code: a new generation
    serves renewed files. A file we cannot read is the worker's boot failure
    to report (the reload fails and status says why), not the master's."""
    settings = tls.TlsSettings.from_settings(cfg.values)
    if settings is None:
        return {}, None
    try:
        return tls.seal_all(tls.read_files(settings)), None
    except tls.TlsError as exc:
        return {}, str(exc)


def spawn_worker(master, cfg: Config, slot: int, generation: int, listeners: Listeners) -> WorkerRecord:
    master.serial += 1
    spec = worker_spec(cfg, slot, generation, master.serial, master.control.path, master.sockets.shared)
    tls_fds, tls_error = tls_files(cfg)
    if tls_fds:
        spec["tls_fds"] = tls_fds
    if tls_error:
        spec["tls_error"] = tls_error
    try:
        process = master.spawner.spawn(spec, listeners.fds())
    finally:
        tls.close_all(tls_fds)       # the worker has its own copies of the descriptors
    now = master.clock()
    record = WorkerRecord(pid=process.pid, slot=slot, generation=generation, serial=master.serial,
                          process=process, start_time=process.start_time, spawned_at=now,
                          last_seen=now, listeners=listeners,
                          max_requests=cfg.max_requests + random.randint(0, cfg.max_requests_jitter)
                          if cfg.max_requests else 0)
    track(master, record)
    master.log.debug("spawned worker pid %d: slot %d, generation %d", record.pid, slot, generation)
    return record


def track(master, record: WorkerRecord) -> None:
    master.registry.add(record)
    master.selector.register(record.process.fileno(), selectors.EVENT_READ, (Event.WORKER_EXIT, record))
    record.measure(master.clock())
    master.state_dirty = True


def spawn_holder(master, slot: Slot) -> None:
    """A worker for a slot that has none, on the slot's own sockets (so what
    queued there is served). New sockets only if the slot has none that work:
    never opened yet, or a dead adopted worker's that were never handed back."""
    try:
        if slot.listeners is None or not slot.listeners.sockets:
            slot.listeners = master.sockets.open(slot.index)
            master.routes.want(slottable.table(master.slots))
        slot.holder = spawn_worker(master, master.cfg, slot.index, master.generation,
                                   slot.listeners)
    except OSError as exc:      # out of descriptors or processes: try again, backed off
        master.log.error("slot %d: cannot start a worker: %s", slot.index, exc)
        back_off(master, slot)


def back_off(master, slot: Slot) -> None:
    """Its workers keep ending young: wait 1, 2, 4 ... 30 s before the next."""
    slot.failures += 1
    delay = policy.backoff_delay(slot.failures)
    slot.spawn_after = master.clock() + delay
    if slot.failures > 1:
        master.log.warning("slot %d: next worker in %.0fs (%d ended young in a row)",
                           slot.index, delay, slot.failures)
