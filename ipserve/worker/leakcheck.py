"""Leak reports, the worker's part: take a baseline when the worker becomes
ready, another when a retired worker has drained its last connection, and
turn the difference into the "leak-report" message (ipserve.leaks has the
pure logic: diffing, ranking, thresholds).

* types: gc.collect(), then every object the garbage collector tracks
  (gc.get_objects(): instances of classes, containers; not str/int/bytes,
  which hold no references), counted by type with sys.getsizeof's shallow
  size. The census keeps its results in plain str -> int dicts, which CPython
  does not track, so a baseline never counts itself in the next census.
* tracemalloc: tracing starts before the application is imported (the
  worker calls start() first thing), so every allocation of the app is
  attributed to its file and line; the two snapshots are compared by line
  (Snapshot.compare_to(baseline, "lineno")).

Both block the hub for the whole census (tens of milliseconds for a small
app; bench/leak_overhead.py and the report measure it). The worker takes
them only when no client can be waiting on it: see Worker.run and _drain.
Nothing here ever raises into the worker: a census that fails becomes a
report with an error, and the worker exits all the same.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import tracemalloc

import gevent.hub

from ipserve import leaks
from ipserve.leaks import Census, Setting
from ipserve.messages import Growth, LeakMode

TRACEMALLOC_FRAMES = 1          # the allocating line is all a "lineno" comparison uses

# Allocations that name no site of the application: the measurement's own
# (the snapshots tracemalloc builds, this module, ipserve.leaks), the import
# system's caches, and gevent's hub. The hub's line is where everything
# gevent's compiled (Cython) event loop allocates lands, having no Python
# frame of its own. In workers of an app that keeps nothing
# (tests/apps/clean.py, examples/hello.py) it grew by 135 to 890 small blocks
# (mostly 53 bytes, none of them objects a container holds) over 11k to 280k
# requests, ever more slowly: it would make a long-lived clean worker's
# report "significant" while naming nothing anyone can fix in the app. The
# types census still counts every object, whatever allocated it.
# Matched against the grouped lines, not every trace: a few thousand distinct
# lines instead of hundreds of thousands of traces (Snapshot.filter_traces
# runs fnmatch per trace per filter: seconds of a blocked hub for a large app).
NOT_THE_APP = frozenset((
    tracemalloc.__file__,
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "<unknown>",
    __file__,
    leaks.__file__,
    gevent.hub.__file__,
))


def census_of_types(exclude: tuple = ()) -> Census:
    """Live objects by type: gc.collect(), then gc.get_objects(). The objects
    in `exclude` (the caller's own) are not counted; what this function
    builds is made after the list was taken, so it is not in it."""
    gc.collect()
    objects = gc.get_objects()
    skip = {id(obj) for obj in exclude}
    names: dict[type, str] = {}
    counts: dict[str, int] = {}
    sizes: dict[str, int] = {}
    getsizeof = sys.getsizeof
    for obj in objects:
        if id(obj) in skip:
            continue
        kind = type(obj)
        name = names.get(kind)
        if name is None:
            module = getattr(kind, "__module__", None)
            qualname = getattr(kind, "__qualname__", None)
            name = names[kind] = leaks.type_name(
                module if isinstance(module, str) else None,
                qualname if isinstance(qualname, str) else kind.__name__)
        counts[name] = counts.get(name, 0) + 1
        try:
            size = getsizeof(obj)
        except Exception:        # noqa: BLE001 - a broken __sizeof__ costs its size, no more
            size = 0
        sizes[name] = sizes.get(name, 0) + size
    del objects
    return Census(counts=counts, sizes=sizes)


class TypeCensus:
    mode = LeakMode.TYPES

    def __init__(self) -> None:
        self.before: Census | None = None
        self.objects = 0            # counted in the last census, for the log

    def baseline(self) -> None:
        self.before = self.census()

    def census(self) -> Census:
        taken = census_of_types(exclude=(self, self.before))
        self.objects = sum(taken.counts.values())
        return taken

    def growth(self) -> list[Growth]:
        return leaks.rank(leaks.diff(self.before, self.census()), self.mode)


class TracemallocSites:
    mode = LeakMode.TRACEMALLOC

    def __init__(self) -> None:
        self.before: tracemalloc.Snapshot | None = None
        self.objects = 0            # traced blocks in the last snapshot, for the log
        self.start_error: str | None = None
        try:
            if not tracemalloc.is_tracing():
                tracemalloc.start(TRACEMALLOC_FRAMES)
        except Exception as exc:    # noqa: BLE001 - reported with the census, never fatal
            self.start_error = f"tracemalloc.start: {type(exc).__name__}: {exc}"

    def snapshot(self) -> tracemalloc.Snapshot:
        if self.start_error:
            raise RuntimeError(self.start_error)
        if not tracemalloc.is_tracing():
            raise RuntimeError("tracemalloc is not tracing (the application stopped it?)")
        gc.collect()
        taken = tracemalloc.take_snapshot()
        self.objects = len(taken.traces)
        return taken

    def baseline(self) -> None:
        # The whole snapshot is kept (one tuple per live block: ~190 bytes
        # each, 117k blocks in a Django worker). Grouping it by line at once
        # and keeping only that was tried: the worker's RSS came out the same
        # (the snapshot's peak stays resident either way) and the baseline
        # took 4 times as long.
        self.before = self.snapshot()

    def growth(self) -> list[Growth]:
        after = self.snapshot()
        changes = [Growth(what=leaks.site_name(frame.filename, frame.lineno),
                          count=stat.count_diff, size=stat.size_diff)
                   for stat in after.compare_to(self.before, "lineno")
                   if (frame := stat.traceback[0]).filename not in NOT_THE_APP]
        return leaks.rank(changes, self.mode)


Check = TypeCensus | TracemallocSites


class LeakCheck:
    """One worker's leak check: start() at boot, baseline() at ready,
    report() at the end of a retirement. Logs what each census cost."""

    def __init__(self, check: Check, log) -> None:
        self.check = check
        self.log = log
        self.error: str | None = None   # why the baseline could not be taken

    def baseline(self) -> None:
        self.error = self._timed("baseline", self.check.baseline)

    def report(self, lifetime_s: float, requests: int) -> dict:
        """The leak-report message; never raises."""
        growth: list[Growth] = []

        def measure() -> None:
            growth.extend(self.check.growth())

        error = self.error or self._timed("final", measure)
        return leaks.report_message(self.check.mode, lifetime_s, requests,
                                    [] if error else growth, error)

    def _timed(self, which: str, step) -> str | None:
        started, rss = time.monotonic(), rss_bytes()
        try:
            step()
        except Exception as exc:      # noqa: BLE001 - a failed census must not stop the worker
            self.log.warning("leak census (%s): the %s census failed: %s: %s",
                             self.check.mode.value, which, type(exc).__name__, exc)
            return f"{which} census failed: {type(exc).__name__}: {exc}"
        self.log.info("leak census (%s): %s census of %d %s in %.0f ms (RSS %+d KiB)",
                      self.check.mode.value, which, self.check.objects,
                      leaks.unit(self.check.mode), 1000 * (time.monotonic() - started),
                      (rss_bytes() - rss) // 1024)
        return None


def start(setting: Setting, log) -> LeakCheck | None:
    """At worker boot, before the application is imported: tracemalloc must
    trace the app's allocations from the start. None when the setting is off."""
    if setting is Setting.TYPES:
        return LeakCheck(TypeCensus(), log)
    if setting is Setting.TRACEMALLOC:
        return LeakCheck(TracemallocSites(), log)
    return None


def rss_bytes() -> int:
    """This process's resident set size now (0 if /proc cannot say)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
