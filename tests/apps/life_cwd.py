"""App answering every request with the worker's working directory and pid:
JSON {"cwd", "pid", "worker"}. /block and the other probe routes are the
probe app's."""

import json
import os

from probe import _application as probe_application
from probe import validated


def _application(environ, start_response):
    if environ.get("PATH_INFO", "/") != "/cwd":
        return probe_application(environ, start_response)
    body = json.dumps({"cwd": os.getcwd(), "pid": os.getpid(),
                       "worker": environ.get("ipserve.worker")}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
