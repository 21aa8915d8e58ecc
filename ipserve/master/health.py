"""Health: hung workers, memory, load, max_requests, drains that last too long.

Decisions come from master.policy; this module carries them out on the
master (signals, replacements, asking retiring workers to close).
"""

from __future__ import annotations

import signal

from ipserve.master import policy, reload, settle
from ipserve.master.registry import ExitReason, WorkerState

HUNG_KILL_DELAY = 2.0   # a hung worker's time to dump its stacks after SIGABRT


def kill_overdue_boots(master, now: float) -> None:
    """A worker not ready within boot_timeout is killed; if it was a reload's
    successor, that reload fails now (no slot switches)."""
    for record in policy.overdue_boots(master.registry, now, master.cfg.boot_timeout):
        record.boot_error = (f"worker pid {record.pid} (slot {record.slot}) not ready within "
                             f"boot_timeout ({master.cfg.boot_timeout:g}s)")
        master.log.error("%s: killing it", record.boot_error)
        settle.kill(master, record)
        for pending in master.reloads():
            if pending.owns(record):
                reload.fail_reload(master, pending, record.boot_error, record)


def check(master, now: float) -> None:
    cfg = master.cfg
    for record in policy.hung(master.registry, now, cfg.timeout):
        master.log.error("worker pid %d (slot %d) sent no heartbeat for %.0fs: SIGABRT (stacks "
                         "follow in its log), then SIGKILL", record.pid, record.slot,
                         now - record.last_seen)
        record.signal(signal.SIGABRT)
        record.state = WorkerState.HUNG
        record.hung_at = now
        master.state_dirty = True
        slot = master.slots[record.slot] if record.slot < len(master.slots) else None
        if slot is not None and slot.holder is record:
            # Its replacement accepts on the same sockets, so what queued
            # while it was stuck is served, not stranded.
            slot.holder = None
            slot.waiting_since = now
    for record in master.registry.in_state(WorkerState.HUNG):
        if now - record.hung_at > HUNG_KILL_DELAY:
            record.signal(signal.SIGKILL)
            record.hung_at = now
    for replacement in policy.health_replacements(
            master.registry, now, worker_memory=cfg.worker_memory,
            max_requests=bool(cfg.max_requests), busy_retire_after=cfg.busy_retire_after):
        reload.begin_replacement(master, replacement, now)
    for action, record in policy.cluster_memory_actions(master.registry, cfg.cluster_memory):
        if action == "replace":
            reload.begin_replacement(master, policy.Replacement(
                record, ExitReason.MEMORY, "largest worker while cluster_memory is exceeded", True),
                now)
            continue
        record.replace_cause = ExitReason.MEMORY
        if action == "kill":
            master.log.warning("cluster_memory above 95%%: killing retiring worker pid %d", record.pid)
            record.signal(signal.SIGKILL)   # it stays RETIRING: its exit is expected
        elif not record.asked_to_exit:
            master.log.warning("cluster_memory above 80%%: asking retiring worker pid %d to exit",
                               record.pid)
            record.asked_to_exit = True
            settle.ask_to_close(master, record)
    for record in policy.overdue_retirees(master.registry, now, cfg.retired_timeout):
        master.log.info("worker pid %d retiring for %.0fs (retired_timeout): closing its connections",
                        record.pid, now - record.retired_at)
        settle.ask_to_close(master, record)
        record.retired_at = now   # ask again after another retired_timeout if it lingers


def close_retiring(master, why: str) -> None:
    for record in master.registry.in_state(WorkerState.RETIRING):
        master.log.info("closing retired worker pid %d: %s", record.pid, why)
        settle.ask_to_close(master, record)
