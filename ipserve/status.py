"""Rendering of the master's status for people (ipservectl status, leaks).

The status document may come from an older master: a missing key is shown
as "-", never a KeyError.
"""

from __future__ import annotations

import time

MISSING = "-"


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def signed_size(n: int) -> str:
    """A size delta: "+1.5MiB", "-312B", "0B"."""
    sign = "+" if n > 0 else "-" if n < 0 else ""
    return sign + human_size(abs(n))


def is_number(value) -> bool:
    # bool is an int; a flag shown as "1.0" would be a lie.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(value, fmt: str = "") -> str:
    return format(value, fmt) if is_number(value) else MISSING


def size(value) -> str:
    return human_size(value) if is_number(value) else MISSING


def duration(seconds) -> str:
    """45s, 12m05s, 3h02m, 2d03h: the two largest units are enough to read."""
    if not is_number(seconds):
        return MISSING
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def reload_outcome(reload: dict) -> str:
    """What the last (or current) deploy came to, in a few words."""
    state = reload.get("state")
    if state == "done":
        return f"done in {number(reload.get('seconds'))}s"
    if state == "in progress":
        return f"in progress ({number(reload.get('booted'))}/{number(reload.get('targets'))} ready)"
    if state == "failed":
        return f"FAILED, every slot kept its worker: {reload.get('error')}"
    return str(state or MISSING)


BASE_COLUMNS = ("pid", "slot", "gen", "port", "state", "rss", "conns", "requests", "lag_ms",
                "nice", "age_s", "retired_s")
# Columns a newer master adds; shown only when its workers carry them, after
# the column they belong next to.
OPTIONAL_COLUMNS = {"ws": ("websockets", "conns"), "req/s": ("requests_per_s", "requests"),
                    "beat_s": ("heartbeat_age_s", "lag_ms")}
# Workers count, the master shows their last heartbeat: a newcomer seeing
# "requests 0" right after ten requests should read why, next to the table.
HEARTBEAT_NOTE = ("conns, ws, requests, req/s, lag_ms: as each worker reported them in its "
                  "last heartbeat, beat_s seconds ago (workers send one a second)")


def table_columns(workers: list[dict]) -> tuple[str, ...]:
    columns: list[str] = []
    for column in BASE_COLUMNS:
        columns.append(column)
        for extra, (key, after) in OPTIONAL_COLUMNS.items():
            if after == column and any(key in w for w in workers):
                columns.append(extra)
    return tuple(columns)


def worker_cells(w: dict) -> dict[str, str]:
    retired = w.get("retired_for_s")
    return {"pid": str(w.get("pid", MISSING)), "slot": str(w.get("slot", MISSING)),
            "gen": str(w.get("generation", MISSING)), "port": str(w.get("port") or MISSING),
            "state": str(w.get("state", MISSING)), "rss": size(w.get("rss")),
            "conns": number(w.get("connections")), "ws": number(w.get("websockets")),
            "requests": number(w.get("requests")), "req/s": number(w.get("requests_per_s"), ".1f"),
            "lag_ms": number(w.get("lag_ms"), ".1f"), "beat_s": number(w.get("heartbeat_age_s"), ".1f"),
            "nice": number(w.get("nice")),
            "age_s": number(w.get("age_s"), ".0f"),
            "retired_s": MISSING if retired is None else number(retired, ".0f")}


def align(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip()
            for row in rows]


def render_table(status: dict) -> str:
    master = status.get("master") or {}
    lines = [(
        f"{status.get('name', MISSING)}: master pid {master.get('pid', MISSING)}, "
        f"generation {master.get('generation', MISSING)}, router {status.get('router', MISSING)}, "
        f"bind {', '.join(status.get('bind') or [])}, app {status.get('app')}")]
    if status.get("route_error"):
        lines.append(f"routing error (previous routes kept): {status['route_error']}")
    reload = status.get("reload")
    if reload:
        lines.append(f"last {reload.get('reason') or 'reload'}: generation {reload.get('generation')} "
                     f"{reload_outcome(reload)}")
    for slot in status.get("slot_table", []):
        if slot.get("waiting_s") is not None:
            lines.append(f"slot {slot['slot']}: no active worker for {slot['waiting_s']}s"
                         + (" (resetting its connections)" if slot.get("refusing") else
                            " (its clients wait in its queue)"))
    for sock in status.get("routing", {}).get("sockets", []):
        if "reserved" in sock:
            lines.append(f"reserved {sock['reserved']}")
        else:
            lines.append(f"slot {sock['slot']} socket: fd {sock['fd']} {sock['address']}")
    workers = status.get("workers") or []
    columns = table_columns(workers)
    if "beat_s" in columns:
        lines.append(HEARTBEAT_NOTE)
    rows = [columns]
    for w in workers:
        cells = worker_cells(w)
        rows.append(tuple(cells[column] for column in columns))
    lines.extend(align(rows))
    return "\n".join(lines)


# ---------------------------------------------------------------- leak reports

LEAK_COLUMNS = ("", "pid", "slot", "gen", "lifetime", "requests", "mode", "at", "count", "size",
                "what")
SIGNIFICANT = "!"


def growth_cells(growth: dict) -> tuple[str, str, str]:
    count = growth.get("count")
    return (f"{count:+d}" if isinstance(count, int) and not isinstance(count, bool) else MISSING,
            signed_size(growth["size"]) if is_number(growth.get("size")) else MISSING,
            str(growth.get("what", MISSING)))


def report_time(at) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if is_number(at) else MISSING


def render_leaks(reports: list[dict]) -> str:
    """One row per report (oldest first, newest last), its growth rows under
    it; a report that found significant growth is marked with "!"."""
    if not reports:
        return "no leak reports yet"
    rows: list[tuple[str, ...]] = [LEAK_COLUMNS]
    blank = ("",) * 8
    for report in reports:
        head = (SIGNIFICANT if report.get("significant") else "",
                str(report.get("pid", MISSING)), str(report.get("slot", MISSING)),
                str(report.get("generation", MISSING)), duration(report.get("lifetime_s")),
                number(report.get("requests")), str(report.get("mode", MISSING)),
                report_time(report.get("at")))
        growth = [g for g in report.get("growth") or [] if isinstance(g, dict)]
        if report.get("error"):
            rows.append(head + ("", "", f"error: {report['error']}"))
        elif not growth:
            rows.append(head + ("", "", "(nothing grew)"))
        for i, g in enumerate(growth):
            rows.append((head if i == 0 and not report.get("error") else blank) + growth_cells(g))
    lines = left_align_last(rows)
    if any(report.get("significant") for report in reports):
        lines.append(f"{SIGNIFICANT} = significant growth")
    return "\n".join(lines)


def left_align_last(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned like align(), but the last column (names, of any length) is
    left-aligned so that the numbers before it line up."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.rjust(width) for cell, width in zip(row, widths)] + [row[-1]]).rstrip()
            for row in rows]
