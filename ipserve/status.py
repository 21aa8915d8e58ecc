"""Rendering of the master's status for people (ipservectl status)."""

from __future__ import annotations


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


COLUMNS = ("pid", "slot", "gen", "port", "state", "rss", "conns", "requests", "lag_ms", "nice",
           "age_s", "retired_s")


def render_table(status: dict) -> str:
    master = status["master"]
    lines = [
        f"{status['name']}: master pid {master['pid']}, generation {master['generation']}, "
        f"router {status['router']}, bind {', '.join(status['bind'])}, app {status.get('app')}",
    ]
    if status.get("route_error"):
        lines.append(f"routing error (previous routes kept): {status['route_error']}")
    reload = status.get("reload")
    if reload:
        outcome = {"done": f"done in {reload.get('seconds')}s", "in progress":
                   f"in progress ({reload.get('booted')}/{reload.get('targets')} ready)",
                   "failed": f"FAILED, every slot kept its worker: {reload.get('error')}"
                   }.get(reload["state"], reload["state"])
        lines.append(f"last {reload.get('reason') or 'reload'}: generation {reload.get('generation')} "
                     f"{outcome}")
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
    rows = [COLUMNS]
    for w in status["workers"]:
        rows.append((str(w["pid"]), str(w["slot"]), str(w["generation"]), str(w["port"] or "-"),
                     w["state"], human_size(w["rss"]), str(w["connections"]), str(w["requests"]),
                     f"{w['lag_ms']:.1f}", str(w["nice"]), f"{w['age_s']:.0f}",
                     "-" if w.get("retired_for_s") is None else f"{w['retired_for_s']:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        lines.append("  ".join(cell.rjust(width) for cell, width in zip(row, widths)).rstrip())
    return "\n".join(lines)
