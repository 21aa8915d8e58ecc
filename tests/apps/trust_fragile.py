"""WSGI app for tests/e2e/test_trust.py: a deploy that cannot boot.

While the file named by $TRUST_FRAGILE_BROKEN exists, importing this module
sleeps 2 seconds, then raises (a broken deploy that takes a while to fail).
Otherwise it serves GET / like the probe app: JSON {"pid", "remote_addr", "worker"}.
Standard library only (wsgi_validate.py, beside it, when there: requests
run under wsgiref.validate either way).
"""

import json
import os
import time

try:
    from wsgi_validate import validated          # tests/apps/ is on sys.path
except ModuleNotFoundError:                      # a copy elsewhere (no WebSocket routes here)
    from wsgiref.validate import validator as validated

_BROKEN = os.environ.get("TRUST_FRAGILE_BROKEN")
if _BROKEN and os.path.exists(_BROKEN):
    time.sleep(2)
    raise RuntimeError(f"this deploy is broken ({_BROKEN} exists)")


def _application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "remote_addr": environ.get("REMOTE_ADDR"),
                       "worker": environ.get("ipserve.worker")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
