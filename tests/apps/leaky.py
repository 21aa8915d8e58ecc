"""A WSGI app that leaks on purpose (the leak-report and dashboard tests).

Every plain request keeps one more `LeakyThing` in a module-level list for the
life of the worker, so a worker that served N requests exits with N more
LeakyThing instances than it booted with: what a leak report must name
("leaky.LeakyThing" with leak_report = types; with tracemalloc, this file's
line that makes one, marked LEAK below, and the line of its payload).

Routes:
  /ws         WebSocket echo; tests hold one open to keep a retiring worker draining
  anything    JSON {"pid", "kept"}; keeps one more LeakyThing

Plain requests run under wsgiref.validate (tests/apps/wsgi_validate.py).
"""

from __future__ import annotations

import json
import os

try:
    from wsgi_validate import validated  # tests/apps/ is on sys.path
except ModuleNotFoundError:  # imported as tests.apps.leaky
    from tests.apps.wsgi_validate import validated


class LeakyThing:
    """What leaks: one per request, with a little payload of its own."""

    def __init__(self, serial: int):
        self.serial = serial
        self.payload = bytearray(512)   # PAYLOAD


KEPT: list[LeakyThing] = []


def _application(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is not None:
        while True:
            message = ws.receive()
            if message is None:          # closed by the peer
                return []
            ws.send(message)
    KEPT.append(LeakyThing(len(KEPT)))   # LEAK
    body = json.dumps({"pid": os.getpid(), "kept": len(KEPT)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
