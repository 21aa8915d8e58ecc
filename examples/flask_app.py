"""A Flask application under ipserve: routes, a form, JSON, and state kept in
the worker's own memory.

    .venv/bin/ipserve examples/flask_app.py:app -w 4 -b 127.0.0.1:8000

    curl -s 127.0.0.1:8000/                                # which worker answered you
    curl -s '127.0.0.1:8000/hello/Ada?greeting=Bonjour'
    curl -s -c jar -b jar -d text=milk 127.0.0.1:8000/notes              # a form
    curl -s -c jar -b jar -H 'Content-Type: application/json' \\
         -d '{"text": "eggs"}' 127.0.0.1:8000/notes                       # JSON
    curl -s -c jar -b jar 127.0.0.1:8000/notes                           # both notes

Flask needs nothing from ipserve: `app` is its WSGI callable, and each worker
imports this file in a fresh interpreter (so a `kill -HUP` to the master loads
the code as it is on disk then).

The notes live in a dict of the worker process — no database, no Redis — and
are found again on the next request, on any connection, because ipserve sends
every request from one client address to the same worker. Under a server
whose workers share one listening socket (gunicorn -w 4), a request finds them
only when it happens to reach the worker that took the note. Memory is not storage:
the notes go when their worker goes (a reload, `worker_memory`,
`max_requests`), and clients that share one address (a NAT) share one worker.
Keep per-worker state for what can be rebuilt: caches, game rooms, open
streams; keep what must last in a database.
"""

from __future__ import annotations

import os
import secrets

from flask import Flask, abort, jsonify, request

app = Flask(__name__)

MAX_NOTES = 100                 # per client: a client cannot grow the worker without bound
notes: dict[str, list[str]] = {}    # client cookie -> its notes, in this process only


def who() -> dict:
    """Who answered whom: this process, its ipserve slot, the client's address."""
    return {"pid": os.getpid(), "remote_addr": request.remote_addr,
            "worker": request.environ.get("ipserve.worker")}   # None under another server


@app.get("/")
def index():
    return jsonify(who())


@app.get("/hello/<name>")
def hello(name: str):
    return jsonify(**who(), message=f"{request.args.get('greeting', 'Hello')}, {name}!")


@app.route("/notes", methods=["GET", "POST"])
def client_notes():
    client = request.cookies.get("client") or secrets.token_urlsafe(16)
    mine = notes.setdefault(client, [])
    if request.method == "POST":
        data = request.get_json(silent=True) if request.is_json else request.form
        text = (data or {}).get("text")
        if not isinstance(text, str) or not text.strip():
            abort(400, "send a non-empty text field (form or JSON)")
        if len(mine) >= MAX_NOTES:
            abort(409, f"at most {MAX_NOTES} notes")
        mine.append(text[:1000])
    response = jsonify(**who(), notes=mine)
    response.set_cookie("client", client, httponly=True, samesite="Lax")
    return response
