"""A long-poll chat whose state lives in the worker's memory.

Sessions and their unread messages are kept in this process only, so a client
must keep reaching the same worker: exactly what ipserve's source-IP pinning
gives and a round-robin pool of workers does not.

    ipserve examples/longpoll.py:application -w 4 -b 127.0.0.1:8000
    curl -s 127.0.0.1:8000/join                       # -> {"session": "4242-1f0c…"}
    curl -s '127.0.0.1:8000/poll?session=ID' &         # ID from /join; waits up to 25 s
    curl -s -d 'hello' '127.0.0.1:8000/say?session=ID' # wakes the poll above

A session id names the worker that made it (its pid, then a random token), so
an id this worker does not know is answered for what it is: 409 if another
worker made it (the request reached a different worker: the client's address
changed, or a reload replaced that worker), 404 for anything else (never
joined, mistyped), 400 with no session at all.
"""

import json
import os
import secrets
import string
from urllib.parse import parse_qs

import gevent.event

POLL_SECONDS = 25
TOKEN_HEX = 16
sessions = {}   # session id -> {"queue": [messages], "event": Event}


def new_session_id() -> str:
    return f"{os.getpid()}-{secrets.token_hex(TOKEN_HEX // 2)}"


def maker_of(sid: str) -> int | None:
    """The pid of the worker that made `sid`, if it is a well-formed id; else None."""
    pid, dash, token = sid.partition("-")
    if (dash and pid.isascii() and pid.isdigit() and len(token) == TOKEN_HEX
            and all(c in string.hexdigits for c in token)):
        return int(pid)
    return None


def unknown_session(sid: str) -> tuple[str, str]:
    """(status, error) for a session id this worker does not hold."""
    if not sid:
        return "400 Bad Request", "no session: join first (GET /join), then pass ?session=ID"
    maker = maker_of(sid)
    if maker is not None and maker != os.getpid():
        return "409 Conflict", (f"session made by worker {maker}; this request reached a "
                                f"different worker ({os.getpid()}): join again")
    return "404 Not Found", ("unknown session: join first (GET /join), or join again "
                             "(a session ends with the worker that made it)")


def reply(start_response, status, payload):
    payload["worker_pid"] = os.getpid()
    body = json.dumps(payload).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/join":
        sid = new_session_id()
        sessions[sid] = {"queue": [], "event": gevent.event.Event()}
        return reply(start_response, "200 OK", {"session": sid, "members": len(sessions)})
    sid = query.get("session", [""])[0]
    session = sessions.get(sid)
    if path in ("/poll", "/say") and session is None:
        status, error = unknown_session(sid)
        return reply(start_response, status, {"error": error})
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
