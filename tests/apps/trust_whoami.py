"""WSGI app for tests/e2e/test_trust.py: who imports it, with which privileges.

At import, if $TRUST_WHOAMI_OUT names a file, appends one JSON line to it:
{"pid", "uid", "euid", "gid", "check": true for `python -m ipserve.worker
--check`, "caps": {"CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"} as ints}.
Serves GET / like the probe app: JSON {"pid", "remote_addr", "worker"}.
Standard library only (wsgi_validate.py, beside it, when there: requests
run under wsgiref.validate either way).
"""

import json
import os
import sys

try:
    from wsgi_validate import validated          # tests/apps/ is on sys.path
except ModuleNotFoundError:                      # a copy elsewhere (no WebSocket routes here)
    from wsgiref.validate import validator as validated


def _capabilities() -> dict:
    caps = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key.startswith("Cap"):
                caps[key] = int(value.strip(), 16)
    return caps


def _record() -> None:
    path = os.environ.get("TRUST_WHOAMI_OUT")
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "uid": os.getuid(), "euid": os.geteuid(),
                       "gid": os.getgid(), "check": "--check" in sys.argv,
                       "caps": _capabilities()})
    # One write of one line with O_APPEND: lines of concurrent importers never mix.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_record()


def _application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "remote_addr": environ.get("REMOTE_ADDR"),
                       "worker": environ.get("ipserve.worker")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
