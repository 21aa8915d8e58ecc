"""The master: one loop that dispatches events, and the side effects they call for.

Events come from one selector: signals (queued by their handlers, as in
gunicorn's arbiter), the control socket (workers and ipservectl), worker exits
(pidfds), finished rule writes (a background thread) and slots refusing
connections. Every handler runs under `guard`: an exception is logged with
its traceback and the master goes on serving. Decisions come from
master.policy (pure); this module spawns, signals and asks for routes.

Reading order: run() -> dispatch() -> the on_* handlers -> tick().
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import selectors
import signal
import socket
import time
import traceback
from typing import Callable

from ipserve import children, config, control, logs, sdnotify
from ipserve.config import Config
from ipserve.errors import UsageError
from ipserve.master import (adoption, commands, health, link, policy, reload, settle, slottable,
                            spawning)
from ipserve.master.connections import ControlServer
from ipserve.master.counters import ClusterCounters
from ipserve.master.events import Event
from ipserve.master.registry import SERIES_INTERVAL, Registry, WorkerRecord, WorkerState
from ipserve.master.reload import Kind, Outcome, Reload
from ipserve.master.routes import Routes, RouteWriter
from ipserve.master.slottable import Slot
from ipserve.master.state import RecordedWorker, render
from ipserve.messages import ToWorker

TICK = 0.1
STOP_KILL_GRACE = 2.0
HISTORY = 20            # reloads and leak reports kept for status
PUBLISH_INTERVAL = 1.0  # how often the admin endpoint gets a fresh status


class StopMode(enum.Enum):
    GRACEFUL = "graceful"   # TERM: finish what they hold, up to graceful_timeout
    QUICK = "quick"         # INT/QUIT: close now


class Master:
    def __init__(self, cfg: Config, router, sockets, spawner, log: logging.Logger, *,
                 state_path: str, control_owner: tuple[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic, threaded_routes: bool = True,
                 write_state: Callable[[str, dict], None] | None = None,
                 notifier: sdnotify.Notifier | None = None):
        self.cfg = cfg
        self.router = router
        self.sockets = sockets
        self.spawner = spawner
        self.log = log
        self.clock = clock
        self.name = cfg.name
        self.state_path = state_path
        self.control_owner = control_owner
        self.write_state = write_state
        self.selector = selectors.DefaultSelector()
        self.registry = Registry()
        self.slots: list[Slot] = [Slot(i) for i in range(cfg.workers)]
        self.unrouted: list = []     # our copies of sockets left by dead holders, to close
        self.generation = 1                      # of the workers that hold the slots
        self.highest_generation = 1              # the highest number ever started
        self.serial = 0
        self.deploy: Reload | None = None
        self.replacements: dict[int, Reload] = {}
        self.last_reload: Reload | None = None
        self.reload_history: collections.deque[Reload] = collections.deque(maxlen=HISTORY)
        self.counters = ClusterCounters()
        self.leak_reports: collections.deque[dict] = collections.deque(maxlen=HISTORY)
        self.admin = None            # master.admin.AdminServer, when admin_bind is set
        self.last_publish = -1e9
        self.stopping: StopMode | None = None
        self.stop_deadline = 0.0
        self.killed_at_deadline = False
        self.handed_over = False
        self.successor_pid: int | None = None     # the master we handed over to
        self.notifier = notifier or sdnotify.Notifier(None, log)   # systemd, if it listens
        self.serving_since: float | None = None   # every slot had an active holder once
        self.adopting_until: float | None = None
        self.pending_signals: collections.deque[int] = collections.deque()
        self.next_spawn = 0.0
        self.last_measure = -1e9
        self.last_health_retire = -1e9
        self.state_dirty = True
        self.started = clock()
        self.error_counts: dict[str, tuple[float, int]] = {}
        self.route_wakeup_r, self.route_wakeup_w = socket.socketpair()
        self.route_wakeup_r.setblocking(False)
        self.route_wakeup_w.setblocking(False)
        self.routes = Routes(RouteWriter(router, self.route_wakeup_w, threaded=threaded_routes), clock)
        self.selector.register(self.route_wakeup_r, selectors.EVENT_READ, (Event.ROUTES, None))
        self.control = ControlServer(control.socket_path(cfg.runtime_dir, cfg.name), self.selector,
                                     log, clock, is_admin=commands.authorized,
                                     is_worker=lambda pid: self.registry.get(pid) is not None,
                                     start_time=spawner.start_time)
        self.control.on_messages = lambda conn, received: link.on_messages(self, conn, received)
        self.control.on_closed = lambda conn: link.on_closed(self, conn)

    @property
    def slot_count(self) -> int:
        return len(self.slots)

    def apply_log_settings(self, before: Config) -> None:
        """A reload changes how the master logs as it does for the new workers."""
        keys = ("error_log", "log_level", "log_format")
        if all(before.values[key] == self.cfg.values[key] for key in keys):
            return
        try:
            logs.setup_error_log(self.cfg.error_log, self.cfg.log_level, owner=self.control_owner,
                                 log_format=self.cfg.log_format)
        except UsageError as exc:      # a log file that is not safely ours
            self.log.error("the master keeps its error log as it was: %s", exc)

    def remember_deploy(self, deploy: Reload) -> None:
        self.last_reload = deploy
        self.reload_history.append(deploy)
        self.last_publish = -1e9       # show it on the dashboard at once

    def notify(self, event: sdnotify.Event, pid: int | None = None) -> None:
        """Tell systemd (when it listens) what just happened, with a fresh STATUS=."""
        if self.notifier.enabled:
            self.notifier.notify(event, sdnotify.status_text(self), pid=pid)

    def reloads(self) -> list[Reload]:
        """Reloads in progress: the deploy, if any, and health replacements."""
        return ([self.deploy] if self.deploy else []) + list(self.replacements.values())

    # ================================================================ the loop
    def run(self) -> int:
        self.install_signals()
        self.control.open(self.control_owner)
        self.log.info("master pid %d serving %s on %s with %d workers", os.getpid(), self.cfg.app,
                      ", ".join(map(str, self.cfg.bind)), self.slot_count)
        self.guard(self.begin)
        while not self.finished():
            for key, mask in self.selector.select(TICK):
                self.guard(self.dispatch, key, mask)
            while self.pending_signals:
                self.guard(self.on_signal, self.pending_signals.popleft())
            self.guard(self.tick)
            self.guard(self.flush_state)
            self.guard(self.publish)
        if self.handed_over:   # systemd follows the successor before our exit reaches it
            self.guard(self.notify, sdnotify.Event.MAIN_PID, self.successor_pid)
        return 0

    def dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        event, obj = key.data
        if event is Event.SIGNAL:
            drain(self.wakeup_r)
        elif event is Event.ACCEPT:
            self.control.accept()
        elif event is Event.CONNECTION:
            if mask & selectors.EVENT_WRITE:
                self.control.writable(obj)
            if mask & selectors.EVENT_READ and not obj.closed:
                self.control.read(obj)
        elif event is Event.WORKER_EXIT:
            self.on_worker_exit(obj)
        elif event is Event.ROUTES:
            drain(self.route_wakeup_r)
            self.on_routes_written()
        elif event is Event.REFUSE:
            settle.refuse_connections(self, obj, key.fileobj)

    def guard(self, handler: Callable, *args) -> None:
        """Run one handler; an unexpected exception is logged (at most once a
        minute per place, with a count) and the master keeps serving."""
        try:
            handler(*args)
        except Exception as exc:   # noqa: BLE001 - the master must not die of one bug
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            where = f"{type(exc).__name__} at {os.path.basename(frame.filename)}:{frame.lineno}"
            now = self.clock()
            last, count = self.error_counts.get(where, (-1e9, 0))
            if now - last >= 60.0:
                suffix = f" (and {count} more like it in the last minute)" if count else ""
                self.log.error("unexpected error in %s%s; the master keeps serving:\n%s",
                               getattr(handler, "__name__", "handler"), suffix,
                               traceback.format_exc().rstrip())
                self.error_counts[where] = (now, 0)
            else:
                self.error_counts[where] = (last, count + 1)

    def finished(self) -> bool:
        """Handed over, or stopped: every worker gone and our rules removed."""
        if self.handed_over:
            return True
        return (self.stopping is not None and not len(self.registry) and self.routes.removed
                and not self.routes.in_flight)

    # ================================================================ start
    def begin(self) -> None:
        """Open every slot's sockets, route them (clients queue until each
        slot's worker accepts), and let tick() spawn the workers, paced."""
        now = self.clock()
        if self.adopting_until is not None and self.sockets.shared:
            return   # the reuseport group comes back from the adopted workers
        for slot in self.slots:
            if slot.listeners is None and slot.holder is None:
                slot.waiting_since = now
                try:
                    slot.listeners = self.sockets.open(slot.index)
                except OSError as exc:   # spawn_holder tries again
                    self.log.error("slot %d: cannot open its socket: %s", slot.index, exc)
        self.routes.want(slottable.table(self.slots))
        self.routes.step()

    # ================================================================ signals
    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in SIGNAL_ACTIONS:
            signal.signal(signum, lambda signum, frame: self.pending_signals.append(signum))
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)   # wakes the loop to reap
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, (Event.SIGNAL, None))

    def on_signal(self, signum: int) -> None:
        self.log.info("received %s", signal.Signals(signum).name)
        SIGNAL_ACTIONS[signum](self)

    # ================================================================ tick
    def tick(self) -> None:
        now = self.clock()
        self.notifier.tick(now, lambda: sdnotify.status_text(self))   # a hung loop stops WATCHDOG=1
        self.control.resume_if_due()
        self.control.close_silent(now)
        if os.getpid() == 1:
            children.reap_orphans()   # a container's init inherits every orphan
        self.measure(now)
        if self.stopping:
            self.stop_step(now)
            self.on_routes_written()
            return
        if self.adopting_until is not None and (now >= self.adopting_until
                                                or adoption.all_adopted(self)):
            adoption.end_adoption(self)
        health.kill_overdue_boots(self, now)
        self.spawn_step(now)
        self.reconcile(now)
        settle.refuse_waiting_slots(self, now)
        health.check(self, now)
        for slot in self.slots:     # a worker that lasts ends its slot's back-off
            h = slot.holder
            if (slot.failures and h is not None and h.state is WorkerState.ACTIVE
                    and not h.replacing and not policy.died_young(h, now)):
                slot.failures = 0

    def measure(self, now: float) -> None:
        if now - self.last_measure < 1.0:
            return
        self.last_measure = now
        for record in self.registry:
            record.measure(now)

    # ================================================================ spawning
    def spawn_step(self, now: float) -> None:
        """Start what is due, at most policy.max_booting() at once and one per
        spawn_interval: a large start or reload is paced, never a storm, and
        the loop answers signals between any two spawns."""
        while now >= self.next_spawn and self.registry.booting_count() < policy.max_booting():
            job = self.next_spawn_job(now)
            if job is None:
                return
            job()
            self.next_spawn = now + self.cfg.spawn_interval
            if self.cfg.spawn_interval > 0:
                return

    def next_spawn_job(self, now: float) -> Callable[[], None] | None:
        # Slots without a worker first: their clients are waiting. (Not while a
        # reuseport group is still to come back from adopted workers.)
        # A slot being replaced waits for its successor instead.
        for slot in self.slots:
            if (slot.holder is None and now >= slot.spawn_after
                    and slot.index not in self.replacements
                    and not (self.adopting_until is not None and self.sockets.shared)):
                return lambda slot=slot: spawning.spawn_holder(self, slot)
        for pending in self.reloads():
            for index in pending.to_spawn():
                if pending.kind is Kind.REPLACEMENT and now < self.slots[index].spawn_after:
                    continue
                return lambda pending=pending, index=index: reload.spawn_successor(self, pending, index)
        return None

    # ================================================================ routing
    def reconcile(self, now: float) -> None:
        """Commit the reloads that are ready, write the routes that are due,
        and act on what the kernel routes (a write done inline, as in unit
        tests, is acted on at once; a threaded one when its event comes)."""
        reload.progress(self, now)
        self.routes.step()
        self.on_routes_written()

    def on_routes_written(self) -> None:
        for result in self.routes.collect():
            if result.error is not None:
                self.log.error("routing update failed, the kernel keeps the previous routes "
                               "(retry in %.1fs): %s", max(0.0, self.routes.retry_at - self.clock()),
                               result.error)
            else:
                self.log.debug("routes: %s", result.write)
        settle.settle(self)

    # ================================================================ workers
    def on_worker_exit(self, record: WorkerRecord) -> None:
        self.selector.unregister(record.process.fileno())
        code = record.process.reap()
        record.process.close()
        if record.conn is not None:
            self.control.read_last_words(record.conn)
        self.registry.remove(record)
        if record.conn is not None:
            self.control.close(record.conn)
        now = self.clock()
        self.log_exit(record, code, now)
        self.counters.worker_exited(record, policy.exit_reason(record, self.stopping is not None))
        self.state_dirty = True
        slot = self.slots[record.slot] if record.slot < len(self.slots) else None
        still_routed = slot is not None and record.listeners is slot.listeners
        if record.listeners is not None and not still_routed:
            record.listeners.close()
        if self.stopping:
            return
        for pending in self.reloads():
            if pending.owns(record) and pending.outcome is Outcome.IN_PROGRESS:
                why = record.boot_error or (f"worker pid {record.pid} (slot {record.slot}) "
                                            f"{describe_exit(code)} before it was ready")
                reload.fail_reload(self, pending, why, record)
                return
        if slot is not None and slot.holder is record:
            # Its replacement accepts on the same sockets: what queued there
            # meanwhile is served, not refused.
            slot.holder = None
            if slot.waiting_since is None:
                slot.waiting_since = now
            if policy.died_young(record, now) or record.state is WorkerState.HUNG:
                spawning.back_off(self, slot)
            if record.slot in self.replacements:   # its successor takes over once ready
                self.replacements[record.slot].replaces = None

    def log_exit(self, record: WorkerRecord, code: int | None, now: float) -> None:
        expected = (self.stopping or record.state in (WorkerState.RETIRING, WorkerState.KILLED)
                    or code == 0)
        self.log.log(logging.INFO if expected else logging.ERROR,
                     "worker pid %d (slot %d, generation %d, %s) %s after %.1fs", record.pid,
                     record.slot, record.generation, record.state.value, describe_exit(code),
                     now - record.spawned_at)

    # ================================================================ stopping
    def begin_stop(self, mode: StopMode) -> None:
        if self.stopping is StopMode.QUICK or self.stopping is mode:
            return
        first = self.stopping is None
        self.stopping = mode
        if first:
            for pending in self.reloads():
                reload.fail_reload(self, pending, "cancelled: the master is stopping")
            # Nothing new reaches the workers; what they hold stays connected.
            self.routes.drain()
            for slot in self.slots:
                settle.stop_refusing(self, slot)
            self.notify(sdnotify.Event.STOPPING)
        now = self.clock()
        if mode is StopMode.GRACEFUL:
            self.stop_deadline = now + self.cfg.graceful_timeout + STOP_KILL_GRACE
            self.log.info("graceful stop: workers finish what they hold (up to %gs)",
                          self.cfg.graceful_timeout)
            for record in self.registry:
                record.signal(signal.SIGTERM)
        else:
            self.stop_deadline = now + STOP_KILL_GRACE
            self.log.info("quick stop")
            for record in self.registry:
                record.signal(signal.SIGQUIT)

    def stop_step(self, now: float) -> None:
        if not len(self.registry):
            self.routes.remove()         # nothing left to drain
            return
        if now <= self.stop_deadline:
            return
        if self.killed_at_deadline:
            self.log.error("workers %s survive SIGKILL; giving up on them",
                           sorted(w.pid for w in self.registry))
            for record in self.registry:
                self.selector.unregister(record.process.fileno())
                record.process.close()
                self.registry.remove(record)
            return
        for record in self.registry:
            self.log.warning("worker pid %d still running at the deadline: SIGKILL", record.pid)
            record.signal(signal.SIGKILL)
        self.killed_at_deadline = True
        self.stop_deadline = now + 5.0

    # ================================================================ state and status
    def flush_state(self, force: bool = False) -> None:
        if not (self.state_dirty or force) or self.write_state is None or self.handed_over:
            return
        self.state_dirty = False
        holders = {s.holder.pid for s in self.slots if s.holder is not None}
        workers = [RecordedWorker(pid=w.pid, start_time=w.start_time, slot=w.slot,
                                  generation=w.generation, serial=w.serial, state=w.state.value,
                                  port=w.port or 0,
                                  inodes=w.listeners.inodes if w.listeners is not None else (),
                                  holder=w.pid in holders)
                   for w in self.registry]
        self.write_state(self.state_path, render(
            self.name, os.getpid(), self.router.name, [str(b) for b in self.cfg.bind],
            self.highest_generation, self.serial, self.slot_count, workers,
            self.cfg.graceful_timeout))

    def publish(self) -> None:
        """Hand the admin endpoint a fresh status, about once a second. It
        serves only what it was handed: an admin client never runs the loop."""
        now = self.clock()
        if self.admin is None or now - self.last_publish < PUBLISH_INTERVAL:
            return
        self.last_publish = now
        self.admin.publish(self.status(), self.series())

    def series(self) -> dict:
        """The last minutes of each worker's RSS and hub lag, for sparklines."""
        return {"interval_s": SERIES_INTERVAL,
                "workers": {str(w.pid): {"rss": [rss for rss, _ in w.series],
                                         "lag_ms": [lag for _, lag in w.series]}
                            for w in self.registry}}

    def memory(self) -> dict:
        limit = self.cfg.cluster_memory
        return {"cluster_rss": sum(w.rss for w in self.registry), "cluster_limit": limit,
                "retire_at": None if limit is None else int(limit * policy.CLUSTER_RETIRE_AT),
                "kill_at": None if limit is None else int(limit * policy.CLUSTER_KILL_AT),
                "worker_limit": self.cfg.worker_memory}

    def status(self) -> dict:
        now = self.clock()
        workers = sorted(self.registry, key=lambda w: (w.generation, w.slot, w.serial))
        installed = self.routes.installed or {}
        reload = self.deploy or self.last_reload
        return {
            "time": time.time(),
            "name": self.name, "router": self.router.name,
            "routing": self.router.describe() | {"sockets": self.sockets.describe()},
            "bind": [str(b) for b in self.cfg.bind], "app": self.cfg.app,
            "master": {"pid": os.getpid(), "generation": self.generation,
                       "uptime_s": round(now - self.started, 1),
                       "stopping": None if self.stopping is None else self.stopping.value,
                       "serving": self.serving_since is not None,
                       "adopting": self.adopting_until is not None},
            "reload": None if reload is None else reload.as_status(),
            "replacements": [r.as_status() | {"slot": slot} for slot, r in self.replacements.items()],
            "slots": self.slot_count,
            "slot_table": [s.as_status(now) for s in self.slots],
            "routes": {str(slot): port for slot, port in sorted(installed.items())},
            "route_error": self.routes.error,
            "workers": [w.as_status(now) for w in workers],
            "memory": self.memory(),
            "reloads": [r.as_status() for r in self.reload_history],
            "counters": self.counters.as_status(workers),
            "leak_reports": list(self.leak_reports),
        }

    def close(self) -> None:
        """At exit: a master that handed over leaves everything to its successor."""
        self.control.shutdown()
        self.routes.writer.close()
        if self.admin is not None:
            self.admin.close()
        if self.handed_over:
            return
        for record in self.registry:
            if record.listeners is not None:
                record.listeners.close()
        for slot in self.slots:
            if slot.listeners is not None:
                slot.listeners.close()
        for listeners in self.unrouted:
            listeners.close()
        self.sockets.close()
        self.router.close()


# ---------------------------------------------------------------- helpers

def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def reopen_logs(master: Master) -> None:
    logs.reopen_error_log()
    master.log.info("log files reopened")
    for record in master.registry:
        settle.send(master, record, ToWorker.REOPEN)


def resize_by(factor: float) -> Callable[[Master], None]:
    def handle(master: Master) -> None:
        count = int(master.slot_count * factor)
        if not 1 <= count <= config.MAX_WORKERS:
            master.log.warning("ignored: the worker count stays %d (1 to %d)", master.slot_count,
                               config.MAX_WORKERS)
            return
        reload.begin_deploy(master, slots=count, reason="TTIN" if factor > 1 else "TTOU")
    return handle


SIGNAL_ACTIONS: dict[int, Callable[[Master], None]] = {
    signal.SIGTERM: lambda m: m.begin_stop(StopMode.GRACEFUL),
    signal.SIGINT: lambda m: m.begin_stop(StopMode.QUICK),
    signal.SIGQUIT: lambda m: m.begin_stop(StopMode.QUICK),
    signal.SIGHUP: lambda m: reload.begin_deploy(m, reason="reload"),
    signal.SIGUSR1: lambda m: health.close_retiring(m, "kill-retired requested"),
    signal.SIGUSR2: reopen_logs,
    signal.SIGTTIN: resize_by(2),
    signal.SIGTTOU: resize_by(0.5),
}
