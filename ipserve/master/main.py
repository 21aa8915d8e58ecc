"""Bring a master up: routing backend, runtime files, logs; then run its loop."""

from __future__ import annotations

import os
import sys
import time

from ipserve import cli, control, logs, routing, users
from ipserve.config import Config
from ipserve.master.supervisor import Master
from ipserve.master.takeover import take_over

# Orphaned workers retry the control socket every 0.5 s; give them three tries
# to be adopted before a new generation is started beside them.
ADOPTION_WINDOW = 1.5


def prepare_runtime_dir(cfg: Config) -> None:
    path = cfg.runtime_dir
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        cli.fail(f"runtime_dir {path!r} cannot be created: {exc.strerror}")
    if not os.access(path, os.W_OK):
        cli.fail(f"runtime_dir {path!r} is not writable by uid {os.geteuid()}")
    if cfg.user is not None:
        # Workers dropped to `user` must reach the control socket in it.
        uid, gid = users.ids(cfg.user, cfg.group)
        st = os.stat(path)
        if not (st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100)
                or (st.st_gid == gid and st.st_mode & 0o010)):
            cli.fail(f"runtime_dir {path!r} (mode {st.st_mode & 0o777:o}) cannot be entered by "
                     f"user {cfg.user!r}; make it searchable (chmod o+x) or choose another")


def serve(cfg: Config) -> int:
    socket_path = control.socket_path(cfg.runtime_dir, cfg.name)
    try:
        router, why = routing.choose(cfg.router, cfg.name, cfg.bind, slots=cfg.workers,
                                     adopting=os.path.exists(socket_path))
    except routing.RouterUnavailable as exc:
        cli.fail(str(exc))
    prepare_runtime_dir(cfg)
    log = logs.setup_error_log(cfg.error_log, cfg.log_level)
    if cfg.user is not None:
        # Workers append to the same log files after dropping to `user`.
        uid, gid = users.ids(cfg.user, cfg.group)
        for path in (cfg.error_log, cfg.access_log):
            if path not in (None, "-"):
                open(path, "a").close()
                os.chown(path, uid, gid)
    log.info("ipserve %s: %s", __import__("ipserve").__version__, why)
    if router.describe().get("note"):
        log.info("router %s: %s", router.name, router.describe()["note"])
    try:
        import setproctitle
        setproctitle.setproctitle(f"ipserve: master [{cfg.name}]")
    except ImportError:
        pass
    # A master of this name that runs, hangs or died leaves workers that may
    # still serve: the old rules stay until the first write replaces them, and
    # the workers reconnect to us to be adopted.
    previous = take_over(socket_path, cfg.pid, cfg.name, log)
    if previous is None or not router.needs_handover:
        try:
            router.prepare(cfg.workers, cfg.backlog)
        except routing.RouterUnavailable as exc:
            cli.fail(str(exc))
    with open(cfg.pid, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    master = Master(cfg, router, log)
    if previous is not None:
        master.adopting_until = time.monotonic() + ADOPTION_WINDOW
    try:
        return master.run()
    finally:
        master.close()
        try:
            with open(cfg.pid) as fh:
                if fh.read().strip() == str(os.getpid()):
                    os.unlink(cfg.pid)
        except OSError:
            pass
        log.info("master pid %d exits", os.getpid())
        sys.stderr.flush()
