"""A Flask-SocketIO chat application (async_mode="gevent") for the framework
end-to-end tests (tests/e2e/test_frameworks.py), served unchanged by ipserve
as ``tests/apps/fw_socketio.py:application``.

Socket.IO events (every ack carries "pid", "remote_addr", "worker"):
  whoami            -> {"sid", "transport" (as the server sees it), "http": the
                        engine.io HTTP requests this worker served for the
                        session: {"count", "addrs", "transports"}}
  join {room, name} -> joins `room`; ack {"room", "members": names in the room
                        on this worker}
  members {room}    -> ack {"room", "members": names in the room on this worker}
  say {room, text}  -> emits "said" {"room", "text", "from", "pid"} to the room,
                        sender included; ack {"delivered_to": names in the room}
GET /whoami         plain Flask, JSON {"pid", "remote_addr", "worker"}

Rooms live in each worker's memory (python-socketio's default in-process
client manager): a room is the set of its members connected to THAT worker.
Broadcasting across workers needs a message queue (SocketIO(message_queue=...)),
which this app does not use.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qs

from flask import Flask, jsonify, request
from flask_socketio import SocketIO, emit, join_room
from wsgi_validate import validated    # tests/apps/ is on sys.path (APP given as a path)

app = Flask(__name__)
socketio = SocketIO(app, async_mode="gevent")

_names: dict[str, str] = {}                    # Socket.IO sid -> member name
_http: dict[str, dict] = {}                     # engine.io sid -> what reached us


def _who() -> dict:
    return {"pid": os.getpid(), "remote_addr": request.remote_addr,
            "worker": request.environ.get("ipserve.worker")}


def _members(room: str) -> list[str]:
    return sorted(_names.get(sid, sid)
                  for sid, _eio_sid in socketio.server.manager.get_participants("/", room))


@app.get("/whoami")
def whoami_http():
    return jsonify(_who())


@socketio.on("connect")
def on_connect(auth=None):
    # The engine.io handshake request (the first polling GET, or the WebSocket
    # upgrade of a WebSocket-only client) has no sid in its URL: it is
    # request.environ here.
    _note_request(socketio.server.manager.eio_sid_from_sid(request.sid, "/"), request.environ)
    return True


@socketio.on("disconnect")
def on_disconnect(*args):
    _names.pop(request.sid, None)


@socketio.on("whoami")
def on_whoami():
    eio_sid = socketio.server.manager.eio_sid_from_sid(request.sid, "/")
    http = _http.get(eio_sid, {"count": 0, "addrs": [], "transports": []})
    return {**_who(), "sid": request.sid, "transport": socketio.server.transport(request.sid),
            "http": http}


@socketio.on("join")
def on_join(data):
    _names[request.sid] = data["name"]
    join_room(data["room"])
    return {**_who(), "room": data["room"], "members": _members(data["room"])}


@socketio.on("members")
def on_members(data):
    return {**_who(), "room": data["room"], "members": _members(data["room"])}


@socketio.on("say")
def on_say(data):
    message = {"room": data["room"], "text": data["text"],
               "from": _names.get(request.sid, request.sid), "pid": os.getpid()}
    emit("said", message, to=data["room"])
    return {**_who(), "delivered_to": _members(data["room"])}


def _note_request(eio_sid: str, environ: dict) -> None:
    entry = _http.setdefault(eio_sid, {"count": 0, "addrs": [], "transports": []})
    entry["count"] += 1
    addr = environ.get("REMOTE_ADDR")
    if addr not in entry["addrs"]:
        entry["addrs"].append(addr)
    transport = (parse_qs(environ.get("QUERY_STRING", "")).get("transport") or [None])[0]
    if transport not in entry["transports"]:
        entry["transports"].append(transport)


def _record_engineio_requests(wsgi_app):
    """Count, per engine.io session, the HTTP requests (polling GETs and POSTs,
    the WebSocket upgrade) this worker served, their addresses and transports."""
    def middleware(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/socket.io"):
            sid = (parse_qs(environ.get("QUERY_STRING", "")).get("sid") or [None])[0]
            if sid:
                _note_request(sid, environ)
        return wsgi_app(environ, start_response)
    return middleware


application = validated(_record_engineio_requests(app))
