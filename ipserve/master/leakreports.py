"""The master's side of leak reports: a retired worker's last word on what
grew in it (ipserve.worker.leakcheck), kept for status and the dashboard and
logged once: a WARNING block naming what grew when it is significant
(ipserve.leaks.is_significant), else one INFO line."""

from __future__ import annotations

import logging
import time

from ipserve import leaks
from ipserve.master.registry import WorkerRecord, WorkerState
from ipserve.messages import LeakReport


def as_status(record: WorkerRecord, report: LeakReport, significant: bool) -> dict:
    """One entry of status["leak_reports"]. Who sent it (pid, slot,
    generation) comes from the master's record, never from the message."""
    return {"pid": record.pid, "slot": record.slot, "generation": record.generation,
            "mode": report.mode.value, "at": time.time(), "lifetime_s": report.lifetime_s,
            "requests": report.requests, "significant": significant,
            "growth": [{"what": g.what, "count": g.count, "size": g.size}
                       for g in report.growth],
            "error": report.error}


def on_leak_report(master, record: WorkerRecord, report: LeakReport) -> None:
    # Application code runs in the worker: it could send reports at will, to
    # push real ones out of the last 20 or to fill the log. One per worker,
    # and only from one that is retiring, as a real report comes.
    if record.leak_reported or record.state is not WorkerState.RETIRING:
        master.log.warning("ignored a leak report from worker pid %d (%s)", record.pid,
                           "its second" if record.leak_reported else
                           f"it is {record.state.value}, not retiring")
        return
    record.leak_reported = True
    significant = report.error is None and leaks.is_significant(report.growth)
    master.leak_reports.append(as_status(record, report, significant))
    master.last_publish = -1e9          # the dashboard shows it at once
    who = leaks.describe_worker(record.pid, record.slot, record.generation, report.requests,
                                report.lifetime_s)
    if report.error is not None:
        master.log.warning("%s", leaks.error_line(who, report.mode, report.error))
    elif significant:
        master.log.warning("%s", leaks.warning_block(who, report.mode, report.growth))
    else:
        master.log.log(logging.INFO, "%s", leaks.quiet_line(who, report.mode))
