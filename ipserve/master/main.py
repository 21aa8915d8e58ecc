"""Bring a master up, in an order where every refusal comes before any change:

1. check what can be checked alone: TLS files and ciphers, capacity, routing
   backend, runtime directory, log files (UsageError: exit 2, nothing touched);
2. bind the admin endpoint (admin_bind), unless the master we are about to
   take over holds it: then once it has let go (see open_admin);
3. take the name's lock, taking over from a running master if need be;
4. reserve the public addresses (or take the previous master's), write the
   pid file, read what the previous master recorded;
5. run the loop; at exit remove what is ours, unless handed over.
"""

from __future__ import annotations

import os
import resource
import sys

from ipserve import control, logs, routing, runtime, sdnotify, users
from ipserve.config import Config
from ipserve.errors import UsageError
from ipserve.http import tls
from ipserve.master import admin, adoption, capacity, state, takeover
from ipserve.master.loop import Master
from ipserve.master.sockets import for_router
from ipserve.master.spawner import Spawner
from ipserve.messages import BadMessage

MAX_SOCKET_PATH = 107     # sizeof(sun_path) - 1 on Linux


def raise_open_files_limit() -> None:
    """The master holds a pidfd, a control connection and listeners per worker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def prepare_runtime_dir(cfg: Config, worker_ids: tuple[int, int] | None) -> str:
    """The runtime directory, created if missing and refused if anyone but
    us could change it. Workers running as another user must be able to
    traverse it to reach the control socket."""
    real = runtime.secure_dir(cfg.runtime_dir, mode=0o711 if worker_ids else 0o700)
    if worker_ids is not None:
        uid, gid = worker_ids
        path = "/"
        for part in [""] + real.strip("/").split("/"):
            path = os.path.join(path, part)
            st = os.stat(path)
            if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)
                    or (st.st_gid == gid and st.st_mode & 0o010)):
                raise UsageError(f"user {cfg.user!r} cannot reach the control socket in runtime_dir "
                                 f"{real!r}: {path!r} (mode {st.st_mode & 0o777:o}) cannot be "
                                 f"entered by it; make it searchable (chmod o+x) or choose another "
                                 f"runtime_dir")
    return real


def set_title(title: str) -> None:
    try:
        import setproctitle
        setproctitle.setproctitle(title)
    except ImportError:
        pass


def read_recorded(path: str, log) -> state.Recorded | None:
    try:
        data = runtime.read_private_json(path)
        return None if data is None else state.parse(data)
    except (UsageError, BadMessage) as exc:
        log.error("ignoring the state file %s: %s (workers it named are not adopted)", path, exc)
        return None


def open_admin(cfg: Config, lock: runtime.InstanceLock) -> tuple[admin.Listener | None, bool]:
    """Bind admin_bind before anything is changed, so that an address in use
    by another program, or not of this host, is refused like a public one.

    Taking over: the running master of this name holds the address until it
    exits. Its successor does not need the socket handed over: a master
    closes its admin socket before it releases the instance lock (Master.close,
    and serve() below), and takeover.acquire() returns only once we hold that
    lock. So when the address is in use by the lock's holder itself, binding
    waits until acquire() has returned (the bool returned: bind after the
    takeover). Anyone else holding it is refused here."""
    if cfg.admin_bind is None:
        return None, False
    try:
        return admin.open_listener(cfg.admin_bind), False
    except admin.BindError as exc:
        holder = lock.holder()
        if exc.in_use and holder is not None and admin.held_by(holder, cfg.admin_bind):
            return None, True
        raise


def open_admin_after_takeover(cfg: Config, previous: takeover.Previous,
                              log) -> admin.Listener | None:
    try:
        return admin.open_listener(cfg.admin_bind)
    except admin.BindError as exc:
        if previous.pid is None:
            raise            # nothing was taken over: still a refusal, nothing changed
        # Another program took the address in the instant between the previous
        # master letting go and now. That master is gone: serve without it.
        log.error("%s; serving without the admin endpoint", exc)
        return None


def check_tls(cfg: Config) -> None:
    """Certificate, key, CA file and ciphers, checked as root exactly as a
    worker will load them: a mistake that would keep every worker from booting
    is one line and exit 2 now."""
    settings = tls.TlsSettings.from_settings(cfg.values)
    if settings is not None:
        try:
            tls.check(settings)
        except tls.TlsError as exc:
            raise UsageError(str(exc)) from None


def serve(cfg: Config, worker_rss: int | None) -> int:
    check_tls(cfg)
    raise_open_files_limit()
    why = capacity.problem(cfg.workers, len({b.family for b in cfg.bind}), worker_rss,
                           capacity.Facts.read())
    if why:
        raise UsageError(why)
    worker_ids = users.ids(cfg.user, cfg.group) if cfg.user is not None else None
    rt = prepare_runtime_dir(cfg, worker_ids)
    socket_path = control.socket_path(rt, cfg.name)
    if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
        raise UsageError(f"runtime_dir {rt!r} is too long for the control socket "
                         f"{socket_path!r} (a unix socket path has at most {MAX_SOCKET_PATH} "
                         f"bytes): choose a shorter runtime_dir")
    state_path = os.path.join(rt, cfg.name + ".state")
    log = logs.setup_error_log(cfg.error_log, cfg.log_level, owner=worker_ids,
                               log_format=cfg.log_format)
    logs.prepare_log_file(cfg.access_log, worker_ids)
    notifier = sdnotify.Notifier.from_environ(os.environ, log)   # workers must not inherit it
    try:
        # A previous master's workers may hold the reuseport group: then the
        # port is expectedly in use, and is taken back from them.
        router, why = routing.choose(cfg.router, cfg.name, cfg.bind, slots=cfg.workers,
                                     adopting=os.path.exists(state_path))
    except routing.RouterUnavailable as exc:
        raise UsageError(str(exc)) from None

    lock = runtime.InstanceLock(os.path.join(rt, cfg.name + ".lock"))
    admin_listener, admin_after_takeover = open_admin(cfg, lock)
    try:
        previous = takeover.acquire(lock, runtime.InstanceLock(os.path.join(rt, cfg.name + ".takeover")),
                                    socket_path, cfg.name, log,
                                    claim_main_pid=lambda: notifier.notify(
                                        sdnotify.Event.MAIN_PID, "taking over", pid=os.getpid()))
    except BaseException:
        if admin_listener is not None:
            admin_listener.close()
        raise
    try:
        if admin_after_takeover:
            admin_listener = open_admin_after_takeover(cfg, previous, log)
        if previous.pid is not None:   # believed if we are the main pid already (NotifyAccess=main)
            notifier.notify(sdnotify.Event.MAIN_PID, f"took over from master pid {previous.pid}",
                            pid=os.getpid())
        # The title is how a newcomer that finds us silent knows whom it kills.
        set_title(f"ipserve: master [{cfg.name}]")
        recorded = read_recorded(state_path, log)
        sockets = for_router(router, cfg.bind, cfg.backlog)
        master = Master(cfg, router, sockets, Spawner(cfg.user, cfg.group), log,
                        state_path=state_path, control_owner=worker_ids,
                        write_state=runtime.write_private_json, notifier=notifier)
        if admin_listener is not None:
            master.admin = admin.AdminServer(admin_listener, cfg.admin_token,
                                             admin.load_dashboard(), log)
        adopting = recorded is not None and adoption.adopt(master, recorded)
        try:
            if not (adopting and sockets.shared):   # else the group comes back from the workers
                sockets.prepare(cfg.workers, previous.reserved)
        except (UsageError, routing.RouterUnavailable) as exc:
            if not adopting:
                master.close()
                raise UsageError(str(exc)) from None
            log.error("%s; serving without reserving the public address", exc)
        # Every refusal is behind us: from here on, the log tells the story.
        log.info("ipserve %s: %s", __import__("ipserve").__version__, why)
        if router.describe().get("note"):
            log.info("router %s: %s", router.name, router.describe()["note"])
        if cfg.user is None and os.geteuid() == 0:
            log.warning("workers run as root (without capabilities): set user = \"...\" so that "
                        "application code cannot command the master")
        runtime.write_pid_file(cfg.pid, os.getpid())
        runtime.remove_quietly(socket_path)   # a dead master's; we hold the lock
        try:
            if master.admin is not None:
                master.admin.start()
            return master.run()
        finally:
            master.close()
            if not master.handed_over:
                runtime.remove_quietly(state_path)
                runtime.remove_quietly(socket_path)
            runtime.remove_pid_file(cfg.pid, os.getpid())
            log.info("master pid %d exits%s", os.getpid(),
                     " (handed over)" if master.handed_over else "")
            sys.stderr.flush()
    finally:
        if admin_listener is not None:
            admin_listener.close()     # before the lock: our successor binds it then
        lock.release()
