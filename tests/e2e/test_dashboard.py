"""The live dashboard (ipserve/dashboard.html) in a real headless Chromium
(tests/e2e/browser.py).

Two kinds of test:

* against a stand-in admin server in this process (no root, no ipserve): the
  page renders every section of a full status document, survives an older
  master's document and garbage, shows app-controlled strings as text, says
  "connection lost" and explains a 401;
* against the real `ipserve` (root, nft) with `--admin-bind 127.0.0.1:9000`
  in the testbed's server namespace, where Chromium runs too: the page shows
  every active worker, follows a `kill -HUP` without being reloaded (the new
  generation active, the old one retiring and draining), shows the leak
  reports of the workers that drained, and works with an admin token.

Waits are bounded polls of the rendered DOM and of the master's status;
nothing compares durations. The page is never reloaded between the states a
test waits for: a marker set in the page's window must survive.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import secrets
import signal
import tempfile
import threading
import time

import pytest

import netns
from backends import routed_workers, slot_of, which
from browser import Browser, chromium_missing
from netns import HttpClient, active_workers, http_get, ws_connect

PORT = 8000
ADMIN_PORT = 9000
ADMIN_URL = f"http://127.0.0.1:{ADMIN_PORT}/"
WORKERS = 4
# LeakyThings each old worker keeps: slot 0's is a significant leak
# (ipserve.leaks: 1000 objects or 1 MiB), the others' are not.
REQUESTS = {0: 1200, 1: 300, 2: 300, 3: 300}
PAGE_PATH = os.path.join(netns.REPO_ROOT, "ipserve", "dashboard.html")
LEAKY_APP = os.path.join(netns.REPO_ROOT, "tests", "apps", "leaky.py") + ":application"
ARTIFACTS = os.path.join(netns.REPO_ROOT, "tests", "artifacts")


def artifact(name: str) -> str:
    """Where a screenshot goes: tests/artifacts/ (IPSERVE_TEST_ARTIFACTS to
    choose), or a temporary directory when the checkout is not ours to write."""
    directory = os.environ.get("IPSERVE_TEST_ARTIFACTS", ARTIFACTS)
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError(directory)
    except OSError:
        directory = os.path.join(tempfile.gettempdir(), f"ipserve-test-artifacts-{os.geteuid()}")
        os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, name)
WAIT = 30                            # generous bound for the page to catch up with the master
MIB = 1 << 20


@pytest.fixture(autouse=True)
def _chromium():
    why = chromium_missing()
    if why:
        pytest.skip(why)


# --------------------------------------------------------------------------- #
# Reading the page
# --------------------------------------------------------------------------- #

def rows_in_state(pids, state: str) -> str:
    """JS: every pid has a worker row in `state`."""
    return " && ".join(
        f"!!document.querySelector('tr.worker[data-pid=\"{pid}\"][data-state=\"{state}\"]')"
        for pid in pids) or "true"


def rows_gone(pids) -> str:
    return " && ".join(f"!document.querySelector('tr.worker[data-pid=\"{pid}\"]')"
                       for pid in pids) or "true"


def row_attr(browser: Browser, pid: int, selector: str, attr: str):
    return browser.evaluate(
        f"(() => {{ const n = document.querySelector('tr.worker[data-pid=\"{pid}\"] {selector}');"
        f" return n ? n.getAttribute('{attr}') : null; }})()")


def renders(browser: Browser) -> int:
    return int(browser.evaluate("Number(document.body.dataset.renders || 0)"))


def wait_renders_after(browser: Browser, count: int, what: str) -> None:
    """Wait until the page rendered (at least) twice more than `count`: a fresh
    status was fetched and drawn after whatever the test changed."""
    browser.wait_for(f"Number(document.body.dataset.renders || 0) >= {count + 2}", WAIT, what)


def mark_document(browser: Browser) -> None:
    browser.evaluate("window.__sameDocument = 'yes'")


def assert_same_document(browser: Browser) -> None:
    assert browser.evaluate("window.__sameDocument") == "yes", "the page was reloaded"


def assert_no_page_errors(browser: Browser) -> None:
    assert browser.exceptions == [], browser.exceptions
    assert browser.evaluate("window.ipserveDashboard.errors") == []
    assert browser.console_errors == [], browser.console_errors


# --------------------------------------------------------------------------- #
# A stand-in admin server (no root, no master): the page against documents
# of our choosing
# --------------------------------------------------------------------------- #

def worker_doc(pid: int, slot: int, generation: int, state: str, **extra) -> dict:
    doc = {"pid": pid, "slot": slot, "generation": generation, "serial": pid % 100,
           "port": 40000 + pid % 1000, "state": state, "rss": (50 + slot) * MIB,
           "connections": 10 + slot, "requests": 1000 * (slot + 1), "websockets": slot,
           "lag_ms": 1.5, "too_busy": False, "nice": 10 if state == "retiring" else 0,
           "adopted": False, "replacing": None, "connected": True, "boot_error": None,
           "age_s": 30.0, "retired_for_s": 12.0 if state == "retiring" else None,
           "requests_per_s": 0.0 if state == "retiring" else 25.0 + slot,
           "connections_at_retire": 40 if state == "retiring" else None,
           "responses": {"2xx": 1000 * (slot + 1)}}
    doc.update(extra)
    return doc


def full_status(now: float) -> dict:
    """A status document with every key the master sends (issue 10's shape)."""
    workers = [worker_doc(500 + s, s, 3, "active") for s in range(4)]
    workers += [worker_doc(400, 0, 2, "retiring", connections=10),
                worker_doc(402, 2, 2, "retiring", connections=40),
                worker_doc(600, 1, 3, "booting", rss=20 * MIB, requests_per_s=None)]
    limit = 1024 * MIB
    return {
        "time": now, "name": "web-1", "router": "nft", "routing": {"kind": "nft", "sockets": []},
        "bind": ["0.0.0.0:8000", "[::]:8000"], "app": "shop.wsgi:application",
        "master": {"pid": 42, "generation": 3, "uptime_s": 3700.0, "stopping": None,
                   "serving": True, "adopting": False},
        "reload": {"kind": "deploy", "reason": "reload", "generation": 3, "state": "done",
                   "targets": 4, "booted": 4, "seconds": 0.5, "error": None, "failed_pid": None},
        "replacements": [], "slots": 4,
        "slot_table": [{"slot": s, "waiting_s": None, "refusing": False} for s in range(4)],
        "routes": {str(s): 40500 + s for s in range(4)}, "route_error": None,
        "workers": workers,
        "memory": {"cluster_rss": sum(w["rss"] for w in workers), "cluster_limit": limit,
                   "retire_at": int(0.8 * limit), "kill_at": int(0.95 * limit),
                   "worker_limit": None},
        "reloads": [
            {"generation": 2, "reason": "reload", "state": "failed", "started": now - 900,
             "seconds": 3.1, "error": "ImportError: no module named shop", "failed_pid": 399},
            {"generation": 3, "reason": "reload", "state": "done", "started": now - 40,
             "seconds": 0.5, "error": None, "failed_pid": None}],
        "counters": {"requests": 1234567,
                     "responses": {"1xx": 0, "2xx": 1200000, "3xx": 30000, "4xx": 4500, "5xx": 67},
                     "duration": {"bounds": [0.005, 1.0], "counts": [10, 5, 0], "sum": 1.0,
                                  "count": 15},
                     "shed": 7, "worker_exits": {"retired": 4, "memory": 1, "busy": 0,
                                                 "max_requests": 0, "hung": 0, "crashed": 0},
                     "reloads": {"ok": 2, "failed": 1},
                     "reload_duration": {"bounds": [1.0], "counts": [2, 0], "sum": 1.0, "count": 2}},
        "leak_reports": [
            {"pid": 300, "slot": 0, "generation": 1, "mode": "types", "at": now - 600,
             "lifetime_s": 3000.0, "requests": 5000, "significant": False,
             "growth": [{"what": "builtins.dict", "count": 3, "size": 960}], "error": None},
            {"pid": 401, "slot": 1, "generation": 2, "mode": "types", "at": now - 5,
             "lifetime_s": 3650.0, "requests": 90000, "significant": True,
             "growth": [{"what": "leaky.LeakyThing", "count": 90000, "size": 52_000_000},
                        {"what": "builtins.bytearray", "count": 90000, "size": 50_000_000}],
             "error": None}],
    }


def older_master_status(now: float) -> dict:
    """What a master from before issue 10 sends: none of the new keys."""
    st = full_status(now)
    for key in ("time", "memory", "reloads", "counters", "leak_reports"):
        del st[key]
    for w in st["workers"]:
        for key in ("requests_per_s", "connections_at_retire", "responses"):
            del w[key]
    return st


class StandIn:
    """GET / (the page, never behind the token: it holds no data), /status.json
    and /series.json from `self.status`; with a token, the JSON needs
    `Authorization: Bearer <token>` as the admin endpoint does."""

    def __init__(self, token: str | None = None):
        self.status: dict = full_status(time.time())
        self.token = token
        with open(PAGE_PATH, "rb") as f:
            page = f.read()
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path == "/":
                    return self.answer(200, page, "text/html; charset=utf-8")
                if stand_in.token and self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    return self.answer(401, b"unauthorized\n", "text/plain")
                if path == "/status.json":
                    doc = dict(stand_in.status, time=time.time()) if isinstance(
                        stand_in.status, dict) and "time" in stand_in.status else stand_in.status
                    return self.answer(200, json.dumps(doc).encode(), "application/json")
                if path == "/series.json":
                    pids = [w.get("pid") for w in stand_in.status.get("workers") or []
                            if isinstance(w, dict)] if isinstance(stand_in.status, dict) else []
                    doc = {"interval_s": 2.0, "workers": {
                        str(pid): {"rss": [MIB * (40 + i % 7) for i in range(60)],
                                   "lag_ms": [float(i % 5) for i in range(60)]} for pid in pids}}
                    return self.answer(200, json.dumps(doc).encode(), "application/json")
                return self.answer(404, b"not found\n", "text/plain")

            def answer(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def stand_in():
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def browser():
    """Chromium in this process's namespace (the stand-in listens here)."""
    with Browser(None) as b:
        yield b


def test_every_section_renders_a_full_status(stand_in, browser):
    """Workers by slot (retiring ones under their slot, with drain progress),
    header, reload, memory watermarks, counters, reload history and leak reports."""
    browser.navigate(stand_in.url)
    browser.wait_for("Number(document.body.dataset.renders || 0) >= 2", WAIT, "two renders")
    st = stand_in.status
    text = browser.text()
    for w in st["workers"]:
        assert browser.evaluate(rows_in_state([w["pid"]], w["state"])), w
        assert str(w["pid"]) in text
    order = browser.evaluate("[...document.querySelectorAll('tr.worker')].map("
                             "r => [Number(r.dataset.slot), r.dataset.state])")
    assert order == [[0, "active"], [0, "retiring"], [1, "active"], [1, "booting"],
                     [2, "active"], [2, "retiring"], [3, "active"]]
    assert row_attr(browser, 400, ".drain", "data-drained") == "0.750"     # 1 - 10/40
    assert row_attr(browser, 402, ".drain", "data-drained") == "0.000"
    for words in ("web-1", "shop.wsgi:application", "0.0.0.0:8000, [::]:8000", "1,234,567",
                  "reload to generation 3 done", "80%", "95%", "ImportError: no module named shop",
                  "leaky.LeakyThing", "+90,000", "significant growth"):
        assert words in text, words
    assert browser.evaluate("document.getElementById('memory').dataset.limit") == "set"
    assert browser.evaluate("document.querySelectorAll('#reloads tr.reload-row').length") == 2
    significant = browser.evaluate("[...document.querySelectorAll('#leaks .leak')].map("
                                   "l => [Number(l.dataset.pid), l.dataset.significant])")
    assert significant == [[401, "true"], [300, "false"]]                  # newest first
    assert browser.evaluate("document.getElementById('updated').dataset.state") == "ok"
    assert_no_page_errors(browser)
    browser.screenshot(artifact("dashboard-sample.png"))


def test_an_older_master_and_garbage_show_dashes(stand_in, browser):
    """Keys missing (a master from before issue 10) or of the wrong type: the
    page never throws, shows "–" where it has nothing, and keeps updating."""
    stand_in.status = older_master_status(time.time())
    browser.navigate(stand_in.url)
    browser.wait_for("Number(document.body.dataset.renders || 0) >= 1", WAIT, "a first render")
    mark_document(browser)
    for w in stand_in.status["workers"]:
        assert browser.evaluate(rows_in_state([w["pid"]], w["state"])), w
    assert row_attr(browser, 500, ".rate", "class") is not None
    assert browser.evaluate("document.querySelector('tr.worker[data-pid=\"500\"] .rate')"
                            ".textContent") == "\u2013"
    text = browser.text()
    assert "not reported by this master" in text
    assert browser.evaluate("document.getElementById('memory').dataset.limit") == "none"
    assert_no_page_errors(browser)

    count = renders(browser)
    stand_in.status = {"name": ["not", "a", "string"], "master": "x", "slots": "four",
                       "workers": [None, 5, "w", {"pid": "x"}, {"pid": 7, "state": 3, "slot": None}],
                       "memory": "big", "counters": [], "reloads": {"a": 1},
                       "leak_reports": [None, {"growth": "no", "significant": "yes"}],
                       "reload": {"state": None}, "bind": "0.0.0.0:80", "slot_table": 3}
    wait_renders_after(browser, count, "renders of a garbage status")
    assert_same_document(browser)
    assert_no_page_errors(browser)
    assert browser.evaluate("document.getElementById('updated').dataset.state") == "ok"

    count = renders(browser)
    stand_in.status = full_status(time.time())
    wait_renders_after(browser, count, "renders of a good status after garbage")
    assert browser.evaluate(rows_in_state([500, 501, 502, 503], "active"))
    assert browser.exceptions == [], browser.exceptions


def test_app_controlled_strings_stay_text(stand_in, browser):
    """Error messages and leak report names are the application's: shown as
    text, never parsed as HTML."""
    payload = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    st = full_status(time.time())
    st["reload"] = {"reason": "reload", "generation": 4, "state": "failed", "targets": 4,
                    "booted": 1, "seconds": 2.0, "error": payload, "failed_pid": 700}
    st["reloads"][0]["error"] = payload
    st["workers"][0]["boot_error"] = payload
    st["workers"][1]["replacing"] = payload
    st["leak_reports"][1]["growth"][0]["what"] = payload
    st["leak_reports"][1]["error"] = payload
    st["route_error"] = payload
    st["name"] = "<b>web</b>"
    stand_in.status = st
    browser.navigate(stand_in.url)
    browser.wait_for("Number(document.body.dataset.renders || 0) >= 2", WAIT, "two renders")
    assert browser.evaluate("document.querySelectorAll('img, main script, b > b').length") == 0
    assert browser.evaluate("typeof window.__pwned") == "undefined"
    text = browser.text()
    assert text.count(payload) >= 6, text
    assert "<b>web</b>" in text
    assert browser.evaluate("document.getElementById('reload').dataset.state") == "failed"
    assert_no_page_errors(browser)


def test_connection_lost_is_said(stand_in, browser):
    """The admin endpoint goes away: the header says "connection lost", and
    the last data stays on the page."""
    browser.navigate(stand_in.url)
    browser.wait_for("document.getElementById('updated').dataset.state === 'ok'", WAIT,
                     "a first successful update")
    assert "updated" in browser.evaluate("document.getElementById('updated').innerText")
    stand_in.close()
    browser.wait_for("document.getElementById('updated').dataset.state === 'lost'", WAIT,
                     "the connection-lost indicator")
    assert "connection lost" in browser.evaluate("document.getElementById('updated').innerText")
    assert browser.evaluate(rows_in_state([500, 501, 502, 503], "active"))
    assert browser.exceptions == [], browser.exceptions


def test_token_in_the_address_is_sent_as_a_bearer_header(browser):
    """With a token the JSON needs `Authorization: Bearer`: without ?token= (or
    with a wrong one) the page says 401 and how to open it; with it, it works."""
    token = secrets.token_urlsafe(24)
    server = StandIn(token=token)
    try:
        for url in (server.url, server.url + "?token=wrong-token-0123456789"):
            browser.navigate(url)
            browser.wait_for("document.getElementById('updated').dataset.state === 'unauthorized'",
                             WAIT, f"the 401 message at {url}")
            message = browser.evaluate("document.getElementById('auth-error').innerText")
            assert browser.evaluate("!document.getElementById('auth-error').hidden")
            assert "401" in message and "?token=" in message, message
            assert token not in browser.text()
        browser.navigate(server.url + "?token=" + token)
        browser.wait_for(rows_in_state([500, 501, 502, 503], "active"), WAIT,
                         "workers with the right token")
        assert browser.evaluate("document.getElementById('auth-error').hidden")
        assert token not in browser.text()
    finally:
        server.close()


# --------------------------------------------------------------------------- #
# The real ipserve
# --------------------------------------------------------------------------- #

def admin_missing() -> str | None:
    if importlib.util.find_spec("ipserve.master.admin") is None:
        return "the admin endpoint (ipserve/master/admin.py) is not built yet"
    return None


def leak_reports_built() -> bool:
    """Whether workers send leak reports yet (built by another change: the
    worker's leak check and the master's handling of its report)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("ipserve.worker.leakcheck", "ipserve.master.leakreports"))


@pytest.fixture
def real_ipserve(ipserve):
    """The `ipserve` factory, once root, nft and the admin endpoint are there."""
    if not which("nft"):
        pytest.skip("nft is not installed")
    why = admin_missing()
    if why:
        pytest.skip(why)
    return ipserve


def admin_get(srv, path: str, token: str | None = None) -> tuple[int, dict, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http_get(srv.ns, None, "127.0.0.1", ADMIN_PORT, path, headers=headers, timeout=10)


def admin_status(srv, token: str | None = None) -> dict:
    status, _, body = admin_get(srv, "/status.json", token)
    assert status == 200, (status, body[:300])
    return json.loads(body)


def serve(ipserve, workers: int, extra=()):
    """ipserve (nft, leaky app) with the admin endpoint on 127.0.0.1:9000 of
    the server namespace; waited for until every slot is routed to its own
    worker and /status.json shows them. Returns (process, {slot: worker})."""
    srv = ipserve([LEAKY_APP, "-w", str(workers), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
                   "--admin-bind", f"127.0.0.1:{ADMIN_PORT}", "--graceful-timeout", "5",
                   *map(str, extra)])
    st = srv.wait_for(lambda st: routed_workers(st, workers) is not None, timeout=60,
                      what=f"{workers} slots routed to their own active workers")
    return srv, routed_workers(st, workers)


def wait_admin(srv, predicate, what: str, token: str | None = None) -> dict:
    """Poll /status.json (published about once a second) until predicate holds."""
    deadline = time.monotonic() + WAIT
    while True:
        with contextlib.suppress(OSError):
            st = admin_status(srv, token)
            if predicate(st):
                return st
        if time.monotonic() > deadline:
            raise AssertionError(f"/status.json never showed {what} within {WAIT}s")
        time.sleep(0.1)


def slot_addr(tb, slot: int, workers: int) -> str:
    return next(ip for ip in tb.client_ips if slot_of(ip, workers) == slot)


def test_dashboard_follows_a_reload(testbed, real_ipserve):
    """Every active worker on the page; after `kill -HUP`, without reloading the
    page, the new generation active and the old one retiring under its slots,
    draining as its WebSockets end; the leak reports of the drained workers
    (LeakyThing grew by every request they served). Screenshot:
    tests/artifacts/dashboard-reload.png."""
    tb = testbed
    srv, table = serve(real_ipserve, WORKERS)
    old = {slot: w["pid"] for slot, w in table.items()}
    held: dict[int, list] = {}
    try:
        # Every old worker serves requests (each keeps a LeakyThing), then holds
        # two WebSockets: what keeps it draining once it retires.
        for slot, pid in old.items():
            src = slot_addr(tb, slot, WORKERS)
            with HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=10) as client:
                for _ in range(REQUESTS[slot]):
                    assert client.json("/")["pid"] == pid
            held[slot] = []
            for _ in range(2):
                ws = ws_connect(tb.client_ns, src, tb.server_ip, PORT)
                held[slot].append(ws)
                ws.send("hi")
                assert ws.recv() == "hi"

        with Browser(srv.ns) as browser:
            browser.navigate(ADMIN_URL)
            st = wait_admin(srv, lambda st: sorted(w["pid"] for w in active_workers(st))
                            == sorted(old.values()), "the first generation active")
            browser.wait_for(rows_in_state(old.values(), "active"), WAIT,
                             "every active worker of /status.json on the page")
            text = browser.text()
            for w in active_workers(st):
                assert str(w["pid"]) in text
            generation = st["master"]["generation"]
            mark_document(browser)

            srv.send_signal(signal.SIGHUP)
            st = srv.wait_for(lambda st: routed_workers(st, WORKERS, generation + 1) is not None,
                              timeout=60, what=f"generation {generation + 1} routed")
            new = {slot: w["pid"] for slot, w in routed_workers(st, WORKERS).items()}
            browser.wait_for(f"({rows_in_state(new.values(), 'active')}) && "
                             f"({rows_in_state(old.values(), 'retiring')})", WAIT,
                             "the new generation active and the old one retiring")
            assert_same_document(browser)
            for slot in range(WORKERS):
                slot_rows = browser.evaluate(
                    f"[...document.querySelectorAll('tr.worker[data-slot=\"{slot}\"]')]"
                    ".map(r => [Number(r.dataset.pid), r.dataset.state])")
                assert slot_rows == [[new[slot], "active"], [old[slot], "retiring"]], slot_rows
            browser.wait_for("document.getElementById('reload').dataset.state === 'done' && "
                             f"document.getElementById('generation').textContent === '{generation + 1}'",
                             WAIT, "the reload shown as done")

            # Slots 0 and 1 let go of everything: their old workers drain and
            # exit. Slot 2 keeps one WebSocket of two, slot 3 both.
            for slot in (0, 1):
                while held[slot]:
                    held[slot].pop().close()
            held[2].pop().close()
            gone = [old[0], old[1]]
            st = srv.wait_for(lambda st: not any(w["pid"] in gone for w in st["workers"])
                              and any(w["pid"] == old[2] and w["connections"] == 1
                                      for w in st["workers"]),
                              timeout=60, what="slots 0 and 1 drained, slot 2 half drained")
            half = next(w for w in st["workers"] if w["pid"] == old[2])
            expected = 1 - half["connections"] / half["connections_at_retire"]
            browser.wait_for(f"({rows_gone(gone)}) && document.querySelector("
                             f"'tr.worker[data-pid=\"{old[2]}\"] .drain')?.dataset.drained === "
                             f"'{expected:.3f}'", WAIT, "the drained workers gone, slot 2's drain bar")
            assert browser.evaluate(rows_in_state([old[2], old[3]], "retiring"))

            if leak_reports_built():
                st = srv.wait_for(lambda st: {r.get("pid") for r in st.get("leak_reports") or []}
                                  >= set(gone), timeout=60, what="leak reports of the drained workers")
                reports = [r for r in st["leak_reports"] if r.get("pid") in gone]
                browser.wait_for(" && ".join(f"!!document.querySelector('#leaks .leak[data-pid=\"{pid}\"]')"
                                             for pid in gone), WAIT, "the leak reports on the page")
                for report in reports:
                    card = browser.evaluate(
                        f"(() => {{ const c = document.querySelector('#leaks .leak[data-pid=\"{report['pid']}\"]');"
                        " return [c.dataset.significant, c.innerText]; })()")
                    assert card[0] == ("true" if report.get("significant") else "false"), (report, card)
                    for growth in (report.get("growth") or [])[:6]:
                        assert growth["what"] in card[1], (growth, card[1])
                if any(r.get("mode") == "types" for r in reports):
                    assert "LeakyThing" in browser.evaluate(
                        "document.getElementById('leaks').innerText")
            browser.screenshot(artifact("dashboard-reload.png"))
            assert_same_document(browser)
            assert_no_page_errors(browser)
            if not leak_reports_built():
                pytest.skip("leak reports are not built yet (no worker sends \"leak-report\"): "
                            "the screenshot has no leak report")
    finally:
        for sockets in held.values():
            for ws in sockets:
                with contextlib.suppress(Exception):
                    ws.close()


def test_dashboard_with_an_admin_token(testbed, real_ipserve):
    """With admin_token: the page, opened without ?token=, says 401 and how to
    open it; with ?token=<token> it shows the workers. The token never shows."""
    token = secrets.token_urlsafe(24)
    srv, table = serve(real_ipserve, 2, extra=["--admin-token", token])
    assert admin_get(srv, "/status.json")[0] == 401
    # A browser cannot add a header to the address it opens: the page itself
    # (no data in it) must load without the token, then send ?token= as the
    # Bearer header of its fetches.
    status, _, body = admin_get(srv, "/")
    assert status == 200 and b"ipserveDashboard" in body, (
        f"GET / without the token answered {status}: the dashboard, which holds no data, must "
        "be served without it, or no browser can open it (it sends ?token= on its fetches)")
    pids = [w["pid"] for w in table.values()]
    wait_admin(srv, lambda st: sorted(w["pid"] for w in active_workers(st)) == sorted(pids),
               "both workers active", token=token)
    with Browser(srv.ns) as browser:
        browser.navigate(ADMIN_URL)
        browser.wait_for("document.getElementById('updated').dataset.state === 'unauthorized'",
                         WAIT, "the 401 message without a token")
        message = browser.evaluate("document.getElementById('auth-error').innerText")
        assert "401" in message and "?token=" in message, message
        browser.navigate(f"{ADMIN_URL}?token={token}")
        browser.wait_for(rows_in_state(pids, "active"), WAIT, "the workers with the token")
        assert browser.evaluate("document.getElementById('auth-error').hidden")
        assert token not in browser.text()
        assert_no_page_errors(browser)
