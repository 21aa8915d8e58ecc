"""`ipservectl top`: a live view of one instance, redrawn every second.

render_lines() turns a status document into the screen's lines, each with
a style (pure, unit-tested); the rest only fetches the status in the
background and draws those lines with curses. The document may come from an
older master: whatever it lacks is shown as "-".
"""

from __future__ import annotations

import contextlib
import curses
import dataclasses
import enum
import locale
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from ipserve.errors import UsageError
from ipserve.master.registry import WorkerState
from ipserve.status import MISSING, duration, is_number, number, size

REFRESH_S = 1.0
KEY_WAIT_MS = 200         # how long a keypress may wait: q answers at once, not after a refresh
QUIT_KEYS = {ord("q"), ord("Q")}


class Style(enum.Enum):
    PLAIN = "plain"
    TITLE = "title"           # the instance line
    WARNING = "warning"       # something needs a look: no master, failed reload, hung worker
    COLUMNS = "columns"       # the column header of the worker rows
    RETIRING = "retiring"     # a worker that only drains: of interest, not of concern


@dataclasses.dataclass(frozen=True)
class Line:
    text: str
    style: Style = Style.PLAIN


# ---------------------------------------------------------------- rendering

@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    width: int
    left: bool = False

    def cell(self, text: str) -> str:
        return text.ljust(self.width) if self.left else text.rjust(self.width)


COLUMNS = (Column("SLOT", 4), Column("PID", 11, left=True), Column("GEN", 4),
           Column("STATE", 8, left=True), Column("RSS", 9), Column("CONNS", 6), Column("WS", 5),
           Column("REQ/S", 7), Column("LAG ms", 7), Column("AGE", 7), Column("NICE", 4),
           Column("DRAIN", 5))

# Within a slot: who serves it, who is about to, who is in trouble, who drains.
RANK = {WorkerState.ACTIVE: 0, WorkerState.READY: 1, WorkerState.BOOTING: 2,
        WorkerState.HUNG: 3, WorkerState.KILLED: 4, WorkerState.RETIRING: 5}
UNKNOWN_RANK = len(RANK)
TROUBLE = {WorkerState.HUNG, WorkerState.KILLED}
UNDER = " \\_ "          # as `ps f` draws a process under its parent


def state_of(worker: dict) -> WorkerState | None:
    try:
        return WorkerState(worker.get("state"))
    except ValueError:
        return None


def drain_progress(worker: dict) -> str:
    """How much of what it held when it started retiring a worker has let go."""
    held, now = worker.get("connections_at_retire"), worker.get("connections")
    if not is_number(held) or not is_number(now):
        return MISSING
    if held <= 0:
        return "100%"
    return f"{max(0.0, min(1.0, 1 - now / held)) * 100:.0f}%"


def worker_row(worker: dict, first_of_slot: bool) -> str:
    state = state_of(worker)
    pid = str(worker.get("pid", MISSING))
    cells = (str(worker.get("slot", MISSING)) if first_of_slot else "",
             pid if first_of_slot else UNDER + pid,
             str(worker.get("generation", MISSING)),
             str(worker.get("state", MISSING)),
             size(worker.get("rss")), number(worker.get("connections")),
             number(worker.get("websockets")), number(worker.get("requests_per_s"), ".1f"),
             number(worker.get("lag_ms"), ".1f"), duration(worker.get("age_s")),
             number(worker.get("nice")),
             drain_progress(worker) if state is WorkerState.RETIRING else "")
    return "  ".join(column.cell(cell) for column, cell in zip(COLUMNS, cells)).rstrip()


def worker_style(worker: dict) -> Style:
    state = state_of(worker)
    if state in TROUBLE or worker.get("too_busy") or worker.get("boot_error"):
        return Style.WARNING
    if state is WorkerState.RETIRING:
        return Style.RETIRING
    return Style.PLAIN


def sort_key(worker: dict) -> tuple:
    state = state_of(worker)
    generation = worker.get("generation")
    return (RANK.get(state, UNKNOWN_RANK),
            -generation if is_number(generation) else 0, str(worker.get("pid")))


def slot_rows(status: dict) -> list[Line]:
    """Every slot in order: the worker that holds it, then its successors,
    then its retiring workers, indented under it. A slot nobody holds still
    gets its row."""
    by_slot: dict[int, list[dict]] = {}
    for worker in status.get("workers") or []:
        if isinstance(worker, dict) and isinstance(worker.get("slot"), int):
            by_slot.setdefault(worker["slot"], []).append(worker)
    slots = status.get("slots")
    if isinstance(slots, int):
        for slot in range(slots):
            by_slot.setdefault(slot, [])
    rows = []
    for slot in sorted(by_slot):
        workers = sorted(by_slot[slot], key=sort_key)
        if not workers:
            empty = (str(slot), MISSING, "", "(none)") + ("",) * (len(COLUMNS) - 4)
            rows.append(Line("  ".join(c.cell(t) for c, t in zip(COLUMNS, empty)).rstrip(),
                             Style.WARNING))
        for i, worker in enumerate(workers):
            rows.append(Line(worker_row(worker, first_of_slot=i == 0), worker_style(worker)))
    return rows


def title_line(status: dict) -> Line:
    master = status.get("master") or {}
    parts = [str(status.get("name", MISSING)),
             f"master {master.get('pid', MISSING)}",
             f"generation {master.get('generation', MISSING)}",
             f"up {duration(master.get('uptime_s'))}",
             f"router {status.get('router', MISSING)}",
             f"bind {', '.join(map(str, status.get('bind') or [])) or MISSING}"]
    if master.get("stopping"):
        parts.append(f"STOPPING ({master['stopping']})")
    return Line("  ".join(parts) + "   (q quits)", Style.TITLE)


def reload_line(status: dict, now: float) -> Line:
    reload = status.get("reload")
    reloads = [r for r in status.get("reloads") or [] if isinstance(r, dict)]
    if not isinstance(reload, dict):
        reload = reloads[-1] if reloads else None
    totals = (status.get("counters") or {}).get("reloads")
    tally = (f"   (reloads: {number(totals.get('ok'))} ok, {number(totals.get('failed'))} failed)"
             if isinstance(totals, dict) else "")
    if reload is None:
        return Line("reload: none yet" + tally)
    what = f"{reload.get('reason') or 'reload'}: generation {reload.get('generation', MISSING)}"
    state = reload.get("state")
    if state == "in progress":
        started = next((r.get("started") for r in reversed(reloads)
                        if r.get("generation") == reload.get("generation")), None)
        since = f" for {duration(now - started)}" if is_number(started) else ""
        return Line(f"{what} in progress, {number(reload.get('booted'))}/"
                    f"{number(reload.get('targets'))} booted{since}" + tally)
    if state == "done":
        return Line(f"{what} done in {number(reload.get('seconds'), '.1f')}s" + tally)
    if state == "failed":
        return Line(f"{what} failed: {reload.get('error') or MISSING}" + tally, Style.WARNING)
    return Line(f"{what} {state or MISSING}" + tally)


def memory_line(status: dict) -> Line:
    memory = status.get("memory")
    if not isinstance(memory, dict):
        return Line(f"memory: {MISSING}")
    used, limit = memory.get("cluster_rss"), memory.get("cluster_limit")
    text = f"memory: cluster {size(used)}"
    if is_number(limit) and limit > 0:
        share = f" ({used / limit * 100:.0f}%)" if is_number(used) else ""
        text += f" of {size(limit)} limit{share}"
    else:
        text += ", no limit"
    if is_number(memory.get("worker_limit")):
        text += f"; {size(memory['worker_limit'])} per worker"
    retire_at = memory.get("retire_at")
    over = is_number(used) and is_number(retire_at) and used >= retire_at
    return Line(text, Style.WARNING if over else Style.PLAIN)


def traffic_line(status: dict) -> Line | None:
    counters = status.get("counters")
    if not isinstance(counters, dict):
        return None
    rates = [w.get("requests_per_s") for w in status.get("workers") or [] if isinstance(w, dict)]
    rates = [r for r in rates if is_number(r)]
    responses = counters.get("responses") or {}
    parts = [f"requests: {number(counters.get('requests'))}"]
    if rates:
        parts.append(f"now {sum(rates):.1f}/s")
    parts += [f"{kind} {number(responses.get(kind))}" for kind in ("2xx", "3xx", "4xx", "5xx")]
    parts.append(f"shed {number(counters.get('shed'))}")
    return Line("  ".join(parts))


def problem_lines(status: dict) -> list[Line]:
    lines = []
    if status.get("route_error"):
        lines.append(Line(f"routing error (previous routes kept): {status['route_error']}",
                          Style.WARNING))
    for slot in status.get("slot_table") or []:
        if isinstance(slot, dict) and slot.get("waiting_s") is not None:
            lines.append(Line(f"slot {slot.get('slot')}: no active worker for "
                              f"{number(slot['waiting_s'], '.0f')}s"
                              + (" (resetting its connections)" if slot.get("refusing") else ""),
                              Style.WARNING))
    return lines


def render_lines(status: dict | None, width: int, now: float,
                 problem: str | None = None) -> list[Line]:
    """The whole screen, `width` columns wide at most. `status` is the last
    document the master answered (None before the first); `problem`, why
    the latest request got no answer."""
    lines: list[Line] = []
    if status is None:
        lines.append(Line("ipserve: no answer yet   (q quits)", Style.TITLE))
    else:
        lines.append(title_line(status))
    if problem is not None:
        when = status.get("time") if status else None
        age = f"   (showing its answer of {duration(now - when)} ago)" if is_number(when) else ""
        lines.append(Line(f"master not answering: {problem}{age}", Style.WARNING))
    if status is not None:
        lines.append(reload_line(status, now))
        lines.append(memory_line(status))
        traffic = traffic_line(status)
        if traffic is not None:
            lines.append(traffic)
        lines.extend(problem_lines(status))
        lines.append(Line(""))
        header = "  ".join(column.cell(column.title) for column in COLUMNS)
        lines.append(Line(header.ljust(width), Style.COLUMNS))
        lines.extend(slot_rows(status))
    width = max(0, width)
    return [Line(line.text[:width], line.style) for line in lines]


# ---------------------------------------------------------------- the terminal

class Poller:
    """Asks the master for its status every REFRESH_S in a thread of its own,
    so a master that is slow to answer never freezes the keyboard."""

    def __init__(self, fetch: Callable[[], dict], first: dict | None, interval: float):
        self._fetch = fetch
        self._interval = interval
        self._lock = threading.Lock()
        self._status = first
        self._problem: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="top-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def snapshot(self) -> tuple[dict | None, str | None]:
        with self._lock:
            return self._status, self._problem

    def poll(self) -> None:
        """One request: a new status, or why there is none (the last one stays)."""
        try:
            status, problem = self._fetch(), None
        except Exception as exc:   # noqa: BLE001 - any failure is shown, never raised
            status, problem = None, str(exc) or type(exc).__name__
        with self._lock:
            if status is not None:
                self._status = status
            self._problem = problem

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.poll()


def attributes() -> dict[Style, int]:
    warning = curses.A_BOLD
    if curses.has_colors():
        with contextlib.suppress(curses.error):
            curses.start_color()
            curses.use_default_colors()
            curses.init_pair(1, curses.COLOR_RED, -1)
            warning |= curses.color_pair(1)
    return {Style.PLAIN: curses.A_NORMAL, Style.TITLE: curses.A_BOLD, Style.WARNING: warning,
            Style.COLUMNS: curses.A_REVERSE, Style.RETIRING: curses.A_DIM}


def draw(window, lines: list[Line], attrs: dict[Style, int]) -> None:
    height, width = window.getmaxyx()
    window.erase()
    for y, line in enumerate(lines[:height]):
        # Writing the bottom-right cell moves the cursor past the window's
        # end, which curses reports as an error after writing: leave it blank.
        room = width - 1 if y == height - 1 else width
        if room <= 0:
            continue
        text = line.text[:room]
        try:
            window.addnstr(y, 0, text, room, attrs[line.style])
        except UnicodeEncodeError:   # a terminal whose locale cannot show the text
            with contextlib.suppress(curses.error):
                window.addnstr(y, 0, text.encode("ascii", "replace").decode(), room,
                               attrs[line.style])
        except curses.error:
            pass
    window.refresh()


def loop(window, poller: Poller, clock: Callable[[], float]) -> None:
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    window.timeout(KEY_WAIT_MS)
    attrs = attributes()
    while True:
        status, problem = poller.snapshot()
        _, width = window.getmaxyx()
        draw(window, render_lines(status, width, clock(), problem), attrs)
        if window.getch() in QUIT_KEYS:
            return


def exit_on(signum, frame):
    # Unwinds through curses.wrapper, which gives the terminal back.
    raise SystemExit(128 + signum)


def run(fetch: Callable[[], dict], first: dict | None, interval: float = REFRESH_S,
        clock: Callable[[], float] = time.time) -> int:
    """Show the live view until q or Ctrl-C (exit status 0)."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("top needs a terminal (in a script, use `status --json`)")
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_ALL, "")     # curses shows non-ASCII text only with it
    previous = {sig: signal.signal(sig, exit_on) for sig in (signal.SIGTERM, signal.SIGHUP)}
    poller = Poller(fetch, first, interval)
    poller.start()
    try:
        curses.wrapper(loop, poller, clock)
    except KeyboardInterrupt:
        pass                                    # Ctrl-C quits like q
    except curses.error as exc:
        raise UsageError(f"top cannot draw on this terminal (TERM={os.environ.get('TERM')}): "
                         f"{exc}") from None
    finally:
        poller.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
