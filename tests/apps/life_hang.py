"""Probe app whose slot-1 worker hangs in its import while a marker file exists.

The marker is the file named by $LIFE_MARKER. The hang is a plain sleep loop
(bounded to 10 minutes so nothing can outlive a test run by much); the master's
boot_timeout is what ends it. Every route is the probe app's.
"""

import os
import time

import ipserve

from probe import application  # noqa: F401

_me = ipserve.current_worker
if _me is not None and _me["slot"] == 1 and os.path.exists(os.environ["LIFE_MARKER"]):
    _end = time.monotonic() + 600
    while time.monotonic() < _end:
        time.sleep(0.5)
