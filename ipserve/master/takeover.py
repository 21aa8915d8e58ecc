"""Taking over from a running master of the same name, as ipcluster did.

The old master is asked over the control socket to hand over: it exits without
touching its workers or rules. One that does not answer within 5 s is killed
(SIGKILL, never TERM, which would stop its workers) through its pid file,
after checking that the pid really is an ipserve master.
"""

from __future__ import annotations

import os
import select
import signal
import socket

import psutil

from ipserve import control

HANDOVER_TIMEOUT = 5.0


def read_pid(path: str) -> int | None:
    try:
        with open(path) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def is_master(pid: int, name: str) -> bool:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return f"master [{name}]" in cmdline or "ipserve" in cmdline


def wait_gone(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def take_over(socket_path: str, pid_path: str, name: str, log) -> int | None:
    """Make sure no other master of this name runs. Returns the pid of the
    master taken over, or None if there was none. The socket path is free after."""
    if not os.path.exists(socket_path):
        return None
    old_pid = read_pid(pid_path)
    try:
        reply = control.request(socket_path, {"cmd": "handover", "pid": os.getpid()},
                                timeout=HANDOVER_TIMEOUT)
        old_pid = reply.get("pid", old_pid)
        log.info("master pid %s agreed to hand over", old_pid)
    except control.ControlUnavailable:
        old_pid = None  # a socket file nobody listens on: its master died
    except (socket.timeout, OSError):
        log.warning("master pid %s did not answer within %.0fs", old_pid, HANDOVER_TIMEOUT)
    if old_pid and not wait_gone(old_pid, HANDOVER_TIMEOUT):
        if is_master(old_pid, name):
            log.warning("killing unresponsive master pid %d (its workers keep serving)", old_pid)
            fd = os.pidfd_open(old_pid)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
            wait_gone(old_pid, 5.0)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    return old_pid or -1
