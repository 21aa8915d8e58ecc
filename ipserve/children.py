"""Child processes of the master: started, known and reaped in one place.

The master starts workers and, from its route-writing thread, firewall
tools. As PID 1 of a container it also inherits every orphan of the
container and must reap their zombies. Reaping "any child" would steal the
exit status a subprocess is waiting for (Python then reports a failed `nft`
as exit 0), so every child we start is registered here, under a lock held
from fork to registration, and the orphan reaper leaves those alone.
"""

from __future__ import annotations

import os
import subprocess
import threading

_lock = threading.Lock()
_ours: set[int] = set()


def popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen, registered as ours before anyone can reap it."""
    with _lock:
        proc = subprocess.Popen(argv, **kwargs)
        _ours.add(proc.pid)
    return proc


def forget(pid: int) -> None:
    with _lock:
        _ours.discard(pid)


def run(argv: list[str], input: str | None = None, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """subprocess.run for tools (nft, iptables-restore): registered, bounded in time."""
    proc = popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 text=True, close_fds=True)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        forget(proc.pid)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def reap_orphans() -> int:
    """Reap exited children we did not start (orphans re-parented to us as
    PID 1); returns how many. A child of ours is left to whoever waits for it."""
    reaped = 0
    with _lock:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped
            if info is None or info.si_pid in _ours:
                return reaped     # nothing exited, or the first in line is ours: next time
            try:
                os.waitpid(info.si_pid, 0)
                reaped += 1
            except ChildProcessError:
                return reaped
