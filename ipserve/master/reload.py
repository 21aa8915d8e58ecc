"""Generations are transactions: successors take their slots together or not at all.

A `Reload` is a set of successor workers, one per target slot, booting beside
the workers that hold those slots now. When every successor is ready, the
master commits it: the slots switch to the successors' sockets in one rule
transaction, and the predecessors retire once the kernel routes the new
sockets. If any successor fails first (exits, or misses boot_timeout), the
reload fails: every successor is killed and every slot stays exactly as it
was, with the configuration and worker count it had.

A deploy (HUP, `ipservectl reload`, TTIN/TTOU, the fresh generation after a
takeover) targets every slot with a new generation and a re-read
configuration. A health replacement (memory, max_requests, busy) targets one
slot, with the running configuration and generation.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from ipserve import config, sdnotify
from ipserve.config import Config, ConfigError
from ipserve.master import policy, settle, slottable, spawning
from ipserve.master.registry import WorkerRecord, WorkerState
from ipserve.master.slottable import Slot
from ipserve.master.sockets import Listeners

# Settings a running master cannot change: they name its socket, rules, port
# and the user its control socket belongs to.
FIXED_ON_RELOAD = ("bind", "name", "runtime_dir", "router", "pid", "user", "group", "admin_bind",
                   "admin_token")


class Kind(enum.Enum):
    DEPLOY = "deploy"
    REPLACEMENT = "replacement"


class Outcome(enum.Enum):
    IN_PROGRESS = "in progress"
    DONE = "done"
    FAILED = "failed"


@dataclasses.dataclass(eq=False)
class Reload:
    kind: Kind
    cfg: Config
    slots: int                    # the slot count once committed
    generation: int
    targets: list[int]
    started: float                # monotonic
    reason: str = ""
    replaces: WorkerRecord | None = None      # a replacement's predecessor
    started_wall: float = dataclasses.field(default_factory=time.time)
    successors: dict[int, WorkerRecord] = dataclasses.field(default_factory=dict)
    outcome: Outcome = Outcome.IN_PROGRESS
    error: str | None = None
    failed_worker: dict | None = None         # pid, slot, error of the successor that failed
    seconds: float | None = None
    finished_wall: float | None = None

    def to_spawn(self) -> list[int]:
        return [slot for slot in self.targets if slot not in self.successors]

    def all_ready(self) -> bool:
        return (not self.to_spawn()
                and all(w.state is WorkerState.READY for w in self.successors.values()))

    def owns(self, record: WorkerRecord) -> bool:
        return self.successors.get(record.slot) is record

    def listeners(self) -> dict[int, Listeners]:
        return {slot: w.listeners for slot, w in self.successors.items()}

    def finish(self, outcome: Outcome, now: float, error: str | None = None,
               failed: WorkerRecord | None = None) -> None:
        self.outcome = outcome
        self.error = error
        self.seconds = round(now - self.started, 3)
        self.finished_wall = time.time()
        if failed is not None:
            self.failed_worker = {"pid": failed.pid, "slot": failed.slot, "error": error}

    def as_status(self) -> dict:
        return {"kind": self.kind.value, "generation": self.generation, "slots": self.slots,
                "state": self.outcome.value, "reason": self.reason, "error": self.error,
                "failed_worker": self.failed_worker, "started": self.started_wall,
                "finished": self.finished_wall, "seconds": self.seconds,
                "failed_pid": None if self.failed_worker is None else self.failed_worker["pid"],
                "booted": sum(1 for w in self.successors.values() if w.ready_at is not None),
                "targets": len(self.targets)}


# ---------------------------------------------------------------- on the master

def begin_deploy(master, slots: int | None = None, reason: str = "reload") -> None:
    """A new generation with the configuration re-read from its sources."""
    if master.stopping:
        master.log.warning("%s ignored: the master is stopping", reason)
        return
    try:
        cfg = reread_config(master)
    except ConfigError as exc:
        master.log.error("%s refused, generation %d keeps serving: %s", reason, master.generation,
                         exc)
        failed = Reload(Kind.DEPLOY, master.cfg, master.slot_count, master.generation, [],
                        master.clock(), reason=reason)
        failed.finish(Outcome.FAILED, master.clock(), str(exc))
        master.remember_deploy(failed)
        master.counters.reload_finished(failed)
        master.notify(sdnotify.Event.RELOAD_REFUSED)
        return
    if master.deploy is not None:
        fail_reload(master, master.deploy, f"superseded by a newer {reason}")
    for replacement in list(master.replacements.values()):
        fail_reload(master, replacement, f"cancelled by a {reason}")
    count = cfg.workers if slots is None else slots
    if count != master.slot_count and not master.sockets.resizable:
        master.log.warning("%s: router %s cannot change the worker count while running "
                           "(restart to apply); keeping %d", reason, master.router.name,
                           master.slot_count)
        count = master.slot_count
    # A generation number is never reused, not even a failed one's: logs stay unambiguous.
    generation = policy.next_generation(master.highest_generation, master.registry)
    master.highest_generation = generation
    master.deploy = Reload(Kind.DEPLOY, cfg, count, generation, list(range(count)), master.clock(),
                           reason=reason)
    master.remember_deploy(master.deploy)
    master.log.info("%s: starting generation %d with %d workers", reason, generation, count)
    master.notify(sdnotify.Event.RELOADING)


def reread_config(master) -> Config:
    fresh = config.resolve(master.cfg.cli)
    for key in FIXED_ON_RELOAD:
        if fresh.values[key] != master.cfg.values[key]:
            kept = "the one it started with" if key == "admin_token" else repr(master.cfg.values[key])
            master.log.warning("reload: %s cannot change on reload (restart to apply); keeping %s",
                               key, kept)
            fresh.values[key] = master.cfg.values[key]
    return fresh


def begin_replacement(master, replacement: policy.Replacement, now: float) -> None:
    """A fresh worker for the slot; the worker replaced retires once it holds the slot."""
    record, reason = replacement.worker, replacement.reason
    if master.stopping or master.deploy is not None or record.slot in master.replacements:
        return
    if master.slots[record.slot].holder is not record:
        return
    if replacement.rate_limited:
        interval = master.cfg.health_retire_interval
        if interval and now - master.last_health_retire < interval:
            return
        master.last_health_retire = now
    slot = master.slots[record.slot]
    if policy.died_young(record, now):
        spawning.back_off(master, slot)    # replaced soon after it started: do not storm
    master.log.warning("replacing worker pid %d (slot %d): %s", record.pid, record.slot, reason)
    record.replacing = reason
    record.replace_cause = replacement.cause
    master.replacements[record.slot] = Reload(Kind.REPLACEMENT, master.cfg, master.slot_count,
                                              record.generation, [record.slot], now,
                                              reason=reason, replaces=record)
    master.state_dirty = True


def progress(master, now: float) -> None:
    """Commit every reload whose successors are all ready."""
    if master.deploy is not None and master.deploy.all_ready():
        commit(master, master.deploy, now)
    for index, replacement in list(master.replacements.items()):
        if replacement.all_ready():
            commit(master, replacement, now)


def commit(master, reload: Reload, now: float) -> None:
    """The successors take their slots together: one table, one rule write."""
    if reload.kind is Kind.DEPLOY:
        before, master.cfg = master.cfg, reload.cfg
        master.apply_log_settings(before)
        master.generation = reload.generation
        resize(master, reload.slots)
        master.deploy = None
    else:
        master.replacements.pop(reload.targets[0], None)
    for index, successor in reload.successors.items():
        slot = master.slots[index]
        unheld(master, slot)
        slot.holder = successor
        slot.listeners = successor.listeners
    reload.finish(Outcome.DONE, now)
    if reload.kind is Kind.DEPLOY:
        master.counters.reload_finished(reload)
    master.routes.want(slottable.table(master.slots))
    master.routes.step()
    master.state_dirty = True
    if reload.kind is Kind.DEPLOY:
        master.log.info("%s: generation %d is ready on every slot (%.2fs); switching",
                        reload.reason, reload.generation, reload.seconds)
        master.notify(sdnotify.Event.READY)


def resize(master, count: int) -> None:
    if count > len(master.slots):
        master.slots += [Slot(i) for i in range(len(master.slots), count)]
    elif count < len(master.slots):
        # Their workers retire once the kernel routes the smaller table.
        for slot in master.slots[count:]:
            unheld(master, slot)
        master.slots = master.slots[:count]


def unheld(master, slot: Slot) -> None:
    """The slot is leaving its sockets. A live holder closes our copy when it
    retires; a slot whose holder died leaves them to settle, which closes
    them once the kernel routes elsewhere (so nothing is refused meanwhile)."""
    settle.stop_refusing(master, slot)
    if slot.listeners is not None and slot.holder is None:
        master.unrouted.append(slot.listeners)


def fail_reload(master, reload: Reload, why: str, failed: WorkerRecord | None = None) -> None:
    """Nothing switches: kill every successor, keep every slot as it is."""
    now = master.clock()
    reload.finish(Outcome.FAILED, now, why, failed)
    if reload.kind is Kind.DEPLOY:
        master.counters.reload_finished(reload)
    for successor in reload.successors.values():
        if successor.state in (WorkerState.BOOTING, WorkerState.READY):
            settle.kill(master, successor)
    if reload is master.deploy:
        master.deploy = None
        master.log.error("%s to generation %d failed, no slot switched; generation %d keeps "
                         "serving every slot: %s", reload.reason, reload.generation,
                         master.generation, why)
        if not master.stopping:      # STOPPING=1 follows: a stop is not a finished reload
            master.notify(sdnotify.Event.READY)
    elif master.replacements.get(reload.targets[0]) is reload:
        del master.replacements[reload.targets[0]]
        if reload.replaces is not None:
            reload.replaces.replacing = None   # try again later, backed off
            reload.replaces.replace_cause = None
        spawning.back_off(master, master.slots[reload.targets[0]])
        master.log.error("replacement for slot %d failed, worker pid %s keeps it: %s",
                         reload.targets[0], getattr(reload.replaces, "pid", "?"), why)
    master.state_dirty = True


def spawn_successor(master, reload: Reload, index: int) -> None:
    listeners = None
    try:
        listeners = master.sockets.open(index)
        record = spawning.spawn_worker(master, reload.cfg, index, reload.generation, listeners)
    except OSError as exc:      # out of descriptors or processes: the reload fails whole
        if listeners is not None:
            listeners.close()
        fail_reload(master, reload, f"cannot start a worker for slot {index}: {exc}")
        return
    reload.successors[index] = record
