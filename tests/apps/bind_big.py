"""An app that keeps ~200 MiB resident from import on (tests of the capacity refusal).

Every page of BLOB is written (non-zero fill), so the check process's RSS
really includes it; a zero-filled bytearray could stay unmapped.
"""

import json
import os

MIB = 1 << 20
BLOB = bytearray(b"\xa5") * (200 * MIB)


def application(environ, start_response):
    body = json.dumps({"pid": os.getpid(), "blob_mib": len(BLOB) // MIB}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
