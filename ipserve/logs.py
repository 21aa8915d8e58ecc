"""Error and access log set-up shared by master and workers.

Log files are opened without following symbolic links and only if they are
ours (ipserve.runtime.open_log): the master runs as root, and a user who can
write the log directory must not be able to point a log at /etc/shadow.
"""

from __future__ import annotations

import logging
import sys

from ipserve import runtime

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"

_error_log: tuple[str, str, tuple[int, int] | None] | None = None   # for reopen_error_log()


def _handler(target: str, owner: tuple[int, int] | None) -> logging.Handler:
    if target == "-":
        return logging.StreamHandler(sys.stderr)
    return logging.StreamHandler(runtime.open_log_stream(target, owner))


def _install(log: logging.Logger, handler: logging.Handler, fmt: logging.Formatter) -> None:
    for old in list(log.handlers):
        log.removeHandler(old)
        if old.stream not in (sys.stderr, sys.stdout):
            old.close()
            old.stream.close()
    handler.setFormatter(fmt)
    log.addHandler(handler)
    log.propagate = False


def setup_error_log(target: str, level: str, owner: tuple[int, int] | None = None) -> logging.Logger:
    """The `ipserve` logger writing to `target` ("-": standard error). `owner`:
    hand a new file to the workers' user (by descriptor, never by path).
    Raises UsageError for a log file that is not safely ours."""
    global _error_log
    log = logging.getLogger("ipserve")
    _install(log, _handler(target, owner), logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S %z"))
    log.setLevel(level.upper())
    _error_log = (target, level, owner)
    return log


def reopen_error_log() -> None:
    """USR2: reopen the error log (after logrotate moved it)."""
    if _error_log is not None:
        setup_error_log(*_error_log)


def setup_access_log(target: str | None, owner: tuple[int, int] | None = None) -> logging.Logger | None:
    if target is None:
        return None
    log = logging.getLogger("ipserve.access")
    handler = logging.StreamHandler(sys.stdout) if target == "-" else \
        logging.StreamHandler(runtime.open_log_stream(target, owner))
    _install(log, handler, logging.Formatter("%(message)s"))
    log.setLevel(logging.INFO)
    return log


def prepare_log_file(target: str | None, owner: tuple[int, int] | None) -> None:
    """Create `target` (if a file) and hand it to `owner`, so workers running
    as that user can append to it. Raises UsageError if it is not safely ours."""
    if target in (None, "-"):
        return
    stream = runtime.open_log_stream(target, owner)
    stream.close()
