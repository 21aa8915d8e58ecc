"""An app that keeps ~200 MiB resident from import on (tests of the capacity refusal).

Every page of BLOB is written (non-zero fill), so the check process's RSS
really includes it; a zero-filled bytearray could stay unmapped.
"""

import json
import os

try:
    from wsgi_validate import validated          # tests/apps/ is on sys.path
except ModuleNotFoundError:                      # a copy elsewhere (no WebSocket routes here)
    from wsgiref.validate import validator as validated

MIB = 1 << 20
BLOB = bytearray(b"\xa5") * (200 * MIB)


def _application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "blob_mib": len(BLOB) // MIB}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


application = validated(_application)
