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
import select
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


def stop_all(targets, tb: netns.Testbed) -> None:
    """Stop every server of a benchmark (reporting, not raising, what fails),
    then remove the testbed."""
    for t in targets:
        try:
            t.stop()
        except Exception as exc:            # noqa: BLE001
            print(f"bench: stopping {t.label}: {exc}", file=sys.stderr)
    tb.close()


def run_main(main, removed: str = "namespaces and servers") -> None:
    """Run a benchmark's main(); Ctrl-C exits 130 once its `finally` blocks
    have removed what it made."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"\nbench: interrupted; {removed} removed", file=sys.stderr)
        sys.exit(130)


def all_targets(tb: netns.Testbed) -> list[tuple]:
    """(client namespace, source address) in the order connections use them:
    namespace i % 4, address (i // 4) % 16."""
    return [(c, c.ips[i]) for i in range(len(tb.clients[0].ips)) for c in tb.clients]


class ChildPool:
    """P forked client processes, driven by the parent over a socketpair each
    (one JSON line per command and per reply). Process k gets targets[k::P].

    `start(mine)` runs in the child and returns its handlers: op name ->
    function(cmd) -> reply dict; an "exit" handler, if any, runs (without a
    reply) when the pool closes. One process cannot hold every socket (the
    open-files limit) nor use more than one core: hence the processes."""

    def __init__(self, targets: list, processes: int, start, exit_within: float = 20.0):
        self.exit_within = exit_within
        self.kids: list[tuple[int, socket.socket, object]] = []
        for k in range(processes):
            mine = targets[k::processes]
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:                          # the child: never returns
                code = 1
                try:
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    parent_end.close()
                    for _, other, _ in self.kids:
                        other.close()
                    _serve_commands(child_end, start(mine))
                    code = 0
                except (KeyboardInterrupt, SystemExit, BrokenPipeError):
                    pass                          # Ctrl-C reaches the whole group: the parent reports
                except BaseException:             # noqa: BLE001
                    import traceback
                    traceback.print_exc()
                finally:
                    os._exit(code)                # no atexit: the testbed is the parent's
            child_end.close()
            self.kids.append((pid, parent_end, parent_end.makefile("rwb")))

    def ask(self, cmds, tick=None, every: float = 5.0) -> list[dict]:
        """Send cmds[k] to process k (one dict: to all); wait for every reply,
        calling tick() every `every` seconds meanwhile."""
        if isinstance(cmds, dict):
            cmds = [cmds] * len(self.kids)
        for (_, _, f), cmd in zip(self.kids, cmds):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
        replies: dict[int, dict] = {}
        while len(replies) < len(self.kids):
            waiting = [(k, sock) for k, (_, sock, _) in enumerate(self.kids) if k not in replies]
            ready, _, _ = select.select([sock for _, sock in waiting], [], [], every)
            if not ready and tick is not None:
                tick()
            for k, sock in waiting:
                if sock in ready:
                    line = self.kids[k][2].readline()
                    if not line:
                        raise RuntimeError(f"client process {self.kids[k][0]} died")
                    replies[k] = json.loads(line)
        return [replies[k] for k in range(len(self.kids))]

    def close(self) -> None:
        """Tell every process to exit; kill what is still there after exit_within."""
        for _, _, f in self.kids:
            try:
                f.write(b'{"op": "exit"}\n')
                f.flush()
            except OSError:
                pass
        for pid, sock, f in self.kids:
            deadline = time.monotonic() + self.exit_within
            done = 0
            while time.monotonic() < deadline:
                try:
                    done, _ = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    done = pid
                if done:
                    break
                time.sleep(0.05)
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            try:
                f.close()
                sock.close()
            except OSError:
                pass
        self.kids = []


def _serve_commands(ctl: socket.socket, handlers: dict) -> None:
    """A ChildPool process: answer the parent's commands until "exit"."""
    f = ctl.makefile("rwb")
    for line in f:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "exit":
            if "exit" in handlers:
                handlers["exit"](cmd)
            return
        handler = handlers.get(op)
        reply = handler(cmd) if handler is not None else {"error": f"unknown op {op}"}
        f.write(json.dumps(reply).encode() + b"\n")
        f.flush()


def mmm(values) -> dict | None:
    """Min, median and max of the values that are not None (None if none are)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def fmt_mmm(m: dict | None, spec: str = "{:.0f}") -> str:
    """"min–median–max" of mmm()'s result, each formatted with `spec`; "-" for None."""
    return "-" if not m else "–".join(spec.format(m[k]) for k in ("min", "median", "max"))


def source_address(c: netns.ClientNs) -> str:
    return c.ips[c.index % len(c.ips)]


def ns_sysctl(ns: str, settings: dict[str, str]) -> dict[str, str]:
    """Set net.* sysctls inside namespace `ns` (most are per namespace: they die
    with it). Returns the values read back."""
    out = {}
    for key, value in settings.items():
        netns.call_in(ns, ["sysctl", "-qw", f"{key}={value}"])
        out[key] = netns.call_in(ns, ["sysctl", "-n", key]).stdout.strip().replace("\t", " ")
    return out


def tune_clients_for_new_connections(tb: netns.Testbed) -> dict[str, str]:
    """A request per connection (Connection: close) opens thousands of
    connections a second from one source address per client namespace: give
    each namespace the whole port range and let it reuse TIME_WAIT ports."""
    got = {}
    for c in tb.clients:
        got = ns_sysctl(c.ns, {"net.ipv4.ip_local_port_range": "1024 65535",
                               "net.ipv4.tcp_tw_reuse": "1"})
    return got


def conntrack(ns: str) -> dict:
    """Connection tracking in `ns`: entries now, the (global) maximum, and
    drops/insert failures counted so far (per namespace). {} if not loaded."""
    out: dict = {}
    r = netns.call_in(ns, ["cat", "/proc/sys/net/netfilter/nf_conntrack_count",
                           "/proc/sys/net/netfilter/nf_conntrack_max"], check=False)
    vals = r.stdout.split()
    if r.returncode != 0 or len(vals) != 2:
        return out
    out["count"], out["max"] = int(vals[0]), int(vals[1])
    r = netns.call_in(ns, ["cat", "/proc/net/stat/nf_conntrack"], check=False)
    lines = r.stdout.split("\n")
    if r.returncode == 0 and len(lines) > 1:
        head = lines[0].split()
        for key in ("drop", "early_drop", "insert_failed", "search_restart"):
            if key in head:
                i = head.index(key)
                out[key] = sum(int(line.split()[i], 16) for line in lines[1:] if line.strip())
    return out


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
        # wrk: "     99%   12.34ms"; wrk2: " 99.000%   12.34ms"
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+(\S+)", out, re.M)
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
    address on its own link.

    headers: extra request headers (wrk -H), e.g. ["Connection: close"].
    rate: offered requests/s of EACH wrk process (None: as fast as it can,
    a closed loop over `connections`). With wrk2 (`wrk2=path`) that is its
    -R; with plain wrk it is `pacing_script()`, a Lua delay() schedule.
    script_dir: where that Lua file is written (a directory removed later).
    """

    def __init__(self, tb: netns.Testbed, wrk: str, port: int, duration: float,
                 connections: int, threads: int = 1, path: str = "/", timeout: str = "2s",
                 headers: list[str] | tuple = (), rate: float | None = None,
                 wrk2: str | None = None, script_dir: str | None = None):
        self.procs = []
        extra: list[str] = []
        for h in headers:
            extra += ["-H", h]
        exe = wrk
        if rate:
            if wrk2:
                exe = wrk2
                extra += [f"-R{max(1, round(rate))}"]
            else:
                extra += ["-s", pacing_script(rate / threads, script_dir)]
        for c in tb.clients:
            argv = [exe, f"-t{threads}", f"-c{connections}", f"-d{duration:g}s",
                    f"--timeout={timeout}", "--latency", *extra,
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


# wrk (4.x, LuaJIT) has no rate option; wrk2 (-R) is not packaged by Debian.
# This script gives each wrk thread a fixed schedule: the k-th request is due
# k/rate seconds after the first, and delay() holds a free connection until
# its request is due (a late one goes at once: a server that falls behind is
# sent the backlog, as wrk2 does). Offered load is `rate` as long as a
# connection is free when a request falls due. Unlike wrk2, latency is
# measured from the actual send, not from the due time (no correction for
# coordinated omission): raise -c so connections are never all busy.
_PACING_LUA = """\
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } ipserve_timespec;
int clock_gettime(int clk_id, ipserve_timespec *tp);
]]
local ts = ffi.new("ipserve_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)   -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = 1000 / RATE
local due = nil
function delay()
  local t = now_ms()
  if due == nil then due = t end
  local wait = due - t
  due = due + interval
  if wait <= 0 then return 0 end
  return math.floor(wait + 0.5)
end
"""


def pacing_script(rate_per_thread: float, directory: str | None = None) -> str:
    """Write the pacing Lua script for `rate_per_thread` requests/s; returns its path."""
    import tempfile
    fd, path = tempfile.mkstemp(prefix="pace-", suffix=".lua", dir=directory)
    with os.fdopen(fd, "w") as f:
        f.write(_PACING_LUA.replace("RATE", repr(float(rate_per_thread)), 1))
    os.chmod(path, 0o644)
    return path


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


def check_connection_close(ns: str, src_ip: str | None, dst_ip: str, port: int,
                           path: str = "/", timeout: float = 5) -> dict:
    """One `Connection: close` request on a raw socket: does the response say
    `Connection: close`, and does the server then close the connection?"""
    out = {"status": None, "connection_header": None, "says_close": False,
           "server_closed": False, "close_after_ms": None, "error": None}
    try:
        sock = netns.tcp_connect(ns, src_ip, dst_ip, port, timeout=timeout)
    except OSError as exc:
        out["error"] = f"connect: {exc}"
        return out
    try:
        t0 = time.monotonic()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {dst_ip}:{port}\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except OSError as exc:              # a reset also ends it
                out["error"] = f"recv: {exc}"
                out["server_closed"] = True
                break
            if not chunk:
                out["server_closed"] = True
                break
            data += chunk
        if out["server_closed"]:
            out["close_after_ms"] = round(1000 * (time.monotonic() - t0), 1)
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        lines = head.split("\r\n")
        if lines and lines[0].startswith("HTTP/"):
            out["status"] = lines[0]
        values = [line.split(":", 1)[1].strip() for line in lines[1:]
                  if line.lower().startswith("connection:")]
        out["connection_header"] = ", ".join(values) if values else None
        out["says_close"] = any("close" in v.lower() for v in values)
    finally:
        sock.close()
    return out


def describe_close_check(r: dict) -> str:
    if r.get("error") and not r.get("status"):
        return f"FAILED: {r['error']}"
    hdr = r["connection_header"]
    said = f"answered with 'Connection: {hdr}'" if hdr else "answered with no Connection header"
    closed = (f"closed the connection {r['close_after_ms']:.0f} ms after the request"
              if r["server_closed"] else "did NOT close the connection (5 s)")
    ok = "ok" if r["says_close"] and r["server_closed"] else "NOT OK"
    return f"{ok}: {said}, {closed}"


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


_HELP: dict = {}


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


def descendants_of(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        out += kids
        todo += kids
    return sorted(out)


def raise_nofile(need: int) -> tuple[int, int, str | None]:
    """Raise this process's RLIMIT_NOFILE to at least `need` if it can (the
    hard limit too, which takes CAP_SYS_RESOURCE; bounded by fs.nr_open), else
    the soft limit to the hard one. Processes started after this inherit it.
    Returns (soft, hard, why the hard limit could not be raised, or None)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with open("/proc/sys/fs/nr_open") as f:
        nr_open = int(f.read())
    want = min(need, nr_open)
    why = None
    if hard != resource.RLIM_INFINITY and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError) as exc:
            why = (f"the hard limit {hard} cannot be raised to {want} ({exc}: "
                   "no CAP_SYS_RESOURCE here)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard, why


def rss_kib(pid: int) -> int | None:
    """VmRSS of `pid` in KiB (None if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def ipserve_worker_pids(proc: netns.IpserveProcess) -> list[int]:
    st = proc.status()
    return sorted(w["pid"] for w in st["workers"] if w.get("state") == "active")


# --------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------- #

def export_revision(rev: str, into: str) -> str:
    """The repository as of git revision `rev`, in a new directory under
    `into`: a server started with it on PYTHONPATH runs that revision's code."""
    tree = os.path.join(into, "rev-" + re.sub(r"[^A-Za-z0-9._-]", "_", rev))
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True)
    if archive.returncode != 0:
        die(f"--baseline {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree


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


def code_fingerprint() -> str:
    """A short hash of every ipserve/**.py file's content: which server code a
    measurement ran against, even when the tree changes during a run. (A
    worker imports its code at start: each server start takes the tree as it
    is then.)"""
    import hashlib
    h = hashlib.sha1()
    base = os.path.join(REPO, "ipserve")
    for root, dirs, files in sorted(os.walk(base)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, REPO).encode() + b"\0")
                try:
                    with open(path, "rb") as f:
                        h.update(f.read())
                except OSError:
                    pass
    return h.hexdigest()[:12]


def ipserve_has_option(flag: str) -> bool:
    """Does this tree's `ipserve --help` list `flag`? (Options come and go.)"""
    key = ("ipserve", flag)
    if key not in _HELP:
        _HELP[key] = subprocess.run([sys.executable, "-m", "ipserve.cli", "--help"], cwd=REPO,
                                    capture_output=True, text=True).stdout
    return flag in _HELP[key]


def describe_code(m: dict) -> str:
    dirty = len(m.get("git_dirty") or [])
    return (f"ipserve at commit {m.get('git_commit')}"
            + (f" + {dirty} changed file(s) under ipserve/" if dirty else "")
            + f", code fingerprint {m.get('code_fingerprint')}")


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
            "code_fingerprint": code_fingerprint(),
            "host": socket.gethostname(), "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load],
            "python": sys.version.split()[0], "kernel": os.uname().release}
