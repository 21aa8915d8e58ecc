"""The access log: one line per request, with the real client address, the
request line, the status and the bytes of the body sent."""

from __future__ import annotations

import os
import re
import time

import netns
from backends import routed_workers

PORT = 8000

# The default access_log_format: the common log format (test_logs.py checks its fields).
LINE = re.compile(r'^(?P<addr>\S+) - - \[[^\]]+\] "(?P<method>\S+) (?P<target>\S+) HTTP/(?P<version>1\.[01])" '
                  r"(?P<status>\d{3}) (?P<sent>\d+)$")


def test_access_log_has_a_line_per_request(testbed, ipserve, tmp_path):
    log = tmp_path / "access.log"
    srv = ipserve([netns.PROBE_APP, "-w", "2", "-b", f"0.0.0.0:{PORT}", "--access-log", str(log)])
    srv.wait_for(lambda st: routed_workers(st, 2) is not None, timeout=60, what="2 routed workers")
    sources = testbed.client_ips[:4]
    expected = []
    for src in sources:
        status, _, body = testbed.http_get(src, "/whoami?x=1", port=PORT)
        expected.append((src, "GET", "/whoami?x=1", str(status), len(body)))
        status, _, body = testbed.http_get(src, "/no-such-page", port=PORT)
        expected.append((src, "GET", "/no-such-page", str(status), len(body)))
    # Workers write their lines as they answer; wait until all are there.
    deadline = time.monotonic() + 10
    while not (log.exists() and len(log.read_text().splitlines()) >= len(expected)):
        assert time.monotonic() < deadline, f"not an access-log line per request:\n{log.read_text()}"
        time.sleep(0.1)
    lines = log.read_text().splitlines()
    seen = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"unexpected access-log line: {line!r}"
        seen.append((match["addr"], match["method"], match["target"], match["status"], int(match["sent"])))
    assert sorted(seen) == sorted(expected)
    assert {s for s in seen if s[3] == "404"}, "the 404s are logged too"
    assert os.stat(log).st_size > 0
