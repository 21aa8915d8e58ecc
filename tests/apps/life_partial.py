"""Probe app whose slot-1 worker fails to import while a marker file exists.

The marker is the file named by $LIFE_MARKER. Outside a worker (the master's
start-up check) ipserve.current_worker is None and the import always works.
Every route is the probe app's (tests/apps/probe.py).
"""

import os

import ipserve

from probe import application  # noqa: F401  (same directory: on sys.path)

_me = ipserve.current_worker
if _me is not None and _me["slot"] == 1 and os.path.exists(os.environ["LIFE_MARKER"]):
    raise RuntimeError(f"life_partial refuses to boot slot {_me['slot']} "
                       f"generation {_me['generation']}")
