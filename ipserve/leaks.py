"""Leak reports, the pure part: what grew between two censuses of a worker,
which of it is worth sending, whether it matters, and how it reads.

A census maps "what" to (count, size): in `types` mode "what" is a type
("leaky.LeakyThing", "dict" for builtins) and the numbers are live objects
and their shallow sizes (sys.getsizeof); in `tracemalloc` mode it is an
allocation site ("apps/leaky.py:36") and the numbers are live memory blocks
and their bytes. The worker takes one census when it becomes ready and one
when it has drained its last connection (ipserve.worker.leakcheck); this
module diffs them, and the master judges the result.

Thresholds (all here, so the worker's and the master's agree):

* Sent by the worker (noise floor): entries whose count grew by at least
  SEND_MIN_COUNT or whose size grew by at least SEND_MIN_SIZE, at most
  SEND_TOP of them. A worker's first requests warm caches (the re module,
  header tables, the first connection's buffers): a few dozen objects,
  never hundreds.
* Significant (the master's rule): some entry grew by at least
  SIGNIFICANT_COUNT objects (blocks) or SIGNIFICANT_SIZE bytes. Then the
  master logs the report at WARNING, else one INFO line.
"""

from __future__ import annotations

import dataclasses
import enum

from ipserve.messages import Growth, LeakMode
from ipserve.status import human_size

SEND_MIN_COUNT = 100           # objects (blocks) more than at the baseline
SEND_MIN_SIZE = 64 * 1024      # bytes more than at the baseline
SEND_TOP = 20                  # entries in one report (the protocol allows 50)
SIGNIFICANT_COUNT = 1000
SIGNIFICANT_SIZE = 1 << 20     # 1 MiB

WHAT_LIMIT = 300               # characters of "what" the protocol accepts
ERROR_LIMIT = 2000             # characters of "error"


class Setting(enum.Enum):
    """The leak_report setting: a mode, or off."""
    TYPES = "types"
    TRACEMALLOC = "tracemalloc"
    OFF = "off"

    @property
    def mode(self) -> LeakMode | None:
        return None if self is Setting.OFF else LeakMode(self.value)


@dataclasses.dataclass(frozen=True)
class Census:
    """what -> live count, what -> bytes. Plain str -> int dicts on purpose:
    CPython does not track them in the garbage collector, so a census kept
    as a baseline never shows up in the next one (gc.get_objects())."""
    counts: dict[str, int]
    sizes: dict[str, int]


# ---------------------------------------------------------------- names

def type_name(module: str | None, qualname: str) -> str:
    """"leaky.LeakyThing"; builtins by their plain name ("dict")."""
    if not module or module == "builtins":
        return qualname[:WHAT_LIMIT]
    return f"{module}.{qualname}"[:WHAT_LIMIT]


def site_name(filename: str, lineno: int) -> str:
    """An allocation site by the last two parts of its path:
    "/srv/app/tests/apps/leaky.py", 36 -> "apps/leaky.py:36"."""
    parts = filename.replace("\\", "/").rstrip("/").split("/")
    short = "/".join(parts[-2:])
    suffix = f":{lineno}"
    return short[-(WHAT_LIMIT - len(suffix)):] + suffix


# ---------------------------------------------------------------- diffing

def diff(before: Census, after: Census) -> list[Growth]:
    """Every entry whose count or size changed, in no particular order."""
    changed = []
    for what in after.counts.keys() | before.counts.keys():
        count = after.counts.get(what, 0) - before.counts.get(what, 0)
        size = after.sizes.get(what, 0) - before.sizes.get(what, 0)
        if count or size:
            changed.append(Growth(what=what, count=count, size=size))
    return changed


def is_noise(growth: Growth) -> bool:
    return growth.count < SEND_MIN_COUNT and growth.size < SEND_MIN_SIZE


def rank(changes: list[Growth], mode: LeakMode) -> list[Growth]:
    """What the worker sends: the entries above the noise floor, most grown
    first, at most SEND_TOP. Types rank by objects (a leak of small objects
    is many of them); allocation sites by bytes (what tracemalloc measures),
    then by the other number, then by name, so equal inputs give equal reports."""
    kept = [g for g in changes if not is_noise(g)]
    if mode is LeakMode.TRACEMALLOC:
        kept.sort(key=lambda g: (-g.size, -g.count, g.what))
    else:
        kept.sort(key=lambda g: (-g.count, -g.size, g.what))
    return kept[:SEND_TOP]


def is_significant(growth) -> bool:
    """The master's rule: something grew by SIGNIFICANT_COUNT objects (blocks)
    or SIGNIFICANT_SIZE bytes."""
    return any(g.count >= SIGNIFICANT_COUNT or g.size >= SIGNIFICANT_SIZE for g in growth)


# ---------------------------------------------------------------- the message

def report_message(mode: LeakMode, lifetime_s: float, requests: int, growth: list[Growth],
                   error: str | None = None) -> dict:
    """The worker's "leak-report" message (ipserve.messages parses it)."""
    return {"type": "leak-report", "mode": mode.value,
            "lifetime_s": round(max(0.0, lifetime_s), 3), "requests": requests,
            "growth": [{"what": g.what[:WHAT_LIMIT], "count": g.count, "size": g.size}
                       for g in growth[:SEND_TOP]],
            "error": None if error is None else error[:ERROR_LIMIT]}


# ---------------------------------------------------------------- for people

def signed_size(n: int) -> str:
    """"+109.4KiB", "-312B"."""
    return ("+" if n > 0 else "-" if n < 0 else "") + human_size(abs(n))


def unit(mode: LeakMode) -> str:
    return "blocks" if mode is LeakMode.TRACEMALLOC else "objects"


def describe_worker(pid: int, slot: int, generation: int, requests: int,
                    lifetime_s: float) -> str:
    return (f"worker pid {pid} (slot {slot}, generation {generation}, {requests} requests, "
            f"lived {lifetime_s:.0f}s)")


def warning_block(who: str, mode: LeakMode, growth) -> str:
    """The master's one WARNING record for a significant report: a head line,
    then one aligned line per entry:

        leak report: worker pid 123 (slot 1, ...): grew (types)
          leaky.LeakyThing  +2000 objects  +109.4KiB
    """
    rows = [(g.what, f"{g.count:+d} {unit(mode)}", signed_size(g.size)) for g in growth]
    widths = [max(len(row[i]) for row in rows) for i in range(3)] if rows else [0, 0, 0]
    lines = [f"leak report: {who}: grew ({mode.value})"]
    lines += [f"  {what.ljust(widths[0])}  {count.rjust(widths[1])}  {size.rjust(widths[2])}"
              for what, count, size in rows]
    return "\n".join(lines)


def quiet_line(who: str, mode: LeakMode) -> str:
    """The master's one INFO line for a report that found nothing significant."""
    return f"leak report: {who}: no significant growth ({mode.value})"


def error_line(who: str, mode: LeakMode, error: str) -> str:
    """The master's one WARNING line for a worker that could not take its census."""
    return f"leak report: {who}: no census ({mode.value}): {error}"
