"""A plain Flask application for the framework end-to-end tests
(tests/e2e/test_frameworks.py), served unchanged by ipserve.

Every JSON answer carries "pid" (the worker process), "remote_addr" and
"worker" (environ["ipserve.worker"]), so a test can tell which worker of which
slot answered which client.

Routes:
  GET  /hello/<name>/<int:n>?greeting=..&tag=..&tag=..   path and query parameters
  POST /form        application/x-www-form-urlencoded, echoed (repeated keys kept)
  POST /upload      multipart/form-data: field "file" (+ "note"); answers its
                    size and SHA-256, computed here
  POST /json        a JSON object {"text", "numbers"}: answers it, its sum, text upper-cased
  GET  /stream?n=N[&gate=G]
                    a streamed response (a generator, no Content-Length): first a
                    JSON line (who answers), then "chunk 0\\n" .. "chunk N-1\\n".
                    With gate=G, chunk i is produced only after POST /release?gate=G
                    (one release per chunk): the client proves it received
                    each chunk before the next one existed. Gates live in this
                    process: a release must reach the same worker as the stream.
  POST /release?gate=G   lets gate G's stream produce its next chunk (404 if
                    this process has no such gate)
Use it as ``tests/apps/fw_flask.py:app``.
"""

from __future__ import annotations

import hashlib
import json
import os

import gevent.queue
from flask import Flask, Response, abort, jsonify, request
from wsgi_validate import validated    # tests/apps/ is on sys.path (APP given as a path)

app = Flask(__name__)

GATE_WAIT = 30          # seconds a gated stream waits for a release before giving up

_gates: dict[str, gevent.queue.Queue] = {}


def _who() -> dict:
    return {"pid": os.getpid(), "remote_addr": request.remote_addr,
            "worker": request.environ.get("ipserve.worker")}


@app.get("/hello/<name>/<int:n>")
def hello(name: str, n: int):
    return jsonify(**_who(), name=name, n=n, n_type=type(n).__name__,
                   greeting=request.args.get("greeting", "hello"),
                   tags=request.args.getlist("tag"),
                   method=request.method, http_version=request.environ.get("SERVER_PROTOCOL"))


@app.post("/form")
def form():
    return jsonify(**_who(), mimetype=request.mimetype,
                   form=request.form.to_dict(flat=False))


@app.post("/upload")
def upload():
    f = request.files.get("file")
    if f is None:
        abort(400, "no file field")
    data = f.read()
    return jsonify(**_who(), filename=f.filename, file_mimetype=f.mimetype, size=len(data),
                   sha256=hashlib.sha256(data).hexdigest(), note=request.form.get("note"),
                   request_mimetype=request.mimetype)


@app.post("/json")
def json_echo():
    data = request.get_json()
    return jsonify(**_who(), received=data, sum=sum(data["numbers"]),
                   upper=data["text"].upper(), is_json=request.is_json)


@app.get("/stream")
def stream():
    n = request.args.get("n", 5, type=int)
    gate = request.args.get("gate")
    first = json.dumps(_who()) + "\n"
    if gate is not None:
        # Registered before the response starts: once the client has read the
        # first line, a release for this gate finds it.
        _gates[gate] = gevent.queue.Queue()

    def generate():
        try:
            yield first
            for i in range(n):
                if gate is not None:
                    try:
                        _gates[gate].get(timeout=GATE_WAIT)
                    except gevent.queue.Empty:
                        yield "gate timeout\n"
                        return
                yield f"chunk {i}\n"
        finally:
            if gate is not None:
                _gates.pop(gate, None)

    return Response(generate(), mimetype="text/plain")


@app.post("/release")
def release():
    gate = request.args.get("gate", "")
    queue = _gates.get(gate)
    if queue is None:
        return jsonify(**_who(), released=False, gate=gate), 404
    queue.put(None)
    return jsonify(**_who(), released=True, gate=gate)


application = validated(app)
