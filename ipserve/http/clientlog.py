"""Client errors in the error log, at most one line per kind per interval.

A hostile client can make a thousand bad requests a second; the log gets the
first of each kind, then a count."""

from __future__ import annotations

import logging

INTERVAL = 10.0


class ClientErrorLog:
    def __init__(self, log: logging.Logger, clock, interval: float = INTERVAL):
        self.log = log
        self.clock = clock
        self.interval = interval
        self.windows: dict[str, list] = {}   # kind -> [window end, suppressed count]

    def note(self, kind: str, client: str, detail: str = "") -> None:
        now = self.clock()
        window = self.windows.get(kind)
        if window is not None and now < window[0]:
            window[1] += 1
            return
        if window is not None and window[1]:
            self._summary(kind, window[1])
        self.windows[kind] = [now + self.interval, 0]
        self.log.info("client error (%s) from %s%s", kind, client, f": {detail}" if detail else "")

    def flush(self) -> None:
        """Report the counts of windows that have ended (called periodically)."""
        now = self.clock()
        for kind, window in list(self.windows.items()):
            if now >= window[0]:
                if window[1]:
                    self._summary(kind, window[1])
                del self.windows[kind]

    def _summary(self, kind: str, count: int) -> None:
        self.log.info("client error (%s): %d more in the last %gs", kind, count, self.interval)
