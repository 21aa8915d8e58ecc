"""End-to-end tests of the framework examples, run as their headers say.

examples/flask_app.py, examples/django_project/ and
examples/flask_socketio_chat.py are served by the real `ipserve` command with
the APP and `-w 4` of the command line in their own header, in the testbed's
server namespace; clients talk to them from the 16 addresses of the client
namespace (198.18.0.16-31: low 2 bits = slot 0..3).

Each test checks that the example works (Flask routes, a form, JSON, notes
kept in the worker's memory; a Django view and its CSRF protection; a
Socket.IO room over long-polling and WebSocket whose messages cross workers,
and generations across a reload) and that every address is always served by
the one worker pid of its slot, as `ipservectl status` shows it.

The machinery (serving on -w 4, Pinning, request) is test_frameworks.py's.
Its apps under tests/apps/ stay: they run under wsgiref.validate and carry
test hooks (gated streams, per-session request records) that examples should
not. This file is also the Socket.IO client script (``chat-client``), run
inside the client namespace.
"""

from __future__ import annotations

import functools
import html
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict

import netns
from backends import routed_workers, slot_of
from netns import HttpClient
from test_frameworks import (
    PORT,
    WAIT,
    WORKERS,
    Pinning,
    assert_clean_log,
    request,
    serve,
)


def header_app(relative: str) -> str:
    """The APP of the `ipserve ... -w 4` command line in an example's header,
    as an absolute path: the test serves what the header tells users to run."""
    with open(os.path.join(netns.REPO_ROOT, relative), encoding="utf-8") as fh:
        header = fh.read().split('"""')[1]
    lines = [line.split() for line in header.splitlines() if "bin/ipserve " in line]
    assert len(lines) == 1, f"{relative}: expected one ipserve command line in the header"
    argv = lines[0][lines[0].index(".venv/bin/ipserve") + 1:]
    assert argv[1:3] == ["-w", str(WORKERS)], f"{relative}: {shlex.join(argv)}"
    target, _, attr = argv[0].rpartition(":")
    return os.path.join(netns.REPO_ROOT, target) + ":" + attr


def cookie_value(headers: dict, name: str) -> str:
    match = re.search(rf"(?:^|[\s,]){name}=([^;,\s]+)", headers.get("set-cookie", ""))
    assert match, f"no {name} cookie set: {headers}"
    return match.group(1)


# --------------------------------------------------------------------------- #
# Flask
# --------------------------------------------------------------------------- #

def test_flask_example(testbed, ipserve):
    """From 16 addresses: who answered, a route with a path parameter and a
    query, a note added by form and one by JSON on one keep-alive connection,
    Flask's 400 and 404; then, on a fresh connection, the notes are still
    there: the worker that holds them answered again."""
    tb = testbed
    srv, table = serve(ipserve, header_app("examples/flask_app.py"))
    pin = Pinning(table)

    for i, src in enumerate(tb.client_ips):
        with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=WAIT) as c:
            pin.check(src, json.loads(request(c, "GET", "/")[1]), "GET /")

            name = f"Zoë {i}"
            query = urllib.parse.urlencode({"greeting": "Grüß Gott"})
            data = json.loads(request(c, "GET", f"/hello/{urllib.parse.quote(name)}?{query}")[1])
            pin.check(src, data, "GET /hello")
            assert data["message"] == f"Grüß Gott, {name}!", data

            hdrs, body = request(c, "POST", "/notes", body=f"text=milk+{i}".encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
            cookie = {"Cookie": f"client={cookie_value(hdrs, 'client')}"}
            data = json.loads(body)
            pin.check(src, data, "POST /notes (form)")
            assert data["notes"] == [f"milk {i}"], data

            _, body = request(c, "POST", "/notes", body=json.dumps({"text": f"eggs {i}"}).encode(),
                              headers={**cookie, "Content-Type": "application/json"})
            assert json.loads(body)["notes"] == [f"milk {i}", f"eggs {i}"]

            request(c, "POST", "/notes", body=b"{}", expect=400,
                    headers={**cookie, "Content-Type": "application/json"})
            request(c, "GET", "/no/such/page", expect=404)
            assert c.connects == 1, f"{src}: the server closed the keep-alive connection"

        with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=WAIT) as c:
            data = json.loads(request(c, "GET", "/notes", headers=cookie)[1])
            pin.check(src, data, "GET /notes (fresh connection)")
            assert data["notes"] == [f"milk {i}", f"eggs {i}"], \
                f"{src}: the notes are gone: another worker answered"

    pin.finish(tb.client_ips)
    assert_clean_log(srv)


# --------------------------------------------------------------------------- #
# Django
# --------------------------------------------------------------------------- #

_TOKEN = re.compile(r'<input type="hidden" name="csrfmiddlewaretoken" value="([^"]+)">')
_SERVED = re.compile(r"Served by worker pid (\d+) to ([^<]+)\.</p>")


def _page_who(body: bytes) -> dict:
    match = _SERVED.search(body.decode())
    assert match, f"no 'Served by' line in the page: {body[:300]!r}"
    return {"pid": int(match.group(1)), "remote_addr": match.group(2)}


def test_django_example(testbed, ipserve):
    """From 16 addresses: the JSON view, and the guestbook form: GET sets the
    csrftoken cookie and renders the token; a POST with both is signed in
    (escaped in the page); a POST without the token, or with the cookie
    only, is refused 403 by CsrfViewMiddleware; a Host not allowed gets 400."""
    tb = testbed
    run = functools.partial(ipserve, env={"DJANGO_ALLOWED_HOSTS": tb.server_ip})
    srv, table = serve(run, header_app("examples/django_project/wsgi.py"))
    pin = Pinning(table)
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    for i, src in enumerate(tb.client_ips):
        with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=WAIT) as c:
            pin.check(src, json.loads(request(c, "GET", "/")[1]), "GET / (django)")

            hdrs, body = request(c, "GET", "/guestbook/")
            pin.check(src, _page_who(body), "GET /guestbook/")
            token_cookie = {**form, "Cookie": f"csrftoken={cookie_value(hdrs, 'csrftoken')}"}
            match = _TOKEN.search(body.decode())
            assert match, f"no CSRF token in the form: {body[:500]!r}"

            message = f"hello <{i}> & welcome"
            signed = urllib.parse.urlencode({"csrfmiddlewaretoken": match.group(1),
                                             "message": message}).encode()
            _, body = request(c, "POST", "/guestbook/", body=signed, headers=token_cookie)
            pin.check(src, _page_who(body), "POST /guestbook/")
            assert f"<li>{html.escape(message)}</li>" in body.decode()

            unsigned = urllib.parse.urlencode({"message": "no token"}).encode()
            for headers in (form, token_cookie):
                _, body = request(c, "POST", "/guestbook/", body=unsigned, headers=headers,
                                  expect=403)
                assert b"CSRF verification failed" in body, body[:300]
            request(c, "GET", "/", headers={"Host": "attacker.example"}, expect=400)
            assert c.connects == 1, f"{src}: the server closed the keep-alive connection"

    pin.finish(tb.client_ips)
    assert_clean_log(srv)


# --------------------------------------------------------------------------- #
# Flask-SocketIO
# --------------------------------------------------------------------------- #

POLLING, WEBSOCKET, UPGRADE = ["polling"], ["websocket"], ["polling", "websocket"]
WAYS = (POLLING, WEBSOCKET, UPGRADE)
ROOM = "lobby"
STAYERS = (4, 5, 7)        # stay connected over a reload: WebSocket or upgraded, slots 0, 1, 3
NEWCOMERS = (0, 2)         # connect after it, from slots 0 (polling) and 2 (upgraded)


def _read_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The client's next JSON line, waited for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if time.monotonic() >= deadline or proc.poll() is not None:
            break
    else:
        line = proc.stdout.readline()
        if line:
            return json.loads(line)
    proc.kill()
    _, err = proc.communicate(timeout=WAIT)
    raise AssertionError(f"the chat client said nothing more (exit {proc.returncode}):\n{err}")


def test_flask_socketio_chat_example(testbed, ipserve):
    """python-socketio's client from 16 addresses, over long-polling,
    WebSocket, and polling upgraded to WebSocket, all in one room.

    Every member's session is held by its slot's worker (whoami, before and
    after the chat, and on a new connection), and every member hears every
    member's message exactly once, whichever worker sent it: the example's
    relay carries a room across workers. Then a reload (HUP): three members
    stay connected to the old generation, two newcomers reach the new one,
    and each of the five hears all five messages sent after it, in both
    directions between the generations."""
    tb = testbed
    relay_dir = tempfile.mkdtemp(prefix="ips-relay-")
    tb.add_path(relay_dir)
    run = functools.partial(ipserve, env={"SOCKETIO_RELAY_DIR": relay_dir})
    srv, table = serve(run, header_app("examples/flask_socketio_chat.py"))
    pin = Pinning(table)

    def member(prefix: str, index: int) -> dict:
        return {"name": f"{prefix}{index:02d}", "src": tb.client_ips[index],
                "transports": WAYS[index % len(WAYS)]}

    members = [member("m", i) for i in range(len(tb.client_ips))]
    spec = {"server": tb.server_ip, "port": PORT, "room": ROOM, "wait": WAIT, "members": members,
            "stayers": [members[i]["name"] for i in STAYERS],
            "newcomers": [member("n", i) for i in NEWCOMERS]}
    assert all(m["transports"] != POLLING for m in members if m["name"] in spec["stayers"])
    proc = netns.run_in(tb.client_ns, [sys.executable, os.path.abspath(__file__), "chat-client",
                                       json.dumps(spec)],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    try:
        first = _read_line(proc, timeout=120)
        every_text = sorted(f"hello from {m['name']}" for m in members)
        for m in members:
            got, where = first[m["name"]], f"{m['name']} ({m['src']}, {'+'.join(m['transports'])})"
            assert got["client_transport"] == m["transports"][-1], where
            for step in ("whoami", "whoami_last", "whoami_again", "join", "say"):
                if step in got:     # stayers stay connected: no whoami_again
                    pin.check(m["src"], got[step], f"socket.io {step} of {where}")
            assert got["whoami"]["transport"] == m["transports"][-1], where
            assert got["whoami"]["sid"] == got["whoami_last"]["sid"], where
            assert ("whoami_again" in got) == (m["name"] not in spec["stayers"]), where
            if "whoami_again" in got:
                assert got["whoami_again"]["sid"] != got["whoami"]["sid"], where
            assert sorted(h["text"] for h in got["heard"]) == every_text, \
                f"{where} did not hear every message exactly once: {got['heard']}"
            for heard in got["heard"]:
                sender = next(s for s in members if s["name"] == heard["name"])
                assert heard["pid"] == table[slot_of(sender["src"], WORKERS)]["pid"], heard
        pin.finish([m["src"] for m in members])
        assert sorted(os.listdir(relay_dir)) == sorted(f"{w['pid']}.sock" for w in table.values())

        # A reload while the stayers hold their WebSockets on the old generation.
        srv.send_signal(signal.SIGHUP)
        old_pids = {w["pid"] for w in table.values()}

        def new_generation_routed(st: dict) -> bool:
            routed = routed_workers(st, WORKERS)
            return routed is not None and not old_pids & {w["pid"] for w in routed.values()}

        st = srv.wait_for(new_generation_routed, timeout=60,
                          what="a new generation routed on every slot")
        new_table = routed_workers(st, WORKERS)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        second = _read_line(proc, timeout=90)
        pid_of = {m["name"]: table[slot_of(m["src"], WORKERS)]["pid"]
                  for m in members if m["name"] in spec["stayers"]}
        pid_of.update({m["name"]: new_table[slot_of(m["src"], WORKERS)]["pid"]
                       for m in spec["newcomers"]})
        after_texts = sorted(f"after the reload from {name}" for name in pid_of)
        for name, pid in pid_of.items():
            got = second[name]
            assert got["whoami"]["pid"] == pid, f"{name} is held by {got['whoami']}, not {pid}"
            assert sorted(h["text"] for h in got["heard"]) == after_texts, \
                f"{name} did not hear every message after the reload once: {got['heard']}"
            assert all(h["pid"] == pid_of[h["name"]] for h in got["heard"]), got["heard"]
        assert proc.wait(timeout=WAIT) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert_clean_log(srv)
    assert not [line for line in srv.own_lines() if "chat relay" in line]


def chat_client_main(spec: dict) -> None:
    """The Socket.IO side, in the client namespace: every member connects FROM
    its own address (sio_clients.bound_client). Prints one JSON line after
    the first chat, waits for "go" on stdin (the test reloads meanwhile), then
    prints the second."""
    import threading

    import socketio
    from sio_clients import bound_client

    wait = spec["wait"]
    url = f"http://{spec['server']}:{spec['port']}"

    heard: dict[str, list[dict]] = defaultdict(list)
    arrived = threading.Condition()

    def connect(m: dict) -> socketio.Client:
        client = bound_client(m["src"], wait)

        @client.on("said")
        def said(message):
            with arrived:
                heard[m["name"]].append(message)
                arrived.notify_all()

        client.connect(url, transports=m["transports"], wait_timeout=wait)
        return client

    def chat(clients: dict[str, socketio.Client], text: str, out: dict) -> None:
        """Every client says `text` + its name; then each must have heard all."""
        for name, client in clients.items():
            out[name]["say"] = client.call("say", {"text": f"{text} {name}"}, timeout=wait)
        expected = len(clients)
        with arrived:
            arrived.wait_for(lambda: all(len(heard[n]) >= expected for n in clients), wait)
        time.sleep(0.5)     # room for a duplicate to show up, if the relay made one
        with arrived:
            for name in clients:
                out[name]["heard"], heard[name] = heard[name], []

    out: dict[str, dict] = defaultdict(dict)
    clients: dict[str, socketio.Client] = {}
    try:
        for m in spec["members"]:
            client = clients[m["name"]] = connect(m)
            out[m["name"]]["client_transport"] = client.transport()
            out[m["name"]]["whoami"] = client.call("whoami", timeout=wait)
        for m in spec["members"]:
            out[m["name"]]["join"] = clients[m["name"]].call(
                "join", {"room": spec["room"], "name": m["name"]}, timeout=wait)
        chat(clients, "hello from", out)
        for m in spec["members"]:
            out[m["name"]]["whoami_last"] = clients[m["name"]].call("whoami", timeout=wait)
            if m["name"] not in spec["stayers"]:
                clients.pop(m["name"]).disconnect()
                again = connect(m)
                out[m["name"]]["whoami_again"] = again.call("whoami", timeout=wait)
                again.disconnect()
        print(json.dumps(out), flush=True)

        if sys.stdin.readline().strip() != "go":
            sys.exit("no go")
        out = defaultdict(dict)
        for m in spec["newcomers"]:
            clients[m["name"]] = connect(m)
            clients[m["name"]].call("join", {"room": spec["room"], "name": m["name"]},
                                    timeout=wait)
        for name, client in clients.items():
            out[name]["whoami"] = client.call("whoami", timeout=wait)
        chat(clients, "after the reload from", out)
        print(json.dumps(out), flush=True)
    finally:
        for client in clients.values():
            client.disconnect()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "chat-client":
        chat_client_main(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(f"usage: {sys.argv[0]} chat-client SPEC_JSON")
