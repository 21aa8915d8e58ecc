"""The smallest app: says which worker answered and who you are.

    ipserve examples/hello.py:application -w 2 -b 127.0.0.1:8000
    curl http://127.0.0.1:8000/
"""

import os


def application(environ, start_response):
    worker = environ.get("ipserve.worker", {})
    body = (f"Hello from worker pid {os.getpid()} (slot {worker.get('slot')}, "
            f"generation {worker.get('generation')}); you are {environ['REMOTE_ADDR']}\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
