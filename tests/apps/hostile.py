"""WSGI application for the hostile-input end-to-end tests (test_http_hostile.py,
test_ws_hostile.py).

Every call is counted per PATH_INFO before anything else, so a test can tell
whether the server called the application at all (GET /calls).

Routes:
  /, /whoami     JSON: pid, method, PATH_INFO, QUERY_STRING, SERVER_PROTOCOL, Host,
                 Upgrade, whether environ["wsgi.websocket"] is there
  /calls         JSON {path: number of calls} (this call not included)
  /echo          reads the whole body in 64 KiB reads (any method, nothing kept
                 but a hash): JSON {"length", "sha256", "head": first 256 bytes};
                 the server's body errors propagate (its answer, not ours)
  /ignore        answers 200 at once without reading the body
  /big?mb=N      a response of N MiB (Content-Length set), in 1 MiB pieces
  /ws            WebSocket echo (text stays text, binary stays binary); the
                 server picks no subprotocol (the app does not choose)
  /ws-chat       like /ws, but first calls start_response("101 Switching
                 Protocols", [("Sec-WebSocket-Protocol", "chat")])
  /ws-refuse     refuses the upgrade: start_response("403 Forbidden") before
                 touching the socket
  /ws-app-protocol  like /ws; application.app_protocol(path) (gevent-websocket's
                 hook) says the app speaks "chat" there (nothing elsewhere)
anything else    404
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from urllib.parse import parse_qs
from wsgi_validate import validated    # tests/apps/ is on sys.path (APP given as a path)

MIB = 1 << 20
CALLS: Counter = Counter()


def _json(start_response, payload: dict, status: str = "200 OK") -> list[bytes]:
    body = json.dumps(payload, default=str).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def _whoami(environ) -> dict:
    return {"pid": os.getpid(), "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"), "query": environ.get("QUERY_STRING"),
            "protocol": environ.get("SERVER_PROTOCOL"), "host": environ.get("HTTP_HOST"),
            "upgrade": environ.get("HTTP_UPGRADE"),
            "websocket": environ.get("wsgi.websocket") is not None}


def _echo_ws(ws) -> None:
    while True:
        message = ws.receive()
        if message is None:          # closed (by the peer, or for a protocol error)
            return
        ws.send(message)


def _big(environ, start_response):
    mb = int(parse_qs(environ.get("QUERY_STRING", "")).get("mb", ["1"])[0])
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(mb * MIB))])
    piece = b"\xa5" * MIB
    return (piece for _ in range(mb))


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    calls = dict(CALLS)
    CALLS[path] += 1
    if path in ("/", "/whoami"):
        return _json(start_response, _whoami(environ))
    if path == "/calls":
        return _json(start_response, calls)
    if path == "/echo":
        stream = environ["wsgi.input"]
        digest, length, head = hashlib.sha256(), 0, b""
        while True:
            data = stream.read(65536)
            if not data:
                break
            digest.update(data)
            if len(head) < 256:
                head += data[:256 - len(head)]
            length += len(data)
        return _json(start_response, {"length": length, "sha256": digest.hexdigest(),
                                      "head": head.decode("latin-1")})
    if path == "/ignore":
        return _json(start_response, {"ignored": environ.get("CONTENT_LENGTH")})
    if path == "/big":
        return _big(environ, start_response)
    if path in ("/ws", "/ws-chat", "/ws-refuse", "/ws-app-protocol"):
        ws = environ.get("wsgi.websocket")
        if ws is None:
            return _json(start_response, {**_whoami(environ), "error": "not a WebSocket"})
        if path == "/ws-refuse":
            body = b"no WebSocket for you\n"
            start_response("403 Forbidden", [("Content-Type", "text/plain"),
                                              ("Content-Length", str(len(body)))])
            return [body]
        if path == "/ws-chat":
            start_response("101 Switching Protocols", [("Sec-WebSocket-Protocol", "chat")])
        _echo_ws(ws)
        return []
    body = f"no route {path}\n".encode()
    start_response("404 Not Found", [("Content-Type", "text/plain"),
                                     ("Content-Length", str(len(body)))])
    return [body]


def app_protocol(path: str) -> str | None:
    """gevent-websocket's hook: the subprotocol the application speaks at `path`
    (one name; used if the client offered it)."""
    return "chat" if path == "/ws-app-protocol" else None


application = validated(application)
application.app_protocol = app_protocol
