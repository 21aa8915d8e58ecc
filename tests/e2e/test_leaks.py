"""End-to-end tests of leak reports on retirement (issue 10).

The real `ipserve` runs tests/apps/leaky.py (every request keeps one more
LeakyThing for the life of the worker) or its twin tests/apps/clean.py
(keeps nothing) with one worker, in the testbed's server namespace; a client
in the client namespace sends N requests on one keep-alive connection, so
all of them reach that worker. Then `kill -HUP`: a new generation takes the
slot, the old worker drains, the client closes, the worker's last word is a
leak report, which must show in `ipservectl status --json` (leak_reports),
in `ipservectl leaks` and, when significant, as a WARNING block in the
master's log. Nothing is mocked; waits are bounded polls of the status, and
assertions are about counts, names and log lines, never durations.
"""

from __future__ import annotations

import json
import os
import re
import signal

import netns
import pytest
from netns import HttpClient, active_workers

PORT = 8000
N = 3000                                  # requests the old worker serves
APPS = os.path.join(netns.REPO_ROOT, "tests", "apps")
LEAKY = os.path.join(APPS, "leaky.py")
CLEAN = os.path.join(APPS, "clean.py")


def marked_line(path: str, mark: str) -> int:
    with open(path) as f:
        return next(n for n, text in enumerate(f, 1) if text.rstrip().endswith(mark))


def serve(ipserve, app: str, mode: str):
    """ipserve APP -w 1 --leak-report MODE, its one worker active."""
    srv = ipserve([f"{app}:application", "-w", "1", "--router", "reuseport",
                   "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "3", "--leak-report", mode])
    st = srv.wait_ready(1, generation=1)
    (worker,) = active_workers(st, 1)
    return srv, worker


def serve_requests(tb, n: int) -> HttpClient:
    """n requests on one keep-alive connection, left open."""
    client = HttpClient(tb.client_ns, tb.client_ips[0], tb.server_ip, PORT, timeout=10)
    for _ in range(n):
        status, _, body = client.get("/")
        assert status == 200, body
    return client


def retire(srv, client: HttpClient) -> None:
    """HUP; once generation 2 holds the slot, the client closes: the old
    worker has drained its last connection."""
    srv.send_signal(signal.SIGHUP)
    srv.wait_ready(1, generation=2)
    client.close()


def wait_report(srv, pid: int) -> dict:
    st = srv.wait_for(lambda st: any(r.get("pid") == pid for r in st.get("leak_reports") or []),
                      timeout=60, what=f"a leak report from worker pid {pid}")
    (report,) = [r for r in st["leak_reports"] if r["pid"] == pid]
    return report


def leak_and_retire(ipserve, testbed, app: str, mode: str) -> tuple:
    srv, worker = serve(ipserve, app, mode)
    client = serve_requests(testbed, N)
    retire(srv, client)
    report = wait_report(srv, worker["pid"])
    assert (report["slot"], report["generation"], report["mode"]) == (0, 1, mode), report
    assert report["error"] is None, report
    assert report["requests"] >= N, report          # every request reached this worker
    return srv, worker, report


def warning_block(srv, pid: int) -> list[str]:
    """The master's WARNING block for `pid`: its head line and the entry lines under it."""
    lines = srv.log_text().splitlines()
    head = re.compile(rf"\[WARNING\] leak report: worker pid {pid} \(slot 0, generation 1, "
                      rf"\d+ requests, lived \d+s\): grew")
    start = next((i for i, line in enumerate(lines) if head.search(line)), None)
    assert start is not None, f"no WARNING block for pid {pid} in the log"
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def test_types_report_names_the_leaking_class(ipserve, testbed):
    srv, worker, report = leak_and_retire(ipserve, testbed, LEAKY, "types")
    assert report["significant"] is True, report
    leak = next((g for g in report["growth"] if g["what"] == "leaky.LeakyThing"), None)
    assert leak is not None, report
    # One kept per request: within a factor of 2 of the requests it served.
    assert report["requests"] / 2 <= leak["count"] <= report["requests"] * 2, report
    assert leak["size"] > 0, report
    assert report["growth"][0] == leak, report              # the most grown
    block = warning_block(srv, worker["pid"])
    assert re.search(r"^  leaky\.LeakyThing +\+\d+ objects +\+[\d.]+KiB$", block[1]), block
    # ipservectl leaks shows it, marked significant.
    text = srv.ctl("leaks").stdout
    row = next(line for line in text.splitlines() if f" {worker['pid']} " in line)
    assert row.startswith("!") and "leaky.LeakyThing" in row and "types" in row, text
    assert json.loads(srv.ctl("leaks", "--json").stdout) == srv.status()["leak_reports"]


def test_tracemalloc_report_names_the_leaking_line(ipserve, testbed):
    srv, worker, report = leak_and_retire(ipserve, testbed, LEAKY, "tracemalloc")
    assert report["significant"] is True, report
    sites = {g["what"]: g for g in report["growth"]}
    leak = sites.get(f"apps/leaky.py:{marked_line(LEAKY, '# LEAK')}")
    payload = sites.get(f"apps/leaky.py:{marked_line(LEAKY, '# PAYLOAD')}")
    assert leak is not None and payload is not None, report
    # At least one block per request on each line; the payload's 512 bytes each.
    assert leak["count"] >= report["requests"] and payload["count"] >= report["requests"], report
    assert payload["size"] >= 512 * report["requests"], report
    assert not any(w.startswith(("tracemalloc", "<frozen")) or "/tracemalloc.py" in w
                   for w in sites), report
    block = warning_block(srv, worker["pid"])
    assert any(re.search(r"^  apps/leaky\.py:\d+ +\+\d+ blocks +\+[\d.]+[KM]iB$", line)
               for line in block[1:]), block


@pytest.mark.parametrize("mode", ["types", "tracemalloc"])
def test_clean_app_report_is_not_significant(ipserve, testbed, mode):
    srv, worker, report = leak_and_retire(ipserve, testbed, CLEAN, mode)
    assert report["significant"] is False, report
    assert not any("CleanThing" in g["what"] or "clean.py" in g["what"]
                   for g in report["growth"]), report
    srv.wait_log(rf"\[INFO\] leak report: worker pid {worker['pid']} \(slot 0, generation 1, "
                 rf"\d+ requests, lived \d+s\): no significant growth \({mode}\)")
    assert "[WARNING] leak report" not in srv.log_text()
    row = next(line for line in srv.ctl("leaks").stdout.splitlines()
               if f" {worker['pid']} " in line)
    assert not row.startswith("!"), row


def test_off_sends_no_report(ipserve, testbed):
    srv, worker = serve(ipserve, LEAKY, "off")
    client = serve_requests(testbed, 200)
    retire(srv, client)
    srv.wait_workers_gone(30, pids=[worker["pid"]])
    srv.wait_for(lambda st: all(w["pid"] != worker["pid"] for w in st["workers"]),
                 what=f"worker pid {worker['pid']} gone from status")
    srv.wait_log(r"retired: last connection closed after 200 request\(s\)")
    assert srv.status()["leak_reports"] == []
    assert srv.ctl("leaks").stdout.strip() == "no leak reports yet"
    assert "leak census" not in srv.log_text()          # off costs nothing: no census at all
    assert "leak report:" not in srv.log_text()


def test_a_worker_whose_connections_are_cut_sends_no_report(ipserve, testbed):
    """kill-retired ends a retiring worker's connections: what it held is no
    leak, and it sends no report (only a retirement that drained does)."""
    srv, worker = serve(ipserve, LEAKY, "types")
    client = serve_requests(testbed, 200)
    srv.send_signal(signal.SIGHUP)
    srv.wait_ready(1, generation=2)
    try:
        srv.ctl("kill-retired")
        srv.wait_workers_gone(30, pids=[worker["pid"]])
    finally:
        client.close()
    srv.wait_for(lambda st: all(w["pid"] != worker["pid"] for w in st["workers"]),
                 what=f"worker pid {worker['pid']} gone from status")
    assert srv.status()["leak_reports"] == []
    log = srv.log_text()
    assert "baseline census" in log and "final census" not in log and "leak report:" not in log
