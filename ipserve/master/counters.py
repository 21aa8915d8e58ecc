"""The cluster's all-time counters, for /metrics and status.

A worker reports what it has counted since it started; when it exits, its
last report moves into `gone`, so a cluster counter never goes down when a
worker is replaced (only when the master itself restarts, which Prometheus
reads as a counter reset).
"""

from __future__ import annotations

from ipserve.histogram import RELOAD_BOUNDS, REQUEST_BOUNDS, RESPONSE_CLASSES, Histogram
from ipserve.master.registry import ExitReason, WorkerRecord
from ipserve.master.reload import Outcome


class ClusterCounters:
    def __init__(self) -> None:
        self.gone_requests = 0
        self.gone_shed = 0
        self.gone_responses = [0] * len(RESPONSE_CLASSES)
        self.gone_durations = Histogram(REQUEST_BOUNDS)
        self.exits = {reason: 0 for reason in ExitReason}
        self.reloads = {"ok": 0, "failed": 0}
        self.reload_durations = Histogram(RELOAD_BOUNDS)    # of the reloads that switched

    def worker_exited(self, record: WorkerRecord, reason: ExitReason) -> None:
        self.exits[reason] += 1
        self.gone_requests += record.requests
        self.gone_shed += record.shed
        add(self.gone_responses, record.responses)
        self.gone_durations.add(list(record.durations), record.duration_sum)

    def reload_finished(self, reload) -> None:
        """A deploy (HUP, TTIN/TTOU, ipservectl reload) switched or failed."""
        if reload.outcome is Outcome.DONE:
            self.reloads["ok"] += 1
            self.reload_durations.observe(reload.seconds or 0.0)
        else:
            self.reloads["failed"] += 1

    def as_status(self, workers: list[WorkerRecord]) -> dict:
        responses = list(self.gone_responses)
        durations = self.gone_durations.copy()
        for record in workers:
            add(responses, record.responses)
            durations.add(list(record.durations), record.duration_sum)
        return {
            "requests": self.gone_requests + sum(w.requests for w in workers),
            "responses": dict(zip(RESPONSE_CLASSES, responses)),
            "duration": durations.as_status(),
            "shed": self.gone_shed + sum(w.shed for w in workers),
            "worker_exits": {reason.value: n for reason, n in self.exits.items()},
            "reloads": dict(self.reloads),
            "reload_duration": self.reload_durations.as_status(),
        }


def add(into: list[int], counts) -> None:
    if len(counts) == len(into):
        for i, n in enumerate(counts):
            into[i] += n
