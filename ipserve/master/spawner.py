"""Starting worker processes and holding on to them by pidfd.

A worker is a fresh interpreter (`python -m ipserve.worker SPEC`), not a
fork: a reload loads new application and new server code. It runs in its own
session, as `user`/`group` when set, and receives exactly the listening
sockets the master opened for it. It drops every capability before it
imports anything of the application (ipserve.privileges).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from ipserve import children, users


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/pid/stat, in clock ticks since boot: with the pid, an
    identity no other process can have."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class ProcessHandle:
    """A worker process, signalled through a pidfd so a recycled pid is never hit."""

    def __init__(self, pid: int, pidfd: int, start: int, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.pidfd = pidfd
        self.start_time = start
        self.popen = popen          # set when we started it (and so must reap it)

    @classmethod
    def attach(cls, pid: int, expected_start: int) -> "ProcessHandle | None":
        """The process `pid` if it is still the one that started at
        `expected_start` (checked after the pidfd is open, so it cannot be
        recycled between the check and the use)."""
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        if start_time(pid) != expected_start:
            os.close(fd)
            return None
        return cls(pid, fd, expected_start)

    def fileno(self) -> int:
        return self.pidfd

    def signal(self, signum: int) -> bool:
        if self.pidfd < 0:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
            return True
        except ProcessLookupError:
            return False

    def reap(self) -> int | None:
        """Its exit status (negative: killed by that signal) once it has exited;
        None if it was not our child."""
        if self.popen is None:
            return None
        try:
            code = self.popen.wait(timeout=1.0)
        except (subprocess.TimeoutExpired, ChildProcessError):
            code = None
        children.forget(self.pid)
        return code

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class Spawner:
    """Starts worker processes and identifies them (a fake one drives the
    master in unit tests)."""

    def __init__(self, user: str | None, group: str | None):
        self.identity = {}
        if user is not None:
            self.identity = {"user": user, "group": group or users.primary_group(user),
                             "extra_groups": []}

    def spawn(self, spec: dict, fds: list[int]) -> ProcessHandle:
        spec = dict(spec, listen_fds=list(fds))
        # With TLS, the sealed copies of the key and certificate files too
        # (ipserve.http.tls): inherited like the sockets, never on the command line.
        passed = [*fds, *(spec.get("tls_fds") or {}).values()]
        popen = children.popen([sys.executable, "-m", "ipserve.worker", json.dumps(spec)],
                               pass_fds=passed, start_new_session=True, stdin=subprocess.DEVNULL,
                               close_fds=True, **self.identity)
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError:
            # It died already (and is a zombie we still can open) or the kernel
            # lacks pidfds; either way this worker cannot be tracked.
            popen.kill()
            popen.wait()
            children.forget(popen.pid)
            raise
        return ProcessHandle(popen.pid, pidfd, start_time(popen.pid) or 0, popen)

    # The kernel's word on who a process is; a fake spawner answers for its fakes.
    start_time = staticmethod(start_time)
    attach = staticmethod(ProcessHandle.attach)
