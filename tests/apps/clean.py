"""The leaky app's twin that keeps nothing (the leak-report tests).

Every plain request makes a `CleanThing` just like leaky.py's LeakyThing, uses
it for the answer and lets it go: a worker that served N requests exits with
what it booted with, and its leak report must find nothing significant and
never name CleanThing.

Routes:
  /ws         WebSocket echo
  anything    JSON {"pid", "serial"}

Plain requests run under wsgiref.validate (tests/apps/wsgi_validate.py).
"""

from __future__ import annotations

import itertools
import json
import os

try:
    from wsgi_validate import validated  # tests/apps/ is on sys.path
except ModuleNotFoundError:  # imported as tests.apps.clean
    from tests.apps.wsgi_validate import validated


class CleanThing:
    """Made for one request and dropped with it."""

    def __init__(self, serial: int):
        self.serial = serial
        self.payload = bytearray(512)


SERIALS = itertools.count()


def _application(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is not None:
        while True:
            message = ws.receive()
            if message is None:          # closed by the peer
                return []
            ws.send(message)
    thing = CleanThing(next(SERIALS))
    body = json.dumps({"pid": os.getpid(), "serial": thing.serial}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
