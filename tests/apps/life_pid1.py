"""App that leaves an orphan behind: GET /orphan runs `sh -c 'sleep S & echo $!'`
and waits for the shell only, so the `sleep` it started in the background
outlives its parent and is re-parented to the nearest init (with the master
as PID 1 of a PID namespace: the master), which must reap it when it exits.
Answers JSON {"orphan": <pid of the sleep, as this namespace numbers it>,
"pid": <this worker's pid>}. Other routes are the probe app's.
"""

import json
import os
import subprocess
from urllib.parse import parse_qs

from probe import _application as probe_application
from probe import validated


def _application(environ, start_response):
    if environ.get("PATH_INFO", "/") != "/orphan":
        return probe_application(environ, start_response)
    seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["0.3"])[0])
    script = f"sleep {seconds} </dev/null >/dev/null 2>&1 & echo $!"
    out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=10,
                         stdin=subprocess.DEVNULL, check=True).stdout
    body = json.dumps({"orphan": int(out.split()[0]), "pid": os.getpid()}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
