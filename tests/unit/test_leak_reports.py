"""Leak reports: the pure part (ipserve.leaks: diffing, ranking, thresholds,
significance, the message, the master's log block), the censuses themselves
(ipserve.worker.leakcheck, run in this process) and the master's handling of
a report (ipserve.master.leakreports, through the fake master)."""

from __future__ import annotations

import gc
import logging
import os
import tracemalloc

import pytest
from master_fakes import Peer, make_master, start

from ipserve import leaks, messages
from ipserve.leaks import (
    SEND_MIN_COUNT,
    SEND_MIN_SIZE,
    SEND_TOP,
    SIGNIFICANT_COUNT,
    SIGNIFICANT_SIZE,
    Census,
    Setting,
)
from ipserve.master import link
from ipserve.master.registry import WorkerState
from ipserve.messages import Growth, LeakMode
from ipserve.worker import leakcheck

T, M = LeakMode.TYPES, LeakMode.TRACEMALLOC


def census(**entries: tuple[int, int]) -> Census:
    return Census(counts={k: c for k, (c, _) in entries.items()},
                  sizes={k: s for k, (_, s) in entries.items()})


# ---------------------------------------------------------------- names

def test_type_names_carry_their_module_except_builtins():
    assert leaks.type_name("leaky", "LeakyThing") == "leaky.LeakyThing"
    assert leaks.type_name("builtins", "dict") == "dict"
    assert leaks.type_name(None, "weird") == "weird"
    assert leaks.type_name("a.b", "Outer.<locals>.Inner") == "a.b.Outer.<locals>.Inner"
    assert len(leaks.type_name("m" * 400, "C")) == leaks.WHAT_LIMIT


def test_sites_are_named_by_the_last_two_parts_of_their_path():
    assert leaks.site_name("/srv/repo/tests/apps/leaky.py", 36) == "apps/leaky.py:36"
    assert leaks.site_name("leaky.py", 7) == "leaky.py:7"
    assert leaks.site_name("<frozen abc>", 3) == "<frozen abc>:3"
    long = leaks.site_name("/x/" + "d" * 500 + "/f.py", 12345)
    assert len(long) == leaks.WHAT_LIMIT and long.endswith("/f.py:12345")


# ---------------------------------------------------------------- diff, rank

def test_diff_gives_every_change_both_ways_and_new_and_gone_entries():
    before = census(a=(10, 100), b=(5, 50), gone=(3, 30), same=(1, 8))
    after = census(a=(210, 2100), b=(1, 10), new=(7, 70), same=(1, 8))
    changes = {g.what: (g.count, g.size) for g in leaks.diff(before, after)}
    assert changes == {"a": (200, 2000), "b": (-4, -40), "gone": (-3, -30), "new": (7, 70)}


def test_rank_drops_noise_and_keeps_the_most_grown_first():
    changes = [Growth("few", SEND_MIN_COUNT - 1, SEND_MIN_SIZE - 1),
               Growth("many", SEND_MIN_COUNT, 10), Growth("more", 5000, 10),
               Growth("big", 0, SEND_MIN_SIZE), Growth("shrunk", -9000, -(1 << 30))]
    assert [g.what for g in leaks.rank(changes, T)] == ["more", "many", "big"]
    # Allocation sites rank by bytes.
    assert [g.what for g in leaks.rank(changes, M)] == ["big", "more", "many"]


def test_rank_keeps_at_most_send_top_and_is_deterministic_on_ties():
    changes = [Growth(f"t{i:02d}", 500, 1) for i in range(SEND_TOP + 10)]
    ranked = leaks.rank(list(reversed(changes)), T)
    assert [g.what for g in ranked] == [f"t{i:02d}" for i in range(SEND_TOP)]


@pytest.mark.parametrize("count, size, significant", [
    (SIGNIFICANT_COUNT - 1, SIGNIFICANT_SIZE - 1, False),
    (SIGNIFICANT_COUNT, 0, True),
    (0, SIGNIFICANT_SIZE, True),
    (-SIGNIFICANT_COUNT * 10, -SIGNIFICANT_SIZE * 10, False),
])
def test_significance_is_one_entry_over_a_count_or_a_size(count, size, significant):
    assert leaks.is_significant([Growth("x", 1, 1), Growth("y", count, size)]) is significant
    assert leaks.is_significant([]) is False


def test_noise_floor_is_below_significance():
    assert SEND_MIN_COUNT < SIGNIFICANT_COUNT and SEND_MIN_SIZE < SIGNIFICANT_SIZE


# ---------------------------------------------------------------- the message

def test_the_message_parses_as_a_leak_report():
    growth = [Growth("leaky.LeakyThing", 3000, 168000), Growth("x" * 400, 100, -5)]
    raw = leaks.report_message(T, 41.26, 3000, growth)
    assert raw["growth"][1]["what"] == "x" * leaks.WHAT_LIMIT
    parsed = messages.parse_from_worker(raw)
    assert parsed == messages.LeakReport(
        mode=T, lifetime_s=41.26, requests=3000, error=None,
        growth=(Growth("leaky.LeakyThing", 3000, 168000), Growth("x" * 300, 100, -5)))


def test_an_error_report_has_no_growth_and_a_bounded_error():
    raw = leaks.report_message(M, 1.0, 0, [], "e" * 5000)
    parsed = messages.parse_from_worker(raw)
    assert parsed.growth == () and parsed.error == "e" * leaks.ERROR_LIMIT


def test_setting_names_its_mode():
    assert Setting("types").mode is T and Setting("tracemalloc").mode is M
    assert Setting("off").mode is None


# ---------------------------------------------------------------- for people

def test_warning_block_is_a_head_line_then_one_aligned_line_per_entry():
    who = leaks.describe_worker(123, 1, 2, 2000, 41.4)
    assert who == "worker pid 123 (slot 1, generation 2, 2000 requests, lived 41s)"
    text = leaks.warning_block(who, T, [Growth("leaky.LeakyThing", 2000, 112000),
                                        Growth("dict", 150, 9000)])
    assert text.splitlines() == [
        f"leak report: {who}: grew (types)",
        "  leaky.LeakyThing  +2000 objects  +109.4KiB",
        "  dict               +150 objects    +8.8KiB",
    ]
    assert "+3 blocks" in leaks.warning_block(who, M, [Growth("a/b.py:1", 3, 2 << 20)])
    assert leaks.quiet_line(who, T).endswith("no significant growth (types)")
    assert leaks.error_line(who, M, "boom").endswith("no census (tracemalloc): boom")


# ---------------------------------------------------------------- the censuses

class CensusProbe:
    """A type only these tests make."""


def test_type_census_counts_what_was_made_in_between_and_not_itself():
    check = leakcheck.TypeCensus()
    check.baseline()
    assert not gc.is_tracked(check.before.counts) and not gc.is_tracked(check.before.sizes)
    kept = [CensusProbe() for _ in range(500)]
    growth = check.growth()
    name = f"{__name__}.CensusProbe"
    probe = next(g for g in growth if g.what == name)
    assert probe.count == 500 and probe.size >= 500 * 16
    # The baseline (thousands of entries) is not counted in the second census.
    assert [g.what for g in growth] == [name]
    del kept


def test_type_census_of_nothing_new_finds_nothing_above_the_noise():
    check = leakcheck.TypeCensus()
    check.baseline()
    assert check.growth() == []


@pytest.fixture
def tracing():
    was = tracemalloc.is_tracing()
    yield
    if not was:
        tracemalloc.stop()


def allocate(n: int) -> list:
    return [bytearray(1000) for _ in range(n)]   # ALLOCATE


def test_tracemalloc_sites_name_the_allocating_line(tracing):
    check = leakcheck.TracemallocSites()
    assert tracemalloc.is_tracing()
    check.baseline()
    kept = allocate(2000)
    growth = check.growth()
    with open(__file__) as f:
        line = next(i for i, text in enumerate(f, 1) if text.rstrip().endswith("# ALLOCATE"))
    site = next(g for g in growth if g.what == "unit/" + os.path.basename(__file__) + f":{line}")
    assert site.count >= 2000 and site.size >= 2000 * 1000
    assert growth[0] == site                          # the most bytes
    assert not any("tracemalloc.py" in g.what or "leakcheck.py" in g.what for g in growth)
    del kept


def test_a_failing_census_becomes_an_error_report_never_an_exception(tracing, caplog):
    class Broken(leakcheck.TypeCensus):
        def growth(self):
            raise MemoryError("no room for the census")

    check = leakcheck.LeakCheck(Broken(), logging.getLogger("test-leaks"))
    check.baseline()
    with caplog.at_level(logging.WARNING):
        raw = check.report(12.0, 7)
    assert raw["error"] == "final census failed: MemoryError: no room for the census"
    assert raw["growth"] == [] and raw["requests"] == 7 and raw["mode"] == "types"
    assert "the final census failed" in caplog.text


def test_a_failed_baseline_is_reported_at_the_end(tracing):
    check = leakcheck.start(Setting.TRACEMALLOC, logging.getLogger("test-leaks"))
    tracemalloc.stop()                                 # the application stopped it
    check.baseline()
    raw = check.report(1.0, 0)
    assert raw["error"].startswith("baseline census failed: RuntimeError: tracemalloc is not")


def test_off_is_no_check_at_all():
    assert leakcheck.start(Setting.OFF, logging.getLogger("test-leaks")) is None


# ---------------------------------------------------------------- the master

def report(**overrides) -> dict:
    return {"type": "leak-report", "mode": "types", "lifetime_s": 41.0, "requests": 3000,
            "growth": [{"what": "leaky.LeakyThing", "count": 3000, "size": 168000}],
            "error": None, **overrides}


def test_master_keeps_a_significant_report_with_its_own_record_and_warns(tmp_path, caplog):
    master = make_master(tmp_path, workers=2)
    start(master)
    worker = next(w for w in master.registry if w.slot == 1)
    worker.state = WorkerState.RETIRING       # a report comes from a retiring worker
    master.last_publish = master.clock()
    with caplog.at_level(logging.INFO):
        worker_conn_say(master, worker, report(slot=0, generation=99, pid=1))
    (kept,) = master.leak_reports
    assert {k: v for k, v in kept.items() if k != "at"} == {
        "pid": worker.pid, "slot": 1, "generation": 1, "mode": "types", "lifetime_s": 41.0,
        "requests": 3000, "significant": True, "error": None,
        "growth": [{"what": "leaky.LeakyThing", "count": 3000, "size": 168000}]}
    assert isinstance(kept["at"], float)
    assert master.last_publish == -1e9
    assert master.status()["leak_reports"] == [kept]
    (record,) = [r for r in caplog.records if "leak report" in r.getMessage()]
    assert record.levelno == logging.WARNING
    who = f"worker pid {worker.pid} (slot 1, generation 1, 3000 requests, lived 41s)"
    assert record.getMessage().splitlines() == [
        f"leak report: {who}: grew (types)",
        "  leaky.LeakyThing  +3000 objects  +164.1KiB"]


def test_master_logs_one_info_line_for_nothing_significant_or_warns_an_error(tmp_path, caplog):
    master = make_master(tmp_path, workers=1)
    start(master)
    (worker,) = master.registry
    worker.state = WorkerState.RETIRING
    with caplog.at_level(logging.INFO):
        worker_conn_say(master, worker, report(growth=[{"what": "dict", "count": 120,
                                                         "size": 5000}]))
        worker.leak_reported = False          # as if from a second worker
        worker_conn_say(master, worker, report(mode="tracemalloc", growth=[], error="boom"))
    assert [r["significant"] for r in master.leak_reports] == [False, False]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "leak report" in r.getMessage()]
    who = f"worker pid {worker.pid} (slot 0, generation 1, 3000 requests, lived 41s)"
    assert lines == [
        (logging.INFO, f"leak report: {who}: no significant growth (types)"),
        (logging.WARNING, f"leak report: {who}: no census (tracemalloc): boom")]


def test_a_leak_report_before_hello_or_malformed_closes_that_connection(tmp_path):
    master = make_master(tmp_path, workers=1)
    start(master)
    stranger = Peer(master, pid=999999)
    stranger.say(report())
    assert stranger.closed
    (worker,) = master.registry
    worker_conn_say(master, worker, report(growth=[{"what": "x", "count": 1.5, "size": 0}]))
    assert worker.conn is None and list(master.leak_reports) == []


def test_only_the_last_twenty_reports_are_kept(tmp_path):
    master = make_master(tmp_path, workers=1)
    start(master)
    (worker,) = master.registry
    worker.state = WorkerState.RETIRING
    for n in range(25):
        worker.leak_reported = False          # as if from 25 workers
        worker_conn_say(master, worker, report(requests=n))
    assert [r["requests"] for r in master.status()["leak_reports"]] == list(range(5, 25))


def worker_conn_say(master, worker, message: dict) -> None:
    link.on_messages(master, worker.conn, [message])
