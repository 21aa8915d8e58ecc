"""Shared pieces of the benchmarks: the testbed, wrk runs, servers, results.

Everything runs inside network namespaces made by tests/e2e/netns.py (a
server namespace and N client namespaces joined by veth pairs); nothing is
sent outside them, and every namespace is removed at the end, also on error
or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.e2e import netns  # noqa: E402

RESULTS_DIR = os.path.join(REPO, "bench", "results")
VENV_BIN = os.path.dirname(sys.executable)


def die(message: str) -> None:
    print(f"bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def preflight(need_gunicorn: bool = True) -> tuple[str, str | None]:
    """Root, wrk and gunicorn are needed; returns (wrk, gunicorn) paths."""
    if os.geteuid() != 0:
        die("run as root (the benchmark creates network namespaces)")
    wrk = shutil.which("wrk")
    if not wrk:
        die("wrk not found (apt-get install wrk, or ./run bench which installs it)")
    gunicorn = None
    if need_gunicorn:
        gunicorn = os.path.join(VENV_BIN, "gunicorn")
        if not os.access(gunicorn, os.X_OK):
            gunicorn = shutil.which("gunicorn")
        if not gunicorn:
            die(f"gunicorn not found next to {sys.executable} "
                "(.venv/bin/pip install gunicorn, or ./run bench)")
    netns.sweep_stale()
    return wrk, gunicorn


# --------------------------------------------------------------------------- #
# Testbed: each client namespace sends from a different source address
# --------------------------------------------------------------------------- #

def make_testbed(n_clients: int = 4) -> netns.Testbed:
    """A testbed whose client namespace k sends, by default, from its address
    198.18.k.(16+k): the low bits differ (k = 0, 1, 2, 3), so with 2 workers
    two client namespaces land on each slot. (Without this every namespace's
    default source is .16, low bits 0, and ipserve would send all of them to
    slot 0.) wrk cannot pick a source address itself; the route's `src` does."""
    tb = netns.Testbed(n_clients=n_clients)
    try:
        for c in tb.clients:
            src = c.ips[c.index % len(c.ips)]
            prefix = c.server_ip.rsplit(".", 1)[0] + ".0/24"
            netns.sh([netns.IP, "-n", c.ns, "route", "replace", prefix, "dev", c.dev,
                      "proto", "kernel", "scope", "link", "src", src])
    except BaseException:
        tb.close()
        raise
    return tb


def source_address(c: netns.ClientNs) -> str:
    return c.ips[c.index % len(c.ips)]


# --------------------------------------------------------------------------- #
# wrk
# --------------------------------------------------------------------------- #

@dataclass
class WrkResult:
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0
    non2xx: int = 0
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non2xx


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> WrkResult:
    r = WrkResult(raw=out)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2) + m.group(3)) / 1000.0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r.rps = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.connect, r.read, r.write, r.timeout = map(int, m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r.non2xx = int(m.group(1))
    for pct, attr in (("50", "latency_p50_ms"), ("99", "latency_p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            setattr(r, attr, _ms(m.group(1)))
    return r


@dataclass
class LoadResult:
    """wrk from every client namespace at once, summed."""
    per_client: list[WrkResult] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return sum(r.rps for r in self.per_client)

    @property
    def requests(self) -> int:
        return sum(r.requests for r in self.per_client)

    def count(self, kind: str) -> int:
        return sum(getattr(r, kind) for r in self.per_client)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.per_client)

    def error_dict(self) -> dict:
        return {k: self.count(k) for k in ("connect", "read", "write", "timeout", "non2xx")}

    @property
    def p50_ms(self) -> float | None:
        vals = [r.latency_p50_ms for r in self.per_client if r.latency_p50_ms is not None]
        return statistics.median(vals) if vals else None

    @property
    def p99_ms(self) -> float | None:
        vals = [r.latency_p99_ms for r in self.per_client if r.latency_p99_ms is not None]
        return max(vals) if vals else None


class Load:
    """One wrk per client namespace, started together, each to the server
    address on its own link."""

    def __init__(self, tb: netns.Testbed, wrk: str, port: int, duration: float,
                 connections: int, threads: int = 1, path: str = "/", timeout: str = "2s"):
        self.procs = []
        for c in tb.clients:
            argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s",
                    f"--timeout={timeout}", "--latency",
                    f"http://{c.server_ip}:{port}{path}"]
            self.procs.append(tb.run_in(c.ns, argv, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True))
        self.deadline = time.monotonic() + duration + 30

    def wait(self) -> LoadResult:
        result = LoadResult()
        for p in self.procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, self.deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
            result.per_client.append(parse_wrk(out or ""))
        return result


def run_load(tb, wrk, port, duration, connections, **kw) -> LoadResult:
    return Load(tb, wrk, port, duration, connections, **kw).wait()


# --------------------------------------------------------------------------- #
# Servers
# --------------------------------------------------------------------------- #

def wait_http(tb: netns.Testbed, port: int, path: str = "/", timeout: float = 30) -> None:
    """Until every client namespace gets a 200 from its server address."""
    deadline = time.monotonic() + timeout
    for c in tb.clients:
        while True:
            try:
                status, _, _ = netns.http_get(c.ns, None, c.server_ip, port, path, timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise netns.HarnessError(f"no HTTP 200 on {c.server_ip}:{port}{path} "
                                         f"from {c.ns} in {timeout}s")
            time.sleep(0.1)


class Gunicorn:
    """gunicorn started in the server namespace (killed with it at the end)."""

    def __init__(self, tb: netns.Testbed, gunicorn: str, app: str, port: int, workers: int = 2,
                 worker_class: str = "gevent", extra: list[str] | None = None,
                 log_path: str | None = None):
        self.tb = tb
        self.port = port
        self.log_path = log_path or os.path.join(RESULTS_DIR, f"gunicorn-{port}.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._log = open(self.log_path, "wb")
        # gunicorn >= 24 opens a control socket in ~/.gunicorn by default,
        # shared by every instance; the benchmark wants none.
        no_ctl = ["--no-control-socket"] if _gunicorn_has(gunicorn, "--no-control-socket") else []
        self.argv = [gunicorn, "-k", worker_class, *no_ctl, "-w", str(workers), "-b", f"0.0.0.0:{port}",
                     "--chdir", REPO, *(extra or []), app]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = tb.run_in(tb.server_ns, self.argv, stdout=self._log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              cwd=REPO, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return children_of(self.pid)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)      # quick stop
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()

    def log_tail(self, n: int = 30) -> str:
        return netns._tail(self.log_path, n)


_HELP: dict[str, str] = {}


def _gunicorn_has(gunicorn: str, flag: str) -> bool:
    if gunicorn not in _HELP:
        _HELP[gunicorn] = subprocess.run([gunicorn, "--help"], capture_output=True, text=True).stdout
    return flag in _HELP[gunicorn]


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return sorted(int(x) for x in f.read().split())
    except OSError:
        return []


def cpu_seconds(pids) -> float:
    """utime + stime of the given processes (dead ones count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / tick


def system_cpu() -> list[int]:
    """The aggregate line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def system_busy(before: list[int], after: list[int]) -> dict:
    """Share of all CPUs busy (and stolen by the hypervisor) between two samples."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d) or 1
    idle = d[3] + d[4]
    return {"busy": round(1 - idle / total, 3), "steal": round(d[7] / total, 3)}


def ipserve_worker_pids(proc: netns.IpserveProcess) -> list[int]:
    st = proc.status()
    return sorted(w["pid"] for w in st["workers"] if w.get("state") == "active")


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #

def write_json(prefix: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
        f.write("\n")
    return path


def keep_log(path: str, prefix: str) -> str | None:
    """Copy a server log out of the testbed's directory (removed at the end)."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    dest = os.path.join(RESULTS_DIR, f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    try:
        shutil.copyfile(path, dest)
    except OSError:
        return None
    return dest


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append("  ".join(str(cell).ljust(w) if i == 0 else str(cell).rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def machine() -> dict:
    load = os.getloadavg()
    def git(*a):
        try:
            return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"git_commit": git("rev-parse", "--short", "HEAD"),
            "git_dirty": (git("status", "--porcelain", "--", "ipserve") or "").splitlines(),
            "host": socket.gethostname(), "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load],
            "python": sys.version.split()[0], "kernel": os.uname().release}
