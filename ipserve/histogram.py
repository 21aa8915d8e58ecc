"""Fixed-bucket histograms that workers keep and the master adds up.

A worker counts each plain request's duration into the bucket of the first
bound it does not exceed (the last bucket is +Inf), and sends the counts, not
cumulative, in its heartbeat. The master adds the counts of every worker
(live ones, and the last counts of those that exited) into one cluster
histogram; /metrics turns that into Prometheus' cumulative buckets. Counting
is one bisect and two additions per request.
"""

from __future__ import annotations

import bisect
import dataclasses

# Seconds. Long-poll requests last tens of seconds: the upper bounds reach 5 min.
REQUEST_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                  10.0, 30.0, 60.0, 300.0)
RELOAD_BOUNDS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclasses.dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)   # len(bounds) + 1
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, counts: list[int], total: float) -> None:
        """Add another histogram's counts (same bounds; others are ignored)."""
        if len(counts) == len(self.counts):
            for i, n in enumerate(counts):
                self.counts[i] += n
            self.total += total

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)

    def as_status(self) -> dict:
        return {"bounds": list(self.bounds), "counts": list(self.counts),
                "sum": round(self.total, 6), "count": sum(self.counts)}


# Index of a status class in a worker's response counts: "1xx" .. "5xx".
RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


def response_class(status: str | None) -> int | None:
    """0..4 for a status line such as "200 OK"; None if there is none."""
    if not status or not "1" <= status[0] <= "5":
        return None
    return ord(status[0]) - ord("1")
