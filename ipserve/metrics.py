"""The Prometheus exposition of a status document (`Master.status()`).

`render(status)` is a pure function of the document the admin endpoint was
last handed: the text comes from prometheus_client (a collector in a private
registry, then generate_latest), so escaping, HELP/TYPE lines and histogram
buckets are the reference library's. A document without some sections (a
master of an older version, met across a takeover) gives fewer series, never
an exception: every value is read defensively.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, exposition, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from ipserve.histogram import RESPONSE_CLASSES
from ipserve.master.registry import ExitReason, WorkerState

# What generate_latest() writes by default is the 0.0.4 text format (newer
# prometheus_client versions advertise 1.0.0 as "latest", a superset).
CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

WORKER_LABELS = ("slot", "generation", "pid")


def render(status: dict) -> bytes:
    """The /metrics body for `status`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status if isinstance(status, dict) else {}))
    return generate_latest(registry)


class StatusCollector:
    """A one-shot collector: the families of one status document."""

    def __init__(self, status: dict):
        self.status = status

    def collect(self) -> Iterator[Metric]:
        st = self.status
        workers = [w for w in as_list(st.get("workers")) if isinstance(w, dict)]
        yield from master_info(st)
        yield from worker_gauges(workers)
        yield worker_states(workers)
        if isinstance(st.get("counters"), dict):    # not from a master older than them
            yield from counters(st["counters"])
        yield from memory(as_dict(st.get("memory")))


# ---------------------------------------------------------------- families

def master_info(st: dict) -> Iterator[Metric]:
    master = as_dict(st.get("master"))
    if not master:
        return
    info = InfoMetricFamily("ipserve_master", "The master: its name, router and generation.")
    info.add_metric([], {"name": str(st.get("name", "")), "router": str(st.get("router", "")),
                         "generation": label(master.get("generation"))})
    yield info


def worker_gauges(workers: list[dict]) -> Iterator[Metric]:
    families = (
        ("ipserve_worker_rss_bytes", "Resident memory of each live worker.", "rss", 1.0),
        ("ipserve_worker_connections", "Connections each live worker holds.", "connections", 1.0),
        ("ipserve_worker_websockets", "WebSockets each live worker holds.", "websockets", 1.0),
        ("ipserve_worker_hub_lag_seconds", "Hub lag of each live worker.", "lag_ms", 0.001),
    )
    for name, doc, key, scale in families:
        family = GaugeMetricFamily(name, doc, labels=WORKER_LABELS)
        for w in workers:
            value = number(w.get(key))
            if value is not None:
                family.add_metric(worker_labels(w), value * scale)
        yield family
    requests = CounterMetricFamily("ipserve_requests_total", "Requests each live worker has "
                                   "served since it started.", labels=WORKER_LABELS)
    for w in workers:
        value = number(w.get("requests"))
        if value is not None:
            requests.add_metric(worker_labels(w), value)
    yield requests


def worker_states(workers: list[dict]) -> Metric:
    family = GaugeMetricFamily("ipserve_workers", "Workers by state.", labels=("state",))
    by_state = {state.value: 0 for state in WorkerState}
    for w in workers:
        if w.get("state") in by_state:
            by_state[w["state"]] += 1
    for state, n in by_state.items():
        family.add_metric([state], n)
    return family


def counters(c: dict) -> Iterator[Metric]:
    """The cluster's all-time counters (they include workers that exited)."""
    responses = CounterMetricFamily("ipserve_responses_total", "Responses sent by every worker, "
                                    "by status class.", labels=("code",))
    got = as_dict(c.get("responses"))
    for code in RESPONSE_CLASSES:
        responses.add_metric([code], number(got.get(code)) or 0)
    yield responses
    yield histogram("ipserve_request_duration_seconds", "Duration of plain HTTP requests "
                    "(WebSockets excluded).",
                    as_dict(c.get("duration")))
    shed = CounterMetricFamily("ipserve_shed_total", "Requests answered 503 because their "
                               "worker was too busy (shed_load).")
    shed.add_metric([], number(c.get("shed")) or 0)
    yield shed
    exits = CounterMetricFamily("ipserve_worker_exits_total", "Workers that exited, by reason.",
                                labels=("reason",))
    got = as_dict(c.get("worker_exits"))
    for reason in ExitReason:
        exits.add_metric([reason.value], number(got.get(reason.value)) or 0)
    yield exits
    reloads = CounterMetricFamily("ipserve_reloads_total", "Deploys of a new generation (HUP, "
                                  "TTIN/TTOU, takeover): ok when every slot switched, failed "
                                  "when rolled back.",
                                  labels=("outcome",))
    got = as_dict(c.get("reloads"))
    for outcome in ("ok", "failed"):
        reloads.add_metric([outcome], number(got.get(outcome)) or 0)
    yield reloads
    yield histogram("ipserve_reload_duration_seconds", "Duration of the deploys that switched "
                    "every slot.",
                    as_dict(c.get("reload_duration")))


def memory(m: dict) -> Iterator[Metric]:
    rss = number(m.get("cluster_rss"))
    if rss is not None:
        family = GaugeMetricFamily("ipserve_cluster_memory_bytes", "Resident memory of every "
                                   "worker together.")
        family.add_metric([], rss)
        yield family
    limit = number(m.get("cluster_limit"))
    if limit is None:
        return
    family = GaugeMetricFamily("ipserve_cluster_memory_limit_bytes", "cluster_memory: the "
                               "workers' resident memory may not exceed it.")
    family.add_metric([], limit)
    yield family
    marks = GaugeMetricFamily("ipserve_cluster_memory_watermark_bytes", "Above retire, retiring "
                              "workers are asked to exit; above kill, they are killed.",
                              labels=("level",))
    for level, key, share in (("retire", "retire_at", 0.80), ("kill", "kill_at", 0.95)):
        value = number(m.get(key))
        marks.add_metric([level], value if value is not None else limit * share)
    yield marks


def histogram(name: str, doc: str, h: dict) -> Metric:
    """A Prometheus histogram from {bounds, counts (per bucket, not
    cumulative, the last one +Inf), sum}; no samples if they do not match."""
    family = HistogramMetricFamily(name, doc)
    bounds = [number(b) for b in as_list(h.get("bounds"))]
    counts = [number(n) for n in as_list(h.get("counts"))]
    if (not bounds or None in bounds or None in counts or len(counts) != len(bounds) + 1
            or bounds != sorted(bounds)):
        return family
    buckets, total = [], 0.0
    for bound, n in zip(bounds + [math.inf], counts):
        total += n
        buckets.append((floatToGoString(bound), total))
    family.add_metric([], buckets, number(h.get("sum")) or 0.0)
    return family


# ---------------------------------------------------------------- reading defensively

def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def number(value: Any) -> float | None:
    """A finite int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def label(value: Any) -> str:
    return "" if value is None else str(value)


def worker_labels(w: dict) -> list[str]:
    return [label(w.get(key)) for key in WORKER_LABELS]
