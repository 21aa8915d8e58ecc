"""Histograms and the cluster's all-time counters (pure bookkeeping)."""

from dataclasses import dataclass, field

from ipserve.histogram import REQUEST_BOUNDS, Histogram, response_class
from ipserve.master.counters import ClusterCounters
from ipserve.master.registry import ExitReason
from ipserve.master.reload import Outcome


def test_observe_puts_a_value_in_the_first_bucket_not_below_it():
    h = Histogram((0.1, 1.0))
    for value in (0.0, 0.1, 0.10001, 1.0, 5.0):
        h.observe(value)
    assert h.counts == [2, 2, 1]          # <=0.1, <=1, +Inf
    assert abs(h.total - 6.20001) < 1e-9
    assert h.as_status() == {"bounds": [0.1, 1.0], "counts": [2, 2, 1], "sum": 6.20001, "count": 5}


def test_add_ignores_counts_of_other_bounds():
    h = Histogram((0.1, 1.0))
    h.add([1, 2, 3], 4.0)
    h.add([1, 2], 9.0)                    # another version's bounds: not mixed in
    assert h.counts == [1, 2, 3] and h.total == 4.0


def test_response_class():
    assert [response_class(s) for s in ("101 Switching", "200 OK", "304 x", "404", "503 y")] == \
        [0, 1, 2, 3, 4]
    assert response_class(None) is None and response_class("") is None
    assert response_class("600 nope") is None and response_class("x") is None


@dataclass
class W:
    requests: int = 0
    shed: int = 0
    responses: tuple = ()
    durations: tuple = ()
    duration_sum: float = 0.0


@dataclass
class R:
    outcome: Outcome
    seconds: float | None = None
    error: str | None = None
    successors: dict = field(default_factory=dict)


def counts(n_at: dict[int, int]) -> tuple:
    c = [0] * (len(REQUEST_BOUNDS) + 1)
    for i, n in n_at.items():
        c[i] = n
    return tuple(c)


def test_cluster_counters_never_go_down_when_a_worker_exits():
    c = ClusterCounters()
    a = W(requests=10, shed=1, responses=(0, 9, 0, 1, 0), durations=counts({0: 10}), duration_sum=0.01)
    b = W(requests=5, responses=(1, 4, 0, 0, 0), durations=counts({3: 4}), duration_sum=0.04)
    before = c.as_status([a, b])
    assert before["requests"] == 15 and before["shed"] == 1
    assert before["responses"] == {"1xx": 1, "2xx": 13, "3xx": 0, "4xx": 1, "5xx": 0}
    assert before["duration"]["count"] == 14
    c.worker_exited(a, ExitReason.RETIRED)
    after = c.as_status([b])
    assert {k: after[k] for k in ("requests", "responses", "duration", "shed")} == \
        {k: before[k] for k in ("requests", "responses", "duration", "shed")}
    assert after["worker_exits"] == {"retired": 1, "memory": 0, "busy": 0, "max_requests": 0,
                                     "hung": 0, "crashed": 0}


def test_an_older_worker_without_counts_adds_only_what_it_has():
    c = ClusterCounters()
    old = W(requests=7)
    c.worker_exited(old, ExitReason.CRASHED)
    status = c.as_status([W(requests=1)])
    assert status["requests"] == 8 and status["duration"]["count"] == 0
    assert status["worker_exits"]["crashed"] == 1


def test_reloads_count_outcomes_and_time_the_ones_that_switched():
    c = ClusterCounters()
    c.reload_finished(R(Outcome.DONE, seconds=0.4))
    c.reload_finished(R(Outcome.DONE, seconds=3.0))
    c.reload_finished(R(Outcome.FAILED, seconds=30.0, error="boot_timeout"))
    status = c.as_status([])
    assert status["reloads"] == {"ok": 2, "failed": 1}
    assert status["reload_duration"]["count"] == 2 and status["reload_duration"]["sum"] == 3.4
