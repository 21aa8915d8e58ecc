"""WSGI probe application for the end-to-end tests and benchmarks.

Routes (GET):
  /, /whoami     JSON {"pid", "remote_addr", "worker"}
  /ws            WebSocket echo (gevent-websocket: environ["wsgi.websocket"])
  /sleep?s=N     gevent.sleep(N) then 200: a long poll that leaves the hub free
  /block?s=N     busy loop for N seconds that holds the hub (hub lag, toobusy);
                 the loop is in _block_hub(), the name a blocked-hub report shows
  /busy          JSON {"too_busy_env": environ["ipserve.too_busy"],
                 "too_busy_fn": ipserve.too_busy()} (None outside ipserve)
  /leak?mb=N     keeps N more MiB (touched, so it counts in RSS); JSON with totals
  /echo          reads the whole request body (any method); JSON {"length", "body"}
anything else    404

Use it as ``tests/apps/probe.py:application`` (path form) or
``tests.apps.probe:application`` with the repository root on sys.path.
`application` runs plain HTTP requests under wsgiref.validate
(tests/apps/wsgi_validate.py); `_application` is the bare app, for apps that
delegate to it and validate themselves.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs

import gevent

try:
    from wsgi_validate import validated          # tests/apps/ is on sys.path
except ModuleNotFoundError:
    # Imported as tests.apps.probe, or a copy elsewhere (tests copy this file
    # alone): the same as wsgi_validate.validated, inline.
    from wsgiref.validate import validator

    def validated(app):
        lint = validator(app)
        return lambda environ, start_response: (
            app if "wsgi.websocket" in environ else lint)(environ, start_response)

_LEAK: list[bytearray] = []
MIB = 1 << 20


def _json(start_response, payload: dict, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(payload, default=str).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _text(start_response, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _number(environ, key: str, default: float) -> float:
    values = parse_qs(environ.get("QUERY_STRING", "")).get(key)
    if not values:
        return default
    return float(values[0])


def _whoami(environ) -> dict:
    return {"pid": os.getpid(), "remote_addr": environ.get("REMOTE_ADDR"),
            "worker": environ.get("ipserve.worker")}


def _websocket(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        return _text(start_response, "400 Bad Request", "expected a WebSocket upgrade\n")
    while True:
        message = ws.receive()
        if message is None:          # closed by the peer
            break
        ws.send(message)
    return []


def _block_hub(seconds: float) -> int:
    """Spin for `seconds` without ever yielding to the gevent hub."""
    end = time.perf_counter() + seconds
    spins = 0
    while time.perf_counter() < end:     # never yields to the hub
        spins += 1
    return spins


def _busy(environ) -> dict:
    try:
        import ipserve
    except ImportError:                  # served by something else than ipserve
        too_busy_fn = None
    else:
        too_busy_fn = ipserve.too_busy()
    return {**_whoami(environ), "too_busy_env": environ.get("ipserve.too_busy"),
            "too_busy_fn": too_busy_fn}


def _read_all(stream) -> bytes:
    """The whole request body, by read(size) until b"" (PEP 3333's read takes a
    size; the server ends the stream at Content-Length or the last chunk)."""
    chunks = []
    while True:
        chunk = stream.read(MIB)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    try:
        if path in ("/", "/whoami"):
            return _json(start_response, _whoami(environ))
        if path == "/ws":
            return _websocket(environ, start_response)
        if path == "/sleep":
            seconds = _number(environ, "s", 1.0)
            gevent.sleep(seconds)
            return _json(start_response, {**_whoami(environ), "slept": seconds})
        if path == "/block":
            seconds = _number(environ, "s", 1.0)
            spins = _block_hub(seconds)
            return _json(start_response, {**_whoami(environ), "blocked": seconds,
                                          "spins": spins})
        if path == "/busy":
            return _json(start_response, _busy(environ))
        if path == "/echo":
            # Reads the body, so the server's body parser (Content-Length,
            # chunked) runs; its errors (IOError) are the server's to answer.
            body = _read_all(environ["wsgi.input"])
            return _json(start_response, {"length": len(body),
                                          "body": body.decode("latin-1")})
        if path == "/leak":
            mb = int(_number(environ, "mb", 1))
            if mb > 0:
                # Non-zero fill: every page is written, so RSS grows by mb MiB.
                _LEAK.append(bytearray(b"\xa5") * (mb * MIB))
            return _json(start_response, {**_whoami(environ), "len": len(_LEAK),
                                          "mb": sum(len(b) for b in _LEAK) // MIB})
    except ValueError as exc:
        return _text(start_response, "400 Bad Request", f"{exc}\n")
    return _text(start_response, "404 Not Found", f"no route {path}\n")


application = validated(_application)
