"""One master per name: the lock, and taking over from a running master.

`<name>.lock` in the runtime directory is held (flock) for a master's whole
life. A starting master that gets it is alone. One that does not asks the
holder to hand over (the control socket's `handover`): the holder, if it is
serving, passes its reserved public sockets and exits without touching its
workers or rules; the new master then gets the lock and adopts the workers.
A holder that is starting, reloading or stopping refuses: then the new master
exits with status 2 and one line, so two masters started at the same moment
never both run. A holder that does not answer within HANDOVER_TIMEOUT is
killed (SIGKILL, never TERM, which would stop its workers) once its process
title shows it really is an ipserve master of this name.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import socket
import time
from collections.abc import Callable

import psutil

from ipserve import control
from ipserve.errors import UsageError
from ipserve.runtime import InstanceLock

HANDOVER_TIMEOUT = 5.0
LOCK_WAIT = 10.0


@dataclasses.dataclass
class Previous:
    pid: int | None                      # the master taken over, if one was running
    reserved: list[socket.socket]        # its reserved public sockets, if it handed them over


def is_master(pid: int, name: str) -> bool:
    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return False
    return title.startswith(f"ipserve: master [{name}]")


def wait_gone(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def ask_handover(socket_path: str, deadline: float) -> tuple[dict, list[int]] | None:
    """The holder's answer, retrying while its socket is not up yet; None if
    it never answers before `deadline`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return control.request(socket_path, {"cmd": "handover", "pid": os.getpid()},
                                   timeout=left, max_fds=control.MAX_FDS)
        except (control.ControlUnavailable, TimeoutError):
            time.sleep(0.1)


def acquire(lock: InstanceLock, takeover_lock: InstanceLock, socket_path: str, name: str,
            log, claim_main_pid: Callable[[], None] = lambda: None) -> Previous:
    """Hold the instance lock, taking over from its holder if need be.
    Raises UsageError when another master keeps the name. `claim_main_pid`
    runs just before a silent holder is killed (see sdnotify: systemd must
    follow us before it sees its main process die)."""
    if lock.try_acquire():
        return Previous(None, [])
    if not takeover_lock.try_acquire():
        raise UsageError(f"another ipserve master of {name} is starting and taking over "
                         f"(pid {takeover_lock.holder()}); try again once it runs")
    try:
        holder = lock.holder()
        answer = ask_handover(socket_path, time.monotonic() + HANDOVER_TIMEOUT)
        if answer is not None:
            reply, fds = answer
            reserved = [socket.socket(fileno=fd) for fd in fds]
            if not reply.get("ok"):
                for sock in reserved:
                    sock.close()
                raise UsageError(f"{name} is running and did not hand over: "
                                 f"{reply.get('error', 'no reason given')}")
            log.info("master pid %s agreed to hand over", reply.get("pid", holder))
            if not lock.acquire(LOCK_WAIT):
                raise UsageError(f"master pid {holder} of {name} agreed to hand over but still "
                                 f"holds its lock after {LOCK_WAIT:.0f}s")
            return Previous(reply.get("pid", holder), reserved)
        # Holding the lock and silent: hung, or killed halfway. Make sure it is
        # an ipserve master of this name before killing it.
        if holder is None or not is_master(holder, name):
            raise UsageError(f"{name} is locked by pid {holder}, which is not an ipserve master "
                             f"answering on {socket_path}; if it is stuck, stop it first")
        log.warning("master pid %d did not answer within %.0fs: killing it (its workers keep "
                    "serving)", holder, HANDOVER_TIMEOUT)
        claim_main_pid()
        try:
            fd = os.pidfd_open(holder)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
        except ProcessLookupError:
            pass
        wait_gone(holder, 5.0)
        if not lock.acquire(LOCK_WAIT):
            raise UsageError(f"{name}: the lock is still held after killing pid {holder}")
        return Previous(holder, [])
    finally:
        takeover_lock.release()
