"""Bring a master up: routing backend, runtime files, logs; then run its loop."""

from __future__ import annotations

import os
import sys

from ipserve import cli, control, logs, routing
from ipserve.config import Config
from ipserve.master.supervisor import Master


def prepare_runtime_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o755, exist_ok=True)
    except OSError as exc:
        cli.fail(f"runtime_dir {path!r} cannot be created: {exc.strerror}")
    if not os.access(path, os.W_OK):
        cli.fail(f"runtime_dir {path!r} is not writable by uid {os.geteuid()}")


def serve(cfg: Config) -> int:
    try:
        router, why = routing.choose(cfg.router, cfg.name, cfg.bind)
    except routing.RouterUnavailable as exc:
        cli.fail(str(exc))
    prepare_runtime_dir(cfg.runtime_dir)
    running = cli.already_running(cfg)
    if running:
        cli.fail(f"an instance named {cfg.name!r} is already running (master pid {running}); "
                 f"stop it or choose another --name")
    path = control.socket_path(cfg.runtime_dir, cfg.name)
    if os.path.exists(path):
        os.unlink(path)  # left by a master that died; nobody answers on it
    log = logs.setup_error_log(cfg.error_log, cfg.log_level)
    log.info("ipserve %s: %s", __import__("ipserve").__version__, why)
    try:
        import setproctitle
        setproctitle.setproctitle(f"ipserve: master [{cfg.name}]")
    except ImportError:
        pass
    # Rules left by a crashed run of the same name point at dead ports.
    try:
        router.remove()
    except routing.RouteError as exc:
        cli.fail(f"cannot clear old rules of {cfg.name!r}: {exc}")
    with open(cfg.pid, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    master = Master(cfg, router, log)
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
