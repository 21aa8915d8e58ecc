"""ipserve.metrics.render: the /metrics text of a status document, read
back with prometheus_client's own parser."""

from __future__ import annotations

import copy
import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipserve import metrics

REQUEST_BOUNDS = [0.005, 0.05, 0.5, 5.0, 300.0]
RELOAD_BOUNDS = [0.5, 1.0, 5.0]


def worker(pid: int, slot: int, generation: int, state: str = "active", **extra) -> dict:
    w = {"pid": pid, "slot": slot, "generation": generation, "serial": pid - 100, "port": 40000 + slot,
         "state": state, "rss": 50_000_000 + pid, "connections": 3 + slot, "requests": 1000 + pid,
         "websockets": slot, "lag_ms": 1.5 + slot, "too_busy": False, "nice": 0, "adopted": False,
         "replacing": None, "connected": True, "boot_error": None, "age_s": 12.5,
         "retired_for_s": None, "requests_per_s": 4.25, "connections_at_retire": None,
         "responses": {"1xx": 0, "2xx": 900, "3xx": 10, "4xx": 5, "5xx": 1}}
    w.update(extra)
    return w


def full_status() -> dict:
    """A status document as the lead's spec (issue10-spec.md) describes it."""
    return {
        "time": 1_700_000_000.5, "name": "web", "router": "nft",
        "routing": {"kind": "nft", "sockets": {}}, "bind": ["0.0.0.0:8000"], "app": "app:application",
        "master": {"pid": 99, "generation": 3, "uptime_s": 60.0, "stopping": None, "serving": True,
                   "adopting": False},
        "reload": None, "replacements": [], "slots": 2, "slot_table": [], "routes": {"0": 40000},
        "route_error": None,
        "workers": [worker(101, 0, 2, "retiring", retired_for_s=4.0, connections_at_retire=9),
                    worker(102, 0, 3), worker(103, 1, 3), worker(104, 1, 4, "booting", lag_ms=None)],
        "memory": {"cluster_rss": 200_000_410, "cluster_limit": 1_000_000_000,
                   "retire_at": 800_000_000, "kill_at": 950_000_000, "worker_limit": None},
        "reloads": [{"generation": 3, "reason": "reload", "state": "done", "started": 1.0,
                     "seconds": 0.7, "error": None, "failed_pid": None}],
        "counters": {
            "requests": 9999,
            "responses": {"1xx": 1, "2xx": 9000, "3xx": 20, "4xx": 30, "5xx": 4},
            "duration": {"bounds": REQUEST_BOUNDS, "counts": [100, 50, 25, 5, 1, 2],
                         "sum": 123.25, "count": 183},
            "shed": 7,
            "worker_exits": {"retired": 5, "memory": 1, "busy": 0, "max_requests": 2, "hung": 1,
                             "crashed": 3},
            "reloads": {"ok": 2, "failed": 1},
            "reload_duration": {"bounds": RELOAD_BOUNDS, "counts": [0, 1, 1, 0], "sum": 2.5,
                                "count": 2},
        },
        "leak_reports": [],
    }


def parse(status: dict) -> dict:
    """name -> family, from render(status) through prometheus_client's parser."""
    text = metrics.render(status).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(family, suffix: str = "") -> dict:
    """{frozenset of labels: value} of the family's samples named name+suffix."""
    return {frozenset(s.labels.items()): s.value for s in family.samples
            if s.name == family.name + suffix}


def by_pid(family, suffix: str = "") -> dict[str, float]:
    return {s.labels["pid"]: s.value for s in family.samples if s.name == family.name + suffix}


def test_every_family_has_help_and_a_type():
    families = parse(full_status())
    assert families, "nothing rendered"
    for family in families.values():
        assert family.documentation.strip(), family.name
        assert family.type in ("gauge", "counter", "histogram"), (family.name, family.type)


def test_per_worker_gauges_have_one_series_per_live_worker():
    st = full_status()
    families = parse(st)
    pids = {str(w["pid"]) for w in st["workers"]}
    for name, key, scale in (("ipserve_worker_rss_bytes", "rss", 1),
                             ("ipserve_worker_connections", "connections", 1),
                             ("ipserve_worker_websockets", "websockets", 1),
                             ("ipserve_worker_hub_lag_seconds", "lag_ms", 0.001)):
        family = families[name]
        assert family.type == "gauge"
        expected = {str(w["pid"]): w[key] * scale for w in st["workers"] if w[key] is not None}
        assert by_pid(family) == pytest.approx(expected), name
        for s in family.samples:
            w = next(w for w in st["workers"] if str(w["pid"]) == s.labels["pid"])
            assert s.labels == {"slot": str(w["slot"]), "generation": str(w["generation"]),
                                "pid": str(w["pid"])}
    # A worker without a lag measure yet has no lag series, and the others still do.
    assert set(by_pid(families["ipserve_worker_hub_lag_seconds"])) == pids - {"104"}


def test_requests_total_is_a_counter_per_worker():
    st = full_status()
    family = parse(st)["ipserve_requests"]
    assert family.type == "counter"
    assert by_pid(family, "_total") == {str(w["pid"]): w["requests"] for w in st["workers"]}


def test_cluster_counters():
    families = parse(full_status())
    responses = families["ipserve_responses"]
    assert responses.type == "counter"
    assert {s.labels["code"]: s.value for s in responses.samples} == {
        "1xx": 1, "2xx": 9000, "3xx": 20, "4xx": 30, "5xx": 4}
    assert samples(families["ipserve_shed"], "_total") == {frozenset(): 7}
    exits = families["ipserve_worker_exits"]
    assert {s.labels["reason"]: s.value for s in exits.samples} == {
        "retired": 5, "memory": 1, "busy": 0, "max_requests": 2, "hung": 1, "crashed": 3}
    reloads = families["ipserve_reloads"]
    assert {s.labels["outcome"]: s.value for s in reloads.samples} == {"ok": 2, "failed": 1}


def histogram_of(family) -> tuple[list[tuple[float, float]], float, float]:
    buckets = [(float(s.labels["le"]), s.value) for s in family.samples
               if s.name == family.name + "_bucket"]
    (count,) = [s.value for s in family.samples if s.name == family.name + "_count"]
    (total,) = [s.value for s in family.samples if s.name == family.name + "_sum"]
    return buckets, count, total


@pytest.mark.parametrize("name,key", [("ipserve_request_duration_seconds", "duration"),
                                      ("ipserve_reload_duration_seconds", "reload_duration")])
def test_histograms_are_cumulative_and_inf_is_the_count(name, key):
    h = full_status()["counters"][key]
    family = parse(full_status())[name]
    assert family.type == "histogram"
    buckets, count, total = histogram_of(family)
    assert [le for le, _ in buckets] == h["bounds"] + [math.inf]
    running, expected = 0, []
    for n in h["counts"]:
        running += n
        expected.append(running)
    assert [value for _, value in buckets] == expected
    assert buckets[-1][1] == count == sum(h["counts"]) == h["count"]
    assert total == h["sum"]


def test_workers_by_state_include_zeros():
    family = parse(full_status())["ipserve_workers"]
    assert {s.labels["state"]: s.value for s in family.samples} == {
        "booting": 1, "ready": 0, "active": 2, "retiring": 1, "hung": 0, "killed": 0}


def test_memory_with_a_cluster_limit():
    families = parse(full_status())
    assert samples(families["ipserve_cluster_memory_bytes"]) == {frozenset(): 200_000_410}
    assert samples(families["ipserve_cluster_memory_limit_bytes"]) == {frozenset(): 1e9}
    marks = families["ipserve_cluster_memory_watermark_bytes"]
    assert {s.labels["level"]: s.value for s in marks.samples} == {"retire": 8e8, "kill": 9.5e8}


def test_memory_without_a_cluster_limit_has_no_limit_or_watermarks():
    st = full_status()
    st["memory"].update(cluster_limit=None, retire_at=None, kill_at=None)
    families = parse(st)
    assert "ipserve_cluster_memory_bytes" in families
    assert "ipserve_cluster_memory_limit_bytes" not in families
    assert "ipserve_cluster_memory_watermark_bytes" not in families


def test_master_info():
    family = parse(full_status())["ipserve_master_info"]
    assert [(s.labels, s.value) for s in family.samples] == [
        ({"name": "web", "router": "nft", "generation": "3"}, 1.0)]


def test_a_status_without_the_new_sections_still_renders():
    """A master older than counters/memory: per-worker series and states, no counters."""
    st = full_status()
    for key in ("time", "memory", "reloads", "counters", "leak_reports"):
        del st[key]
    for w in st["workers"]:
        for key in ("requests_per_s", "connections_at_retire", "responses"):
            del w[key]
    families = parse(st)
    assert len(by_pid(families["ipserve_worker_rss_bytes"])) == 4
    assert sum(s.value for s in families["ipserve_workers"].samples) == 4
    for name in ("ipserve_responses", "ipserve_cluster_memory_bytes", "ipserve_worker_exits"):
        assert name not in families
    for family in families.values():
        assert family.documentation.strip()


@pytest.mark.parametrize("mangle", [
    lambda st: st.clear(),
    lambda st: st.update(workers="nope", counters=[], memory=5, master=None),
    lambda st: st["workers"].append("not a worker"),
    lambda st: st["workers"][0].update(rss="big", lag_ms=float("nan"), pid=None, requests=True),
    lambda st: st["counters"]["duration"].update(counts=[1, 2]),           # wrong length
    lambda st: st["counters"]["duration"].update(bounds=[5.0, 1.0, 2.0, 3.0, 4.0]),   # unsorted
    lambda st: st["counters"].update(responses=None, worker_exits={"crashed": "x"}),
], ids=["empty", "wrong-types", "bad-worker", "bad-values", "short-counts", "unsorted-bounds",
        "bad-counters"])
def test_odd_documents_never_raise(mangle):
    st = copy.deepcopy(full_status())
    mangle(st)
    families = parse(st)
    for family in families.values():
        assert family.documentation.strip()


def test_a_mismatched_histogram_has_no_samples():
    st = full_status()
    st["counters"]["duration"]["counts"] = [1, 2]
    assert parse(st)["ipserve_request_duration_seconds"].samples == []


def test_content_type_is_the_text_format():
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=")
