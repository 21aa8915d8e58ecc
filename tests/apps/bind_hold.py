"""An app whose requests can be held open by the test (tests of graceful stops).

  /              JSON {"pid"}
  /hold?f=PATH   creates PATH.started, then waits (yielding to the hub) until
                 file PATH exists, at most 60 s; then JSON {"pid", "released": bool}

A test starts a /hold request, waits for PATH.started (the request is in the
application), does what it wants to the server meanwhile, then creates PATH
to let the request finish.
"""

import json
import os
from urllib.parse import parse_qs

import gevent

try:
    from wsgi_validate import validated          # tests/apps/ is on sys.path
except ModuleNotFoundError:                      # a copy elsewhere (no WebSocket routes here)
    from wsgiref.validate import validator as validated

LIMIT = 60.0


def _json(start_response, payload):
    body = json.dumps(payload).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def _application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/hold":
        flag = parse_qs(environ.get("QUERY_STRING", "")).get("f", [""])[0]
        if flag:
            with open(flag + ".started", "w"):
                pass
        waited = 0.0
        while flag and not os.path.exists(flag) and waited < LIMIT:
            gevent.sleep(0.05)
            waited += 0.05
        return _json(start_response, {"pid": os.getpid(), "released": os.path.exists(flag)})
    return _json(start_response, {"pid": os.getpid()})


application = validated(_application)
