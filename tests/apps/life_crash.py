"""Probe app whose workers die at import (os._exit(1)) while a marker file exists.

The marker is the file named by $LIFE_MARKER; the master's start-up check
(no ipserve.current_worker) always imports. Every route is the probe app's.
"""

import os

import ipserve

from probe import application  # noqa: F401

if ipserve.current_worker is not None and os.path.exists(os.environ["LIFE_MARKER"]):
    os._exit(1)
