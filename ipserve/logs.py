"""Error and access log set-up shared by master and workers.

Log files are opened without following symbolic links and only if they are
ours (ipserve.runtime.open_log): the master runs as root, and a user who can
write the log directory must not be able to point a log at /etc/shadow.

log_format = "json" makes both logs one JSON object per line (schemas in
README, "Logs"): a traceback or a multi-line report stays inside one object.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import sys

from ipserve import accesslog, runtime

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S %z"      # the instant and zone the access log's %(t)s shows

_error_log: tuple | None = None   # setup_error_log's arguments, for reopen_error_log()


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, pid, logger, message, and
    exc_info / stack when the record has them. ASCII only, so no character
    of a message (not even U+2028) can end the line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": accesslog.iso_time(record.created),
            "level": record.levelname.lower(),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry)


def error_formatter(log_format: LogFormat) -> logging.Formatter:
    if log_format is LogFormat.JSON:
        return JsonFormatter()
    return logging.Formatter(FORMAT, DATE_FORMAT)


def _handler(target: str, owner: tuple[int, int] | None, default_stream) -> logging.Handler:
    if target == "-":
        return logging.StreamHandler(default_stream)
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


def setup_error_log(target: str, level: str, owner: tuple[int, int] | None = None,
                    log_format: str = "text") -> logging.Logger:
    """The `ipserve` logger writing to `target` ("-": standard error), as
    text or JSON lines. `owner`: hand a new file to the workers' user (by
    descriptor, never by path). Raises UsageError for a log file that is
    not safely ours."""
    global _error_log
    log = logging.getLogger("ipserve")
    _install(log, _handler(target, owner, sys.stderr), error_formatter(LogFormat(log_format)))
    log.setLevel(level.upper())
    _error_log = (target, level, owner, log_format)
    return log


def reopen_error_log() -> None:
    """USR2: reopen the error log (after logrotate moved it)."""
    if _error_log is not None:
        setup_error_log(*_error_log)


class AccessLog:
    """Writes one line per request: access_log_format's line, or (json) an
    object with the request's fields and that line as "message"."""

    __slots__ = ("format", "json", "logger", "pid")

    def __init__(self, logger: logging.Logger, fmt: str, log_format: LogFormat):
        self.logger = logger
        self.format = fmt
        self.json = log_format is LogFormat.JSON
        self.pid = os.getpid()

    def write(self, atoms: accesslog.Atoms) -> None:
        line = accesslog.format_line(self.format, atoms)
        if self.json:
            line = json.dumps(accesslog.json_record(atoms, line))
        self.logger.info(line)       # no arguments: logging leaves '%' in `line` alone


def setup_access_log(target: str | None, owner: tuple[int, int] | None = None,
                     fmt: str = accesslog.DEFAULT_FORMAT, log_format: str = "text") -> AccessLog | None:
    """The access log ("-": standard output), or None without one."""
    if target is None:
        return None
    log = logging.getLogger("ipserve.access")
    _install(log, _handler(target, owner, sys.stdout), logging.Formatter("%(message)s"))
    log.setLevel(logging.INFO)
    return AccessLog(log, fmt, LogFormat(log_format))


def prepare_log_file(target: str | None, owner: tuple[int, int] | None) -> None:
    """Create `target` (if a file) and hand it to `owner`, so workers running
    as that user can append to it. Raises UsageError if it is not safely ours."""
    if target in (None, "-"):
        return
    stream = runtime.open_log_stream(target, owner)
    stream.close()
