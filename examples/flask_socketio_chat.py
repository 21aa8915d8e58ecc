"""A Flask-SocketIO chat whose rooms span every worker of one machine.

    .venv/bin/ipserve examples/flask_socketio_chat.py:app -w 4 -b 127.0.0.1:8000

Open http://127.0.0.1:8000/ in two browsers (the page loads the Socket.IO
JavaScript client from cdn.socket.io), or use python-socketio's client:
connect, call "join" {"room", "name"}, then "say" {"text"}; every member of
the room receives "said" {"room", "name", "text", "pid"}. "whoami" answers
which worker holds you and over which transport.

Flask-SocketIO runs in its gevent mode (async_mode="gevent"), with both
transports: long-polling and WebSocket (ipserve gives the WebSocket requests
gevent-websocket's environ["wsgi.websocket"], which is what that mode uses).

Why `-w 4` works at all. A Socket.IO session lives in one process. With
long-polling every poll and every send is a new HTTP request, and a request
that reaches a worker other than the session's is refused ("Invalid
session", 400); the WebSocket upgrade must reach that worker too. Servers
whose workers share one listening socket therefore need a single worker or a
sticky load balancer in front (Flask-SocketIO's documentation says so for
gunicorn). ipserve sends every connection from one client address to the same
worker, so polls, sends and the upgrade of a client all find its session.
After a `kill -HUP`, a WebSocket stays with the old generation's worker until
it closes; a long-polling client's next poll (within the 25 s ping interval)
opens a connection that reaches the new generation, which does not know its
session: it gets "Invalid session" and reconnects (Socket.IO clients do by
themselves), as after a worker restart. Prefer the WebSocket transport.

What pinning does not give: one room across workers. python-socketio keeps
rooms in each process's memory, so emit(..., to=room) reaches only the
members held by the emitting worker, and members are spread over the workers
by the low bits of their addresses. Workers must pass broadcasts to each
other; python-socketio does that through a message queue,
SocketIO(app, message_queue="redis://..."), which is what to use across
machines or wherever Redis (or RabbitMQ, Kafka: see its documentation) runs.

This example needs no extra service: LocalRelay, below, is a
python-socketio PubSubManager (the base class of those message queues) over
Unix datagram sockets, one per worker process, in one private directory
per ipserve instance. An emit to a room goes to the emitting worker's own
members and to every other worker of the instance — the old generation
after a `kill -HUP` included, whose clients are still connected — and each
delivers it to its members. Its limits, honestly: one machine only; nothing
is stored, so a message is lost for a worker that does not read it within
RELAY_SEND_TIMEOUT (1 s) or is not running at that moment; a message must
fit in one datagram (texts are capped at 2000 characters).

Set SOCKETIO_RELAY_DIR to choose the directory (default: one under the
system's temporary directory, named after the uid and the ipserve instance);
it must belong to the workers' user with mode 0700, or the first Socket.IO
connection fails and the error log says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
import threading

import socketio
from flask import Flask, request
from flask_socketio import SocketIO, emit, join_room

import ipserve

log = logging.getLogger("chat")

RELAY_SEND_TIMEOUT = 1.0        # seconds a worker may take to make room for a message
MAX_DATAGRAM = 256 * 1024       # larger than any datagram the kernel lets through by default
MAX_TEXT, MAX_NAME = 2000, 40


def private_directory(path: str) -> str:
    """`path`, created 0700, or refused unless it is already ours and no one
    else's: whoever can write in it could put a socket of theirs among ours."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a directory of uid {os.geteuid()} with mode 0700: "
                           f"remove it, or set SOCKETIO_RELAY_DIR")
    return path


def default_relay_dir() -> str:
    instance = (ipserve.current_worker or {}).get("name", "standalone")
    return os.path.join(tempfile.gettempdir(), f"socketio-relay-{os.geteuid()}-{instance}")


class LocalRelay(socketio.PubSubManager):
    """python-socketio's pub/sub client manager over Unix datagram sockets:
    <directory>/<pid>.sock is each worker's inbox."""

    name = "local-relay"

    def __init__(self, directory: str):
        super().__init__(channel="flask-socketio")
        self.directory = directory
        self.path: str | None = None
        self.inbox: socket.socket | None = None
        self.peers: dict[str, socket.socket] = {}     # inbox path -> a socket connected to it
        # Sockets are gevent's here (ipserve's workers monkey-patch): two
        # greenlets must not wait on one socket at once, so sends take turns.
        self.sending = threading.Lock()

    def initialize(self) -> None:
        # Called by python-socketio on the first connection, in the worker:
        # not at import, since ipserve's start-up check imports the app in a
        # throwaway process that must leave no socket behind.
        private_directory(self.directory)
        self.path = os.path.join(self.directory, f"{os.getpid()}.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)        # left by an exited process that had our pid
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.path)
        super().initialize()            # starts the greenlet that reads _listen()

    def _publish(self, data: dict) -> None:
        payload = self.json.dumps(data).encode()
        with self.sending:
            for entry in os.listdir(self.directory):
                path = os.path.join(self.directory, entry)
                if path != self.path and entry.endswith(".sock"):
                    self._send(path, payload)

    def _send(self, path: str, payload: bytes) -> None:
        peer = self.peers.get(path)
        try:
            if peer is None:
                peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                peer.settimeout(RELAY_SEND_TIMEOUT)
                try:
                    peer.connect(path)
                except ConnectionRefusedError:
                    os.unlink(path)     # nobody reads it: its worker has exited
                    raise
                self.peers[path] = peer
            # Connected, a send waits while the peer's queue is full (up to the
            # timeout) instead of failing at once.
            peer.send(payload)
        except (ConnectionRefusedError, FileNotFoundError):
            self._forget(path, peer)    # the worker exited meanwhile
        except OSError as exc:          # a timeout included: this message is lost for it
            log.warning("chat relay: no message to %s: %s", path, exc)
            self._forget(path, peer)

    def _forget(self, path: str, peer: socket.socket | None) -> None:
        self.peers.pop(path, None)
        if peer is not None:
            peer.close()

    def _listen(self):
        while True:
            yield self.inbox.recv(MAX_DATAGRAM).decode()


app = Flask(__name__)
sio = SocketIO(
    app, async_mode="gevent",
    client_manager=LocalRelay(os.environ.get("SOCKETIO_RELAY_DIR") or default_relay_dir()))

members: dict[str, tuple[str, str]] = {}     # Socket.IO sid -> (name, room), this worker's


def who() -> dict:
    return {"pid": os.getpid(), "remote_addr": request.remote_addr,
            "worker": request.environ.get("ipserve.worker")}


def text_field(data, key: str, limit: int) -> str | None:
    value = data.get(key) if isinstance(data, dict) else None
    return value.strip()[:limit] if isinstance(value, str) and value.strip() else None


@sio.on("whoami")
def on_whoami():
    return {**who(), "sid": request.sid, "transport": sio.server.transport(request.sid)}


@sio.on("join")
def on_join(data):
    room, name = text_field(data, "room", MAX_NAME), text_field(data, "name", MAX_NAME)
    if room is None or name is None:
        return {"error": "join needs a room and a name"}
    members[request.sid] = (name, room)
    join_room(room)
    emit("notice", {"room": room, "text": f"{name} joined"}, to=room)
    return {**who(), "room": room}


@sio.on("say")
def on_say(data):
    text = text_field(data, "text", MAX_TEXT)
    if request.sid not in members or text is None:
        return {"error": "join a room first, then say a text"}
    name, room = members[request.sid]
    emit("said", {"room": room, "name": name, "text": text, "pid": os.getpid()}, to=room)
    return who()


@sio.on("disconnect")
def on_disconnect(*reason):
    name, room = members.pop(request.sid, (None, None))
    if room is not None:
        emit("notice", {"room": room, "text": f"{name} left"}, to=room)


PAGE = """<!doctype html><meta charset="utf-8"><title>ipserve chat</title>
<script src="https://cdn.socket.io/4.8.1/socket.io.min.js"></script>
<p id="me">connecting…</p>
<form id="join"><input id="name" placeholder="name" required>
<input id="room" value="lobby" required><button>join</button></form>
<form id="say" hidden><input id="text" autocomplete="off" required><button>say</button></form>
<ul id="log"></ul>
<script>
const socket = io();
const $ = id => document.getElementById(id);
const line = text => { const li = document.createElement("li"); li.textContent = text; $("log").append(li); };
socket.on("connect", () => socket.emit("whoami", me =>
  $("me").textContent = `worker pid ${me.pid} holds you (${me.remote_addr}) over ${me.transport}`));
socket.on("notice", m => line(`* ${m.text}`));
socket.on("said", m => line(`${m.name} (via worker ${m.pid}): ${m.text}`));
$("join").onsubmit = e => { e.preventDefault();
  socket.emit("join", {room: $("room").value, name: $("name").value}, () => {
    $("join").hidden = true; $("say").hidden = false; }); };
$("say").onsubmit = e => { e.preventDefault(); socket.emit("say", {text: $("text").value}); $("text").value = ""; };
</script>
"""


@app.get("/")
def index():
    return PAGE
