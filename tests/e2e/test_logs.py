"""End-to-end tests of the logs: access_log_format's atoms, escaping, a
timezone-aware time in both logs, and log_format = "json" for the master's and
the workers' error log and the access log, across a HUP and a USR2.

The real `ipserve` runs in the testbed's server namespace; clients are in the
client namespace, so the access log must show their real addresses. Waits are
bounded polls of the log files; nothing compares durations.
"""

from __future__ import annotations

import datetime
import json
import re
import signal
import subprocess
import time

import netns
from backends import routed_workers

PORT = 8000

CLF = re.compile(r'^(?P<addr>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) '
                 r"(?P<sent>\d+|-)$")
TEXT_ERROR = re.compile(r"^\[(?P<time>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} [+-]\d{4})\] \[(?P<pid>\d+)\] "
                        r"\[(?P<level>[A-Z]+)\] (?P<message>.*)$")
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")
ACCESS_KEYS = {"time", "remote_addr", "method", "path", "query", "protocol", "status", "bytes",
               "duration_s", "referer", "user_agent", "pid", "message"}

# A tiny app: /boom raises (a traceback in the error log), anything else is 200.
APP = '''
import json, os

def application(environ, start_response):
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("boom\\nsecond line")
    body = json.dumps({"pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


def serve(ipserve, app: str = netns.PROBE_APP, extra=(), env=None):
    srv = ipserve([app, "-w", "2", "-b", f"0.0.0.0:{PORT}", "--graceful-timeout", "3",
                   *map(str, extra)], env=env)
    srv.wait_for(lambda st: routed_workers(st, 2) is not None, timeout=60, what="2 routed workers")
    return srv


def wait_lines(path, count: int, timeout: float = 15) -> list[str]:
    """The log's lines once it has at least `count` (workers write as they answer)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"{path} has {len(lines)} lines, expected {count}:\n" + \
            "\n".join(lines)
        time.sleep(0.1)


def raw_request(tb, src: str, data: bytes) -> bytes:
    """Send `data` as is; the whole answer (the server closes after a refusal)."""
    with netns.tcp_connect(tb.client_ns, src, tb.server_ip, PORT, timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_default_format_is_clf_with_the_client_address_and_zone(testbed, ipserve, tmp_path):
    log = tmp_path / "access.log"
    # A half-hour zone east of UTC (a POSIX rule: no tz database needed).
    srv = serve(ipserve, extra=["--access-log", log], env={"TZ": "XYZ-5:30"})
    sources = testbed.client_ips[:4]
    before = int(time.time())
    for src in sources:
        status, _, body = testbed.http_get(src, "/whoami?x=1", port=PORT)
        assert status == 200
    after = time.time()
    lines = wait_lines(log, len(sources))
    seen = []
    for line in lines:
        match = CLF.match(line)
        assert match, f"not the common log format: {line!r}"
        seen.append(match["addr"])
        assert match["request"] == "GET /whoami?x=1 HTTP/1.1" and match["status"] == "200", line
        assert int(match["sent"]) == len(body)
        # [10/Oct/2000:13:55:36 -0700]: the instant of the request, in the server's zone.
        when = datetime.datetime.strptime(match["time"], "%d/%b/%Y:%H:%M:%S %z")
        assert before <= when.timestamp() <= after, (line, before, after)
        assert match["time"].endswith(" +0530"), line
    assert sorted(seen) == sorted(sources)
    # The error log (standard error) carries the same zone, in its own style.
    ready = [TEXT_ERROR.match(line) for line in srv.own_lines() if "ready on port" in line]
    assert len(ready) == 2 and all(ready), srv.own_lines()
    assert all(match["time"].endswith(" +0530") for match in ready), srv.own_lines()


def test_custom_format_and_escaping(testbed, ipserve, tmp_path):
    log = tmp_path / "access.log"
    fmt = "%(a)s|%(D)s|%({x-test}i)s|%({content-type}o)s|%(r)s|%({path_info}e)s"
    srv = serve(ipserve, extra=["--access-log", log, "--access-log-format", fmt])
    src = testbed.client_ips[0]
    status, _, _ = testbed.http_get(src, "/whoami", port=PORT,
                                    headers={"User-Agent": 'probe "1" \\ x', "X-Test": "hello"})
    assert status == 200
    # Percent-decoding puts ESC, CR, LF, " and \ in PATH_INFO; the target keeps a raw " and \.
    status, _, _ = testbed.http_get(src, '/x%1b%0d%0a%22%5c?q="\\', port=PORT)
    assert status == 404
    first = wait_lines(log, 2)
    # Raw ESC, CR or LF never reach the log: the parser refuses the request (400).
    for hostile in (b"GET /a\x1b[2Jb HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x1b[2Jb\r\n\r\n",
                    b'GET /a HTTP/1.1\r\nHost: x\r\nUser-Agent: a\r\n1.2.3.4 - - "forged"\r\n\r\n'):
        assert raw_request(testbed, src, hostile).startswith(b"HTTP/1.1 400 "), hostile
    status, _, _ = testbed.http_get(src, "/whoami?last", port=PORT)
    lines = wait_lines(log, 3)
    assert lines[:2] == first and len(lines) == 3, lines

    agent, micros, x_test, content_type, request, path_info = lines[0].split("|")
    assert (agent, x_test, content_type, request, path_info) == (
        'probe \\"1\\" \\\\ x', "hello", "application/json", "GET /whoami HTTP/1.1", "/whoami")
    assert micros.isdigit()
    agent, micros, x_test, content_type, request, path_info = lines[1].split("|")
    assert (agent, x_test, content_type) == ("-", "-", "text/plain; charset=utf-8")
    assert request == 'GET /x%1b%0d%0a%22%5c?q=\\"\\\\ HTTP/1.1'
    assert path_info == '/x\\x1b\\r\\n\\"\\\\'
    assert lines[2].endswith("|GET /whoami?last HTTP/1.1|/whoami")
    assert all(0x20 <= b < 0x7f for b in log.read_bytes().replace(b"\n", b"")), "only printable ASCII"
    assert srv.running()


def test_json_logs_are_one_object_per_line_across_hup_and_usr2(testbed, ipserve, tmp_path):
    app = tmp_path / "jsonapp.py"
    app.write_text(APP)
    log = tmp_path / "access.log"
    srv = serve(ipserve, app=f"{app}:application",
                extra=["--access-log", log, "--log-format", "json"])
    first_pids = {w["pid"] for w in srv.status()["workers"]}
    sources = testbed.client_ips[:2]
    for src in sources:
        assert testbed.http_get(src, "/hello?a=1", port=PORT,
                                headers={"User-Agent": 'ua "x"', "Referer": "http://r/"})[0] == 200
    assert testbed.http_get(sources[0], "/boom", port=PORT)[0] == 500

    srv.send_signal(signal.SIGHUP)
    srv.wait_for(lambda st: routed_workers(st, 2, generation=2) is not None, timeout=60,
                 what="generation 2 routed")
    srv.wait_workers_gone(30, pids=first_pids)
    second_pids = {w["pid"] for w in srv.status()["workers"]} - first_pids
    # logrotate, then USR2: each worker reopens the access log when the master's
    # order reaches it; until then its lines still go to the old file.
    rotated = tmp_path / "access.log.1"
    log.rename(rotated)
    srv.send_signal(signal.SIGUSR2)
    srv.wait_log("log files reopened")
    deadline = time.monotonic() + 15
    while not (log.exists() and {json.loads(line)["pid"] for line in log.read_text().splitlines()}
               == second_pids):
        assert time.monotonic() < deadline, "no worker of generation 2 writes the reopened log"
        for src in sources:
            assert testbed.http_get(src, "/after", port=PORT)[0] == 200
        time.sleep(0.1)

    entries = [json.loads(line) for line in rotated.read_text().splitlines()
               + log.read_text().splitlines()]
    for entry in entries:
        assert set(entry) == ACCESS_KEYS, entry
        assert ISO.match(entry["time"]) and entry["protocol"] == "HTTP/1.1"
        assert entry["remote_addr"] in sources and entry["method"] == "GET"
        assert isinstance(entry["duration_s"], float) and isinstance(entry["bytes"], int)
    hello = [e for e in entries if e["path"] == "/hello"]
    assert len(hello) == 2 and {e["remote_addr"] for e in hello} == set(sources)
    assert all(e["query"] == "a=1" and e["status"] == 200 and e["user_agent"] == 'ua "x"'
               and e["referer"] == "http://r/" and e["pid"] in first_pids for e in hello)
    assert hello[0]["message"].endswith('"GET /hello?a=1 HTTP/1.1" 200 ' + str(hello[0]["bytes"]))
    [boom] = [e for e in entries if e["path"] == "/boom"]
    assert boom["status"] == 500
    after = [e for e in entries if e["path"] == "/after"]
    assert len(after) == len(entries) - 3 and all(e["pid"] in second_pids for e in after)

    # The error log (standard error, master and workers): nothing but JSON objects.
    errors = [json.loads(line) for line in srv.own_lines()]
    for entry in errors:
        assert {"time", "level", "pid", "logger", "message"} <= set(entry), entry
        assert ISO.match(entry["time"]), entry
    by_pid = {}
    for entry in errors:
        by_pid.setdefault(entry["pid"], []).append(entry)
    assert srv.pid in by_pid, "the master's lines"
    for pid in first_pids | second_pids:
        assert any("ready on port" in e["message"] for e in by_pid.get(pid, [])), pid
    [crash] = [e for e in errors if "exc_info" in e]
    assert crash["level"] == "error" and "/boom" in crash["message"]
    assert crash["exc_info"].startswith("Traceback") and "RuntimeError: boom\nsecond line" in crash["exc_info"]


def test_bad_access_log_format_exits_2_naming_it(testbed, ipserve):
    srv = ipserve([netns.PROBE_APP, "-w", "2", "-b", f"0.0.0.0:{PORT}",
                   "--access-log-format", "%(h)s %(nope)s"])
    try:
        code = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        raise srv.error("ipserve did not exit") from None
    assert code == 2, srv.log_tail()
    lines = srv.own_lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ipserve: error: access_log_format = '%(h)s %(nope)s'"), lines
    assert "unknown atom %(nope)s" in lines[0]
    assert netns.ns_pids(testbed.server_ns) == [], "nothing started"


def test_a_reload_switches_the_masters_error_log_to_json_too(testbed, ipserve, tmp_path):
    conf = tmp_path / "ipserve.toml"
    conf.write_text('log_format = "text"\n')
    srv = serve(ipserve, extra=["-c", conf])
    conf.write_text('log_format = "json"\n')
    srv.send_signal(signal.SIGHUP)
    srv.wait_for(lambda st: routed_workers(st, 2, generation=2) is not None, timeout=60,
                 what="generation 2 routed")
    srv.wait_log("generation 2 is ready on every slot")
    lines = srv.own_lines()
    switched = next(i for i, line in enumerate(lines) if "generation 2 is ready on every slot" in line)
    assert f"] [{srv.pid}] [INFO]" in lines[0], lines[0]          # text before the reload
    master_json = 0
    for line in lines[switched:]:
        if line.startswith("{"):
            master_json += json.loads(line)["pid"] == srv.pid
        else:   # the old generation keeps the format it started with
            assert f"] [{srv.pid}] [" not in line, f"the master still writes text: {line}"
    assert master_json, "the master's lines after the switch"
