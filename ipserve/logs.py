"""Error and access log set-up shared by master and workers."""

from __future__ import annotations

import logging
import sys

FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"


def _stream(target: str):
    if target == "-":
        return logging.StreamHandler(sys.stderr)
    return logging.FileHandler(target)


def setup_error_log(target: str, level: str) -> logging.Logger:
    log = logging.getLogger("ipserve")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = _stream(target)
    handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S %z"))
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False
    return log


def setup_access_log(target: str | None) -> logging.Logger | None:
    if target is None:
        return None
    log = logging.getLogger("ipserve.access")
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stdout) if target == "-" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log
