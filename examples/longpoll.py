"""A long-poll chat whose state lives in the worker's memory.

Sessions and their unread messages are kept in this process only, so a client
must keep reaching the same worker: exactly what ipserve's source-IP pinning
gives and a round-robin pool of workers does not.

    ipserve examples/longpoll.py:application -w 4 -b 127.0.0.1:8000
    curl -s 127.0.0.1:8000/join                       # -> {"session": "…"}
    curl -s '127.0.0.1:8000/poll?session=…' &          # waits up to 25 s
    curl -s -d 'hello' '127.0.0.1:8000/say?session=…'  # wakes the poll above

A session unknown to the worker answers 409: the client reached another process.
"""

import json
import os
import secrets
from urllib.parse import parse_qs

import gevent.event

POLL_SECONDS = 25
sessions = {}   # session id -> {"queue": [messages], "event": Event}


def reply(start_response, status, payload):
    payload["worker_pid"] = os.getpid()
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/join":
        sid = secrets.token_hex(8)
        sessions[sid] = {"queue": [], "event": gevent.event.Event()}
        return reply(start_response, "200 OK", {"session": sid, "members": len(sessions)})
    session = sessions.get(query.get("session", [""])[0])
    if path in ("/poll", "/say") and session is None:
        return reply(start_response, "409 Conflict",
                     {"error": "unknown session: this request reached a different worker"})
    if path == "/poll":
        if not session["queue"]:
            session["event"].clear()
            session["event"].wait(POLL_SECONDS)
        messages, session["queue"] = session["queue"], []
        return reply(start_response, "200 OK", {"messages": messages})
    if path == "/say":
        size = int(environ.get("CONTENT_LENGTH") or 0)
        text = environ["wsgi.input"].read(min(size, 4096)).decode("utf-8", "replace")
        for other in sessions.values():
            other["queue"].append({"from": environ["REMOTE_ADDR"], "text": text})
            other["event"].set()
        return reply(start_response, "200 OK", {"delivered": len(sessions)})
    return reply(start_response, "404 Not Found", {"error": "try /join, /poll, /say"})
