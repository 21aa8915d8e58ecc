"""pytest fixtures for the end-to-end tests, built on netns.py.

  testbed        a fresh Testbed (server ns + one client ns), always closed
  make_testbed   factory: make_testbed(n_clients=4) -> Testbed, all closed at teardown
  ipserve        factory: ipserve(args, env=None, **kw) -> IpserveProcess started in
                 the `testbed` server namespace with its own -n name and
                 --runtime-dir; masters and workers are killed at teardown, and
                 a failing test's report carries the tail of every ipserve log.
  loopback       a netns.LoopbackBed: no namespace, no privilege (127.0.0.x sources)
  loopback_ipserve  the `ipserve` factory for a LoopbackBed: ipserve runs in this
                 process's own namespace; needs no root (reuseport router only)

Without root, every test that needs it is skipped with one reason, NEEDS_ROOT;
and the short summary (-ra) prints one line per skip reason, not one per test
function (pytest_terminal_summary below; it folds every skip of the run).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import netns  # noqa: E402
from netns import IpserveProcess, Testbed  # noqa: E402

NEEDS_ROOT = "needs root to create network namespaces and kernel rules (sudo ./run tests)"
# Other modules say the same in words of their own ("creates network
# namespaces: needs root", ...): their skips are reported as NEEDS_ROOT too
# (see pytest_runtest_makereport). Better, they import it: `from conftest
# import NEEDS_ROOT`.
SAYS_NEEDS_ROOT = re.compile(r"\bneeds root\b")

_ipserve_key = pytest.StashKey[list]()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    # A SIGTERM to pytest (CI timeouts, `timeout`) should unwind like Ctrl-C, so
    # fixtures tear down and namespaces and processes are removed.
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _raise_interrupt)
    if os.geteuid() == 0:
        netns.sweep_stale()          # leftovers of runs that were SIGKILLed


def pytest_unconfigure(config):
    netns._close_live_testbeds()


def _require_root():
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)


@pytest.fixture
def testbed():
    _require_root()
    tb = Testbed()
    try:
        yield tb
    finally:
        tb.close()


@pytest.fixture
def make_testbed():
    _require_root()
    made: list[Testbed] = []

    def make(n_clients: int = 1, **kwargs) -> Testbed:
        tb = Testbed(n_clients=n_clients, **kwargs)
        made.append(tb)
        return tb

    try:
        yield make
    finally:
        errors = []
        for tb in reversed(made):
            try:
                tb.close()
            except Exception as exc:        # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def ipserve(request, testbed, tmp_path):
    """Factory: ipserve(args, env=None, testbed=None, **kw) -> IpserveProcess.

    Starts ``python -m ipserve.cli <args> -n <unique> --runtime-dir <private>``
    in the server namespace of `testbed` (default: the `testbed` fixture; pass
    one from make_testbed for several client namespaces). Other keywords go to
    netns.start_ipserve. Logs go to tmp_path/ipserve-<name>.log (kept by pytest).
    At teardown every master and every worker ever seen is killed, then
    anything else left in the server namespaces."""
    yield from _ipserve_factory(request, testbed, tmp_path)


@pytest.fixture
def loopback():
    bed = netns.LoopbackBed()
    try:
        yield bed
    finally:
        bed.close()


@pytest.fixture
def loopback_ipserve(request, loopback, tmp_path):
    """The `ipserve` factory on a LoopbackBed: no namespace, no root. Masters
    and every worker seen in a status are stopped by pidfd at teardown; nothing
    else is touched (the namespace is everybody's)."""
    yield from _ipserve_factory(request, loopback, tmp_path)


def _ipserve_factory(request, default_testbed, tmp_path):
    procs: list[IpserveProcess] = []
    request.node.stash[_ipserve_key] = procs

    def start(args, env=None, testbed=None, **kwargs) -> IpserveProcess:
        tb = testbed or default_testbed
        args = [str(a) for a in args]
        name = (netns._opt_value(args, "-n", "--name") or kwargs.pop("name", None)
                or netns.unique_name())
        # A second master of the same name (takeover tests) gets a log of its own.
        log_path, n = tmp_path / f"ipserve-{name}.log", 1
        while log_path.exists():
            n += 1
            log_path = tmp_path / f"ipserve-{name}-{n}.log"
        kwargs.setdefault("log_path", str(log_path))
        proc = netns.start_ipserve(tb, args, env, name=name, **kwargs)
        procs.append(proc)
        return proc

    try:
        yield start
    finally:
        errors = []
        for proc in reversed(procs):
            try:
                proc.cleanup()
            except Exception as exc:        # noqa: BLE001
                errors.append(exc)
        # Anything the masters started that never showed up in a status.
        for ns in dict.fromkeys(p.ns for p in procs if p.ns is not None):
            try:
                netns.kill_ns_processes(ns, grace=0.5)
            except Exception as exc:        # noqa: BLE001
                errors.append(exc)
        if errors:
            raise errors[0]


def root_skip_in_one_wording(longrepr, euid: int):
    """The (path, line, reason) a skip is reported with: a skip for want of
    root, in whatever words, says NEEDS_ROOT (at its own test's location)."""
    if euid == 0 or not (isinstance(longrepr, tuple) and len(longrepr) == 3):
        return longrepr
    if not SAYS_NEEDS_ROOT.search(str(longrepr[2])):
        return longrepr
    return (longrepr[0], longrepr[1], f"Skipped: {NEEDS_ROOT}")


def one_place_per_reason(longreprs: list[tuple]) -> list[tuple]:
    """Skips' (path, line, reason), each moved to the one place shared by every
    skip with its reason: its own if it is alone; else the file (no line) if
    they share one; else their common directory. pytest's short summary (-ra)
    folds skips by (path, line, reason), so it then prints one line per reason:
    "SKIPPED [468] tests/e2e: needs root ...", not one per test function."""
    places: dict[str, set[tuple[str, int | None]]] = {}
    for path, line, reason in longreprs:
        places.setdefault(reason, set()).add((os.path.abspath(path), line))
    shared: dict[str, tuple[str, int | None]] = {}
    for reason, where in places.items():
        files = sorted({path for path, _ in where})
        if len(where) == 1:
            shared[reason] = next(iter(where))
        elif len(files) == 1:
            shared[reason] = (files[0], None)
        else:
            shared[reason] = (os.path.commonpath(files), None)
    return [(*shared[reason], reason) for _, _, reason in longreprs]


def pytest_terminal_summary(terminalreporter):
    # Runs before pytest's own short summary (its hook wraps this one).
    skipped = [report for report in terminalreporter.stats.get("skipped", [])
               if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3]
    for report, longrepr in zip(skipped, one_place_per_reason([r.longrepr for r in skipped])):
        report.longrepr = longrepr


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped:
        report.longrepr = root_skip_in_one_wording(report.longrepr, os.geteuid())
    if report.failed:
        for proc in item.stash.get(_ipserve_key, []):
            state = ("running" if proc.running() else f"exit code {proc.returncode}")
            report.sections.append(
                (f"ipserve {proc.name} log ({state}, {proc.log_path}) - last lines",
                 proc.log_tail(80)))
    return report
