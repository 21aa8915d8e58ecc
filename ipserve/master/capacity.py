"""Can this machine hold the workers asked for? Decided before anything starts.

`-w 1024` used to be accepted: 874 workers spawned in 33 s, the load average
reached 655 and signals went unanswered. The master now refuses, with the
numbers, a worker count that does not fit in memory, in its open-files limit
or in the process limits. The facts are read once (`Facts.read()`); the
decision (`problem()`) is pure.
"""

from __future__ import annotations

import dataclasses
import resource

THREADS_PER_WORKER = 3     # the hub, gevent's monitor thread, a resolver thread
FD_HEADROOM = 64           # the master's own files, logs, tools it runs
DEFAULT_WORKER_RSS = 32 << 20


@dataclasses.dataclass(frozen=True)
class Facts:
    mem_available: int | None        # bytes the kernel says can be had (MemAvailable, cgroup)
    fd_hard_limit: int | None        # the master's RLIMIT_NOFILE hard limit (None: unlimited)
    tasks_available: int | None      # processes/threads that may still be created

    @classmethod
    def read(cls) -> "Facts":
        return cls(mem_available=_mem_available(), fd_hard_limit=_fd_hard_limit(),
                   tasks_available=_tasks_available())


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def fds_needed(workers: int, families: int) -> int:
    """During a reload two generations live: per worker the master holds a
    pidfd, a control connection and a copy of its listeners (one per family)."""
    return 2 * workers * (2 + families) + FD_HEADROOM


def problem(workers: int, families: int, worker_rss: int | None, facts: Facts) -> str | None:
    """One line saying why `workers` workers cannot run here, or None."""
    rss = worker_rss or DEFAULT_WORKER_RSS
    if facts.mem_available is not None and workers * rss > facts.mem_available:
        return (f"-w {workers} needs about {workers} x {gib(rss)} = {gib(workers * rss)} of memory "
                f"(each worker's RSS after importing APP), but {gib(facts.mem_available)} is "
                f"available: use at most -w {fit(facts.mem_available // rss)}")
    need = fds_needed(workers, families)
    if facts.fd_hard_limit is not None and need > facts.fd_hard_limit:
        return (f"-w {workers} needs about {need} open files in the master during a reload, but its "
                f"hard limit is {facts.fd_hard_limit}: raise it (ulimit -Hn, systemd LimitNOFILE=) "
                f"or use at most -w {fit((facts.fd_hard_limit - FD_HEADROOM) // (2 * (2 + families)))}")
    tasks = 2 * workers * THREADS_PER_WORKER
    if facts.tasks_available is not None and tasks > facts.tasks_available:
        return (f"-w {workers} needs about {tasks} processes and threads during a reload, but only "
                f"{facts.tasks_available} more may be created here (pid_max, cgroup pids.max, "
                f"ulimit -u): use at most -w {fit(facts.tasks_available // (2 * THREADS_PER_WORKER))}")
    return None


def fit(n: int) -> int:
    """The largest power of two not above n (at least 1)."""
    return 1 << max(0, int(n).bit_length() - 1) if n >= 1 else 1


# ---------------------------------------------------------------- reading the machine

def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _mem_available() -> int | None:
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    # A cgroup limit (v2 memory.max, v1 memory.limit_in_bytes) may be tighter.
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 1 << 60:
            room = max(0, limit - usage)
            available = room if available is None else min(available, room)
    return available


def _fd_hard_limit() -> int | None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return None if hard == resource.RLIM_INFINITY else hard


def _tasks_available() -> int | None:
    limits = []
    pid_max = _read_int("/proc/sys/kernel/pid_max")
    threads_max = _read_int("/proc/sys/kernel/threads-max")
    running = _count_tasks()
    for limit in (pid_max, threads_max):
        if limit is not None and running is not None:
            limits.append(limit - running)
    for limit_path, current_path in (("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids.current"),
                                     ("/sys/fs/cgroup/pids/pids.max", "/sys/fs/cgroup/pids/pids.current")):
        limit, current = _read_int(limit_path), _read_int(current_path)
        if limit is not None and current is not None:
            limits.append(limit - current)
    return max(0, min(limits)) if limits else None


def _count_tasks() -> int | None:
    try:
        with open("/proc/loadavg") as fh:
            return int(fh.read().split()[3].split("/")[1])   # running/total scheduling entities
    except (OSError, ValueError, IndexError):
        return None
