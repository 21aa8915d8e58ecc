"""The app bench/idle_ws.py measures: idle WebSockets, idle keep-alive
connections and held long-polls, and a way to look inside a worker.

    GET /          a short plain response (for idle keep-alive connections)
    GET /ws        a WebSocket (environ["wsgi.websocket"], gevent-websocket's
                   API) that echoes every message; idle until the client speaks
    GET /poll      held until GET /release reaches the same worker (or for
                   IDLE_HOLD seconds, default 3600), then answers "released"
    GET /release   wakes every held /poll of this worker
    GET /stats     {"pid", "ws", "polls", "rss_kib"}; with ?gc=1 first runs
                   gc.collect() and malloc_trim(0), so RSS settles
"""

import ctypes
import ctypes.util
import gc
import json
import os

import gevent.event

HOLD = float(os.environ.get("IDLE_HOLD", "3600"))
counts = {"ws": 0, "polls": 0}
release = gevent.event.Event()

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _malloc_trim = _libc.malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def _rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _reply(start_response, body, status="200 OK", ctype="text/plain"):
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    global release
    path = environ["PATH_INFO"]
    ws = environ.get("wsgi.websocket")
    if ws is not None:
        counts["ws"] += 1
        try:
            while True:
                message = ws.receive()
                if message is None:
                    return []
                ws.send(message)
        finally:
            counts["ws"] -= 1
    if path == "/ws":
        return _reply(start_response, b"a WebSocket handshake was expected\n", "400 Bad Request")
    if path == "/poll":
        event = release
        counts["polls"] += 1
        try:
            event.wait(HOLD)
        finally:
            counts["polls"] -= 1
        return _reply(start_response, b"released\n")
    if path == "/release":
        held, release = release, gevent.event.Event()
        held.set()
        return _reply(start_response, b"ok\n")
    if path == "/stats":
        if "gc=1" in environ.get("QUERY_STRING", ""):
            gc.collect()
            if _malloc_trim is not None:
                _malloc_trim(0)
        body = json.dumps({"pid": os.getpid(), **counts, "rss_kib": _rss_kib()}).encode()
        return _reply(start_response, body, ctype="application/json")
    return _reply(start_response, b"ok\n")
