"""Hub lag: how late a greenlet that asked to sleep a short interval wakes up.

Idle, the overshoot is a fraction of a millisecond; when a request hogs the
CPU without yielding, it is the whole time the hub was blocked.
"""

from __future__ import annotations

import time

import gevent


class HubLagMeter:
    def __init__(self, busy_lag_ms: float = 150.0, interval: float = 0.05, smoothing: float = 0.3):
        self.busy_lag_ms = busy_lag_ms
        self.interval = interval
        self.smoothing = smoothing
        self.smoothed_ms = 0.0
        self.peak_ms = 0.0       # largest lag since the last take_peak()
        self._greenlet = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            before = time.perf_counter()
            gevent.sleep(self.interval)
            lag_ms = max(0.0, (time.perf_counter() - before - self.interval) * 1000.0)
            self.smoothed_ms += self.smoothing * (lag_ms - self.smoothed_ms)
            self.peak_ms = max(self.peak_ms, lag_ms)

    def too_busy(self) -> bool:
        # busy_lag = 0 turns busy detection off.
        return self.busy_lag_ms > 0 and self.smoothed_ms > self.busy_lag_ms

    def shed_probability(self) -> float:
        """0 at busy_lag, 1 at twice busy_lag: shedding grows with the lag
        instead of switching on and off at a threshold (which makes load oscillate)."""
        if self.busy_lag_ms <= 0:
            return 0.0
        return min(1.0, max(0.0, (self.smoothed_ms - self.busy_lag_ms) / self.busy_lag_ms))

    def take_peak(self) -> float:
        """The worst lag since the previous call (what a heartbeat reports)."""
        peak, self.peak_ms = self.peak_ms, 0.0
        return max(peak, self.smoothed_ms)
