"""The master's loop: signals, the control socket, worker exits and timers.

Signal handlers only queue the signal (as in gunicorn's arbiter); one loop
dispatches everything. Decisions come from master.policy; this module carries
them out (spawning, signalling, writing routes).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time

from ipserve import config, control, logs, users
from ipserve.config import Config, ConfigError
from ipserve.listeners import close_all, open_listeners
from ipserve.master import policy
from ipserve.master.registry import WorkerRecord
from ipserve.routing import RouteError, Router, RouterUnavailable

TICK = 0.25
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)
DIED_YOUNG = 5.0
HUNG_KILL_DELAY = 2.0  # time a hung worker gets to dump its stacks after SIGABRT
# Settings a running master cannot change: they name its socket, rules and port.
FIXED_ON_RELOAD = ("bind", "name", "runtime_dir", "router", "pid")  # a worker that dies sooner than this after spawning backs its slot off


class Connection:
    """One accepted control connection: a worker or an ipservectl request."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = control.LineReader()
        self.worker: WorkerRecord | None = None
        self.fds: list[int] = []   # descriptors received and not yet claimed

    def send(self, message: dict) -> bool:
        try:
            self.sock.sendall(control.encode(message))
            return True
        except OSError:
            return False


class Master:
    def __init__(self, cfg: Config, router: Router, log: logging.Logger):
        self.cfg = cfg
        self.router = router
        self.log = log
        self.slots = cfg.workers
        self.generation = 1
        self.workers: dict[int, WorkerRecord] = {}
        self.installed: dict[int, int] = {}
        self.selector = selectors.DefaultSelector()
        self.pending_signals: collections.deque[int] = collections.deque()
        self.stopping: str | None = None          # None | "graceful" | "quick"
        self.stop_deadline = 0.0
        self.killed_at_deadline = False
        self.quick_failures: dict[int, int] = collections.defaultdict(int)
        self.respawn_at: dict[int, float] = {}
        self.route_error: str | None = None
        self.spawn_queue: list[int] = []          # slots of a reload still to start
        self.next_spawn = 0.0
        self.reload: dict | None = None           # the last reload and its outcome
        self.adopting_until = 0.0                 # after a takeover: wait for workers to reconnect
        self.handed_over = False
        self.last_measure = 0.0
        self.last_health_retire = -1e9
        self.spawn_serial = 0
        self.spare_listeners: dict[int, list[socket.socket]] = {}
        self.started = time.time()
        self.socket_path = control.socket_path(cfg.runtime_dir, cfg.name)

    # ================================================================ set-up
    def open_control_socket(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        sock.listen(256)
        sock.setblocking(False)
        if self.cfg.user is not None:
            # Workers run as `user` and must reach the (0600) control socket.
            uid, gid = users.ids(self.cfg.user, self.cfg.group)
            os.chown(self.socket_path, uid, gid)
        self.listener = sock
        self.selector.register(sock, selectors.EVENT_READ, ("accept", None))

    def install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = socket.socketpair()
        self.wakeup_r.setblocking(False)
        self.wakeup_w.setblocking(False)
        signal.set_wakeup_fd(self.wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, lambda signum, frame: self.pending_signals.append(signum))
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, ("signal", None))

    # ================================================================ loop
    def run(self) -> int:
        self.install_signals()
        self.open_control_socket()
        self.log.info("master pid %d serving %s on %s with %d workers",
                      os.getpid(), self.cfg.app, ", ".join(map(str, self.cfg.bind)), self.slots)
        while True:
            for key, _ in self.selector.select(TICK):
                kind, obj = key.data
                if kind == "accept":
                    self.accept()
                elif kind == "conn":
                    self.read(obj)
                elif kind == "pidfd":
                    self.worker_exited(obj)
                elif kind == "signal":
                    self.drain_wakeups()
            while self.pending_signals:
                self.handle_signal(self.pending_signals.popleft())
            if self.handed_over:
                return 0
            if self.stopping:
                if self.stop_step():
                    return 0
                continue
            self.tick()

    def tick(self) -> None:
        now = time.monotonic()
        self.measure(now)
        if now < self.adopting_until:
            return  # workers of the previous master are still reconnecting
        if self.adopting_until:
            self.adopting_until = 0.0
            self.end_adoption()
        self.kill_slow_boots(now)
        self.spawn_reload(now)
        self.spawn_missing(now)
        if self.update_routes():
            self.retire_superseded()
        self.close_overdue(now)
        self.check_reload()
        self.check_health(now)

    # ================================================================ signals
    def drain_wakeups(self) -> None:
        try:
            while self.wakeup_r.recv(512):
                pass
        except BlockingIOError:
            pass

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        self.log.info("received %s", name)
        getattr(self, "handle_" + name[3:].lower())()

    def handle_term(self) -> None:
        self.begin_stop("graceful")

    def handle_int(self) -> None:
        self.begin_stop("quick")

    handle_quit = handle_int

    def handle_hup(self) -> None:
        self.begin_reload()

    def handle_usr1(self) -> None:
        self.close_retiring("kill-retired requested")

    def handle_usr2(self) -> None:
        logs.setup_error_log(self.cfg.error_log, self.cfg.log_level)
        self.log.info("log files reopened")
        for record in self.workers.values():
            if record.conn is not None:
                record.conn.send({"type": "reopen"})

    def handle_ttin(self) -> None:
        if self.slots >= 1024:
            self.log.warning("TTIN ignored: already at 1024 workers")
            return
        self.begin_reload(slots=self.slots * 2)

    def handle_ttou(self) -> None:
        if self.slots == 1:
            self.log.warning("TTOU ignored: already at one worker")
            return
        self.begin_reload(slots=self.slots // 2)

    # ================================================================ generations
    def begin_reload(self, slots: int | None = None) -> None:
        """Start a new generation; its workers take their slots as they say ready."""
        if self.stopping:
            self.log.warning("reload ignored: the master is stopping")
            return
        try:
            cfg = self.reread_config()
        except ConfigError as exc:
            self.log.error("reload refused, the running generation keeps serving: %s", exc)
            self.reload = {"generation": None, "state": "failed", "error": str(exc),
                           "started": time.time(), "finished": time.time()}
            return
        self.cfg = cfg
        wanted = cfg.workers if slots is None else slots
        if wanted != self.slots and not self.router.resizable:
            self.log.warning("reload: router %s cannot change the worker count while running "
                             "(restart to apply); keeping %d", self.router.name, self.slots)
        elif wanted != self.slots:
            self.slots = wanted
        self.generation = policy.next_generation(self.generation, self.workers.values())
        self.spawn_queue = list(range(self.slots))
        self.next_spawn = 0.0
        self.reload = {"generation": self.generation, "state": "in progress", "error": None,
                       "slots": self.slots, "started": time.time(), "finished": None,
                       "t0": time.monotonic()}
        self.log.info("reload: starting generation %d with %d workers", self.generation, self.slots)

    def reread_config(self) -> Config:
        fresh = config.resolve(self.cfg.cli)
        for key in FIXED_ON_RELOAD:
            if fresh.values[key] != self.cfg.values[key]:
                self.log.warning("reload: %s cannot change on reload (restart to apply); keeping %r",
                                 key, self.cfg.values[key])
                fresh.values[key] = self.cfg.values[key]
        return fresh

    def spawn_reload(self, now: float) -> None:
        # One worker per spawn_interval: a reload of many workers is not a boot storm.
        while self.spawn_queue and now >= self.next_spawn:
            self.spawn(self.spawn_queue.pop(0))
            self.next_spawn = now + self.cfg.spawn_interval
            if self.cfg.spawn_interval > 0:
                break

    def check_reload(self) -> None:
        r = self.reload
        if r is None or r["state"] != "in progress" or self.spawn_queue:
            return
        ready = {w.slot for w in self.workers.values()
                 if w.generation == r["generation"] and w.state == "active"}
        if ready >= set(range(self.slots)):
            r["state"] = "done"
            r["finished"] = time.time()
            r["seconds"] = round(time.monotonic() - r["t0"], 3)
            self.log.info("reload: generation %d took every slot in %.2fs", r["generation"], r["seconds"])

    def fail_reload(self, record: WorkerRecord, why: str) -> None:
        r = self.reload
        r.update(state="failed", error=why, finished=time.time())
        self.spawn_queue = []
        self.log.error("reload to generation %d failed, the previous generation keeps serving: %s",
                       r["generation"], why)
        for other in self.workers.values():
            if other.generation == r["generation"] and other.state == "booting":
                other.signal(signal.SIGKILL)
                other.state = "killed"

    def retire_superseded(self) -> None:
        for record in policy.superseded(self.workers.values(), self.slots):
            self.retire(record)

    def retire(self, record: WorkerRecord) -> None:
        """Stop giving it work: it closes its listener and drains at a lower priority."""
        record.state = "retiring"
        record.retired_at = time.monotonic()
        # It keeps its own copy until it has drained its accept queue.
        close_all(record.listeners)
        record.listeners = []
        # On Linux a nice value belongs to a thread: renice every one of them
        # (gevent's monitor thread and the resolver threads too).
        try:
            for tid in os.listdir(f"/proc/{record.pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), self.cfg.retired_nice)
        except OSError as exc:
            self.log.warning("could not renice worker pid %d: %s", record.pid, exc)
        record.measure()
        if record.conn is not None:
            record.conn.send({"type": "retire"})
        self.log.info("worker pid %d (slot %d, generation %d) retiring with %d connection(s)",
                      record.pid, record.slot, record.generation, record.connections)

    def close_retiring(self, why: str) -> None:
        for record in self.workers.values():
            if record.state == "retiring":
                self.log.info("closing retired worker pid %d: %s", record.pid, why)
                self.ask_to_close(record)

    def ask_to_close(self, record: WorkerRecord) -> None:
        """End its connections now (WebSockets get 1001); SIGQUIT if unreachable."""
        if record.conn is None or not record.conn.send({"type": "close"}):
            record.signal(signal.SIGQUIT)

    def close_overdue(self, now: float) -> None:
        for record in policy.overdue_retirees(self.workers.values(), now, self.cfg.retired_timeout):
            self.ask_to_close(record)
            record.retired_at = now  # ask again after another retired_timeout if it lingers

    def end_adoption(self) -> None:
        adopted = [w for w in self.workers.values() if w.adopted]
        self.log.info("adopted %d worker(s) of the previous master", len(adopted))
        if self.router.needs_handover and not self.take_back_sockets(adopted):
            return
        if adopted:
            self.begin_reload()  # a fresh generation replaces them, as on HUP

    def take_back_sockets(self, adopted: list[WorkerRecord]) -> bool:
        """reuseport: the group's sockets live on in the adopted workers; get
        one copy of each slot's back, or open a new group if none survived."""
        by_slot: dict[int, list[int]] = {}
        for record in adopted:
            if record.handed_fds and record.slot not in by_slot:
                by_slot[record.slot] = record.handed_fds
        try:
            if not adopted:
                self.router.prepare(self.slots, self.cfg.backlog)
            elif sorted(by_slot) == list(range(len(by_slot))) and by_slot:
                self.router.adopt([by_slot[slot] for slot in range(len(by_slot))])
                self.slots = len(by_slot)
            else:
                raise RouterUnavailable(f"adopted workers handed back the sockets of slots "
                                        f"{sorted(by_slot)} only; every slot's is needed")
        except RouterUnavailable as exc:
            self.log.error("cannot take over the reuseport group: %s; the adopted workers keep "
                           "serving, no new generation is started (restart them all to recover)", exc)
            return False
        finally:
            for record in adopted:
                for fd in record.handed_fds:
                    if not self.router.owns_fd(fd):
                        os.close(fd)
                record.handed_fds = []
        return True

    # ================================================================ workers
    def spawn(self, slot: int) -> WorkerRecord:
        spec = dict(self.cfg.to_json(), slot=slot, generation=self.generation,
                    control=self.socket_path, families=sorted({b.family for b in self.cfg.bind}))
        listeners = self.listeners_for(slot)
        shared = self.router.listener_fds(slot)   # reuseport: the slot's sockets in the group
        pass_fds = shared or [sock.fileno() for sock in listeners]
        spec["listen_fds"] = pass_fds
        spec["shared_listeners"] = bool(shared)
        popen = subprocess.Popen([sys.executable, "-m", "ipserve.worker", json.dumps(spec)],
                                 stdin=subprocess.DEVNULL, start_new_session=True,
                                 pass_fds=pass_fds, **self.worker_identity())
        self.spawn_serial += 1
        record = WorkerRecord(pid=popen.pid, slot=slot, generation=self.generation,
                              pidfd=os.pidfd_open(popen.pid), popen=popen, serial=self.spawn_serial,
                              listeners=listeners)
        if self.cfg.max_requests:
            record.max_requests = self.cfg.max_requests + random.randint(0, self.cfg.max_requests_jitter)
        self.track(record)
        self.log.info("spawned worker pid %d for slot %d (generation %d)", record.pid, slot, record.generation)
        return record

    def listeners_for(self, slot: int) -> list[socket.socket]:
        """NAT backends: the sockets a new worker of `slot` accepts on. A slot
        whose worker crashed gets that worker's sockets back, so what queued
        there while it was down is served; anything else gets new ones."""
        if self.router.listener_fds(slot):
            return []   # reuseport: the slot's socket belongs to the router's group
        spare = self.spare_listeners.pop(slot, None)
        if spare is not None:
            return spare
        return open_listeners(sorted({b.family for b in self.cfg.bind}), self.cfg.backlog)

    def give_up_listeners(self, record: WorkerRecord) -> None:
        """A worker that should still be serving is dead or stuck and leaves its
        slot empty: its sockets go to the slot's next worker. Otherwise they are
        closed (kept, nobody would ever accept what queues there)."""
        slot_left_empty = record.slot in policy.slots_to_spawn(
            (w for w in self.workers.values() if w is not record), self.slots)
        if record.listeners and not self.stopping and record.state in ("active", "hung") \
                and slot_left_empty and record.slot not in self.spare_listeners:
            self.spare_listeners[record.slot] = record.listeners
        else:
            close_all(record.listeners)
        record.listeners = []

    def worker_identity(self) -> dict:
        """Popen arguments that drop a worker to `user`/`group` (as root)."""
        if self.cfg.user is None:
            return {}
        return {"user": self.cfg.user, "group": self.cfg.group or users.primary_group(self.cfg.user),
                "extra_groups": []}

    def track(self, record: WorkerRecord) -> None:
        self.workers[record.pid] = record
        self.selector.register(record.pidfd, selectors.EVENT_READ, ("pidfd", record))
        record.measure()

    def worker_exited(self, record: WorkerRecord) -> None:
        self.selector.unregister(record.pidfd)
        record.close()
        self.workers.pop(record.pid, None)
        code = record.popen.wait() if record.popen is not None else None
        if record.conn is not None:
            self.drop(record.conn)
        lived = time.monotonic() - record.spawned_at
        self.log_exit(record, code, lived)
        self.give_up_listeners(record)
        if self.stopping or record.state == "retiring":
            return
        if record.replaces is not None and record.ready_at is None:
            predecessor = self.workers.get(record.replaces)
            if predecessor is not None:
                predecessor.replacing = None   # try again later
            return
        r = self.reload
        if (r is not None and r["state"] == "in progress" and record.generation == r["generation"]
                and record.ready_at is None):
            self.fail_reload(record, record.boot_error or
                             f"worker pid {record.pid} (slot {record.slot}) exited before it was ready")
            if record.slot not in policy.slots_to_spawn(self.workers.values(), self.slots):
                return   # the slot still has its worker: this is not a crash of the slot
        if record.ready_at is None or lived < DIED_YOUNG:
            self.quick_failures[record.slot] += 1
        else:
            self.quick_failures[record.slot] = 0
        delay = policy.respawn_delay(self.quick_failures[record.slot])
        self.respawn_at[record.slot] = time.monotonic() + delay
        if delay:
            self.log.warning("slot %d: respawning in %.0fs (workers keep dying young)", record.slot, delay)

    def log_exit(self, record: WorkerRecord, code: int | None, lived: float) -> None:
        how = "exited" if code is None else (
            f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        level = logging.INFO if self.stopping or record.state == "retiring" or code == 0 else logging.ERROR
        self.log.log(level, "worker pid %d (slot %d, generation %d) %s after %.1fs",
                     record.pid, record.slot, record.generation, how, lived)

    def kill_slow_boots(self, now: float) -> None:
        for record in list(self.workers.values()):
            if record.state == "booting" and now - record.spawned_at > self.cfg.boot_timeout:
                self.log.error("worker pid %d (slot %d) not ready after %.0fs: killing it",
                               record.pid, record.slot, self.cfg.boot_timeout)
                record.boot_error = f"worker pid {record.pid} (slot {record.slot}) not ready within boot_timeout"
                record.signal(signal.SIGKILL)
                record.state = "killed"

    def spawn_missing(self, now: float) -> None:
        for slot in policy.slots_to_spawn(self.workers.values(), self.slots):
            if slot in self.spawn_queue:
                continue
            if self.respawn_at.get(slot, 0.0) <= now:
                self.respawn_at.pop(slot, None)
                self.spawn(slot)

    def measure(self, now: float) -> None:
        if now - self.last_measure < 1.0:
            return
        self.last_measure = now
        for record in self.workers.values():
            record.measure()

    # ================================================================ health
    def check_health(self, now: float) -> None:
        for record in policy.hung(self.workers.values(), now, self.cfg.timeout):
            self.log.error("worker pid %d (slot %d) sent no heartbeat for %.0fs: SIGABRT (stacks "
                           "follow in its log), then SIGKILL", record.pid, record.slot, now - record.last_seen)
            record.signal(signal.SIGABRT)
            record.state = "hung"      # no longer routed; its slot is covered and respawned
            record.hung_at = now
            # Its replacement accepts on the same sockets, so what queued
            # there while it was stuck is served, not stranded.
            self.give_up_listeners(record)
        for record in self.workers.values():
            if record.state == "hung" and now - record.hung_at > HUNG_KILL_DELAY:
                record.signal(signal.SIGKILL)
                record.hung_at = now
        for record, reason, limited in policy.health_replacements(
                self.workers.values(), now, worker_memory=self.cfg.worker_memory,
                max_requests=bool(self.cfg.max_requests), busy_retire_after=self.cfg.busy_retire_after):
            self.replace(record, reason, limited, now)
        for action, record in policy.cluster_memory_actions(self.workers.values(), self.cfg.cluster_memory):
            if action == "replace":
                self.replace(record, "largest worker while cluster_memory is exceeded", True, now)
            elif action == "kill":
                self.log.warning("cluster_memory above 95%%: killing retiring worker pid %d", record.pid)
                record.signal(signal.SIGKILL)   # it stays "retiring": its exit is expected
            elif not record.asked_to_exit:
                self.log.warning("cluster_memory above 80%%: asking retiring worker pid %d to exit", record.pid)
                record.asked_to_exit = True
                self.ask_to_close(record)

    def replace(self, record: WorkerRecord, reason: str, rate_limited: bool, now: float) -> None:
        """Start a fresh worker for the slot; the old one retires once it is ready."""
        if rate_limited:
            if now - self.last_health_retire < self.cfg.health_retire_interval:
                return
            self.last_health_retire = now
        self.log.warning("replacing worker pid %d (slot %d): %s", record.pid, record.slot, reason)
        record.replacing = reason
        self.spawn(record.slot).replaces = record.pid

    # ================================================================ routes
    def update_routes(self) -> bool:
        """Make the kernel route what the workers' states say; True if it does."""
        desired = policy.desired_routes(self.workers.values(), self.slots)
        if not desired:
            return False
        if desired == self.installed:
            return True
        try:
            self.router.apply(desired)
        except RouteError as exc:
            # The kernel keeps the previous routes; try again next tick.
            if str(exc) != self.route_error:
                self.log.error("routing update failed, previous routes kept: %s", exc)
            self.route_error = str(exc)
            return False
        self.route_error = None
        self.log.debug("routes: %s", desired)
        if not self.installed:
            self.log.info("routing %d slots via %s", self.slots, self.router.name)
        self.installed = desired
        return True

    # ================================================================ control socket
    def accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = Connection(sock)
        self.selector.register(sock, selectors.EVENT_READ, ("conn", conn))

    def drop(self, conn: Connection) -> None:
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        for fd in conn.fds:
            os.close(fd)
        conn.fds = []
        if conn.worker is not None and conn.worker.conn is conn:
            conn.worker.conn = None

    def read(self, conn: Connection) -> None:
        try:
            # A worker of a previous master hands its reuseport sockets back
            # with its ready message (SCM_RIGHTS).
            data, fds, _, _ = socket.recv_fds(conn.sock, 65536, 16)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if fds:
            conn.fds.extend(fds)
        if not data:
            self.drop(conn)
            return
        try:
            messages = conn.reader.feed(data)
        except ValueError as exc:
            self.log.warning("dropping a control connection: %s", exc)
            self.drop(conn)
            return
        for message in messages:
            if "cmd" in message:
                conn.sock.setblocking(True)
                conn.sock.settimeout(2.0)
                conn.send(self.command(message))
                self.drop(conn)
                return
            self.worker_message(conn, message)

    def worker_message(self, conn: Connection, message: dict) -> None:
        kind = message.get("type")
        if kind == "ready":
            self.worker_ready(conn, message)
            return
        if kind == "boot-failed":
            record = self.workers.get(control.peer_pid(conn.sock))
            if record is not None:
                record.boot_error = str(message.get("error"))[:2000]
            return
        record = conn.worker
        if record is None:
            return
        record.last_seen = time.monotonic()
        if kind == "heartbeat":
            record.connections = int(message.get("connections", 0))
            record.requests = int(message.get("requests", 0))
            record.lag_ms = float(message.get("lag_ms", 0.0))
            record.too_busy = bool(message.get("too_busy"))
            if not record.too_busy:
                record.busy_since = None
            elif record.busy_since is None:
                record.busy_since = record.last_seen

    def worker_ready(self, conn: Connection, message: dict) -> None:
        pid = control.peer_pid(conn.sock)
        if message.get("pid") != pid or message.get("name") != self.cfg.name:
            self.log.warning("control peer pid %d claimed to be %r: ignored", pid, message)
            self.drop(conn)
            return
        record = self.workers.get(pid)
        if record is None:
            record = self.adopt(pid, message)
            if record is None:
                self.drop(conn)
                return
        conn.worker = record
        record.conn = conn
        if conn.fds:
            if record.adopted and self.adopting_until and self.router.needs_handover:
                record.handed_fds, conn.fds = conn.fds, []
            elif record.adopted and self.adopting_until:
                record.listeners = [socket.socket(fileno=fd) for fd in conn.fds]
                conn.fds = []
            else:
                for fd in conn.fds:
                    os.close(fd)
                conn.fds = []
        record.port = int(message["port"])
        record.last_seen = time.monotonic()
        if record.state == "booting":
            record.state = "active"
            record.ready_at = time.monotonic()
            self.log.info("worker pid %d ready: slot %d on port %d", pid, record.slot, record.port)
        if record.state == "retiring":
            conn.send({"type": "retire"})  # a reconnecting worker learns it again
        if self.adopting_until:
            return  # routes and retirements wait until every orphan had its chance
        if self.update_routes():
            self.retire_superseded()

    def adopt(self, pid: int, message: dict) -> WorkerRecord | None:
        """Take over a worker another master started (it reconnected after that
        master went away). Its identity was checked by the kernel (SO_PEERCRED)."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        state = message.get("state")
        record = WorkerRecord(pid=pid, slot=int(message["slot"]), generation=int(message["generation"]),
                              pidfd=pidfd, state="retiring" if state == "retiring" else "active",
                              port=int(message["port"]), adopted=True, ready_at=time.monotonic())
        if record.state == "retiring":
            record.retired_at = time.monotonic()
        self.track(record)
        self.log.info("adopted worker pid %d (slot %d, generation %d, %s, %s connection(s))",
                      pid, record.slot, record.generation, record.state, message.get("connections"))
        return record

    def command(self, message: dict) -> dict:
        cmd = message.get("cmd")
        if cmd == "status":
            return self.status()
        if cmd == "stop":
            self.pending_signals.append(signal.SIGTERM)
            return {"ok": True, "message": "graceful stop started"}
        if cmd == "reload":
            self.pending_signals.append(signal.SIGHUP)
            return {"ok": True, "message": "reload started (see status)"}
        if cmd == "kill-retired":
            self.pending_signals.append(signal.SIGUSR1)
            return {"ok": True, "message": "retiring workers are closing their connections"}
        if cmd == "handover":
            # A new master takes over: leave workers, rules and socket file alone.
            self.handed_over = True
            self.log.info("handing over to a new master (pid %s); workers keep serving", message.get("pid"))
            return {"ok": True, "pid": os.getpid()}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def status(self) -> dict:
        workers = sorted(self.workers.values(), key=lambda w: (w.generation, w.slot))
        return {
            "name": self.cfg.name, "router": self.router.name,
            "routing": self.router.describe(),
            "bind": [str(b) for b in self.cfg.bind], "app": self.cfg.app,
            "master": {"pid": os.getpid(), "generation": self.generation,
                       "uptime_s": round(time.time() - self.started, 1),
                       "stopping": self.stopping},
            "reload": None if self.reload is None else
            {k: v for k, v in self.reload.items() if k != "t0"},
            "slots": self.slots,
            "routes": {str(slot): port for slot, port in sorted(self.installed.items())},
            "route_error": self.route_error,
            "workers": [w.as_status() for w in workers],
        }

    # ================================================================ stopping
    def begin_stop(self, how: str) -> None:
        if self.stopping == "quick" or self.stopping == how:
            return
        self.stopping = how
        self.remove_routes()
        if how == "graceful":
            self.stop_deadline = time.monotonic() + self.cfg.graceful_timeout + 2.0
            self.log.info("graceful stop: workers finish what they hold (up to %.0fs)",
                          self.cfg.graceful_timeout)
            for record in self.workers.values():
                record.signal(signal.SIGTERM)
        else:
            self.stop_deadline = time.monotonic() + 2.0
            self.log.info("quick stop")
            for record in self.workers.values():
                record.signal(signal.SIGQUIT)

    def remove_routes(self) -> None:
        try:
            self.router.remove()
            self.installed = {}
        except RouteError as exc:
            self.log.error("could not remove the routing rules: %s (run ipservectl cleanup)", exc)

    def stop_step(self) -> bool:
        """One step of stopping; True once every worker is gone."""
        if not self.workers:
            return True
        if time.monotonic() > self.stop_deadline:
            if self.killed_at_deadline:
                self.log.error("workers %s survive SIGKILL; giving up on them", sorted(self.workers))
                return True
            for record in self.workers.values():
                self.log.warning("worker pid %d still running at the deadline: SIGKILL", record.pid)
                record.signal(signal.SIGKILL)
            self.killed_at_deadline = True
            self.stop_deadline = time.monotonic() + 5.0
        return False

    def close(self) -> None:
        self.listener.close()
        if self.handed_over:
            return  # the socket path now belongs to the new master
        for record in self.workers.values():
            close_all(record.listeners)
        for spare in self.spare_listeners.values():
            close_all(spare)
        self.router.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
