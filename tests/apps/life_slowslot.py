"""Probe app whose slot-2 worker does not finish importing until a gate file exists.

The gate is the file named by $LIFE_GATE (waited for at most 60 s, then the
import goes on). Other slots, and the master's start-up check, import at once.
Every route is the probe app's.
"""

import os
import time

import ipserve

from probe import application  # noqa: F401

_me = ipserve.current_worker
if _me is not None and _me["slot"] == 2:
    _end = time.monotonic() + 60
    while not os.path.exists(os.environ["LIFE_GATE"]) and time.monotonic() < _end:
        time.sleep(0.05)
