"""WSGI app for tests/e2e/test_pep3333.py: each route exercises one part of
PEP 3333 from the application's side, under wsgiref.validate (wsgi_validate.py).

  /env[/...]         JSON {key: [type name, value]} of the whole environ (values
                     that are not str/bool/int/None/tuple: [type name, null]),
                     plus "_input_methods" / "_errors_methods": which stream
                     methods exist, "_environ_type", "_pid"
  /input?ops=A,B,..  reads the body with each op in turn; JSON [[op, result], ...]:
                       read          read() with no size (on the server's own
                                     stream: wsgiref.validate insists on a size)
                       read:N        read(N)
                       readline      readline()
                       readline:N    readline(N) (not in PEP 3333, but what
                                     cgi/multipart parsers call; every server has it)
                       readlines     readlines()
                       iter          list(iter(wsgi.input)) (the server's own __iter__)
                       digest:N      read(N) until b"": "<length> <sha256 hex>"
                     results are latin-1 strings (lists of them for readlines/iter)
  /noread            answers 200 without touching wsgi.input
  /errors?m=TEXT     writes "TEXT\\n" to wsgi.errors (write, writelines, flush)
  /file?size=N&offset=K&kind=temp|counted|bytesio&cl=exact|none|<n>&readahead=1&token=T
                     a file of N bytes (byte i = i % 251) at position K, sent
                     with wsgi.file_wrapper: temp = a buffered temporary file,
                     counted = an io.FileIO whose close() counts in CLOSES[T],
                     bytesio = no descriptor; Content-Length N-K (exact), none,
                     or n; readahead=1: positioned by reading K bytes (the
                     descriptor's own offset is then past K) instead of seek
  /write?cl=1        write(b"one-"), write(b"two"), returns []
  /write-mixed       write(b"w1-"), returns [b"i1-", b"i2"]
  /stream            a generator: b"a", b"bb", b"ccc"; no Content-Length
  /hello?n=X         "hello X" with Content-Length
  /closing?token=T   an iterable with close(); close() counts in CLOSES[T]
  /closing-slow?token=T
                     the same, yielding b"x" * 1024 every 20 ms, at most 30 s
  /closing-error?token=T
                     the same, raising RuntimeError after its first piece
  /count?token=T     JSON {"closes": CLOSES[T]}
  /exc-before        start_response 200, then an error: start_response again
                     with exc_info, "500 Handled Error", body "handled"
  /exc-after?cl=1    start_response 200 (Content-Length 100 with cl=1), yields
                     b"partial-", then calls start_response with exc_info: it
                     must re-raise, so the generator ends with ValueError
  /headers?date=1&server=1
                     status "299 Custom Reason", header "X-MiXeD-CaSe: Value";
                     with date/server also its own Date / Server headers
  /non-latin1        a header value with U+20AC (not latin-1): the server must refuse it
  /lint-violation    no Content-Type: wsgiref.validate raises AssertionError
anything else        404
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import sys
import tempfile
from urllib.parse import parse_qs
from wsgiref.validate import InputWrapper

import gevent

from wsgi_validate import validated    # tests/apps/ is on sys.path (APP given as a path)

CLOSES: collections.Counter = collections.Counter()
DATE = "Tue, 01 Jan 2030 00:00:00 GMT"
SERVER = "pep3333-app/1"
EURO = "\u20ac"


def _query(environ) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _send(start_response, body: bytes, status: str = "200 OK", ctype: str = "text/plain",
          extra=()) -> list[bytes]:
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                            *extra])
    return [body]


def _json(start_response, payload) -> list[bytes]:
    return _send(start_response, json.dumps(payload).encode(), ctype="application/json")


def _server_input(environ):
    """The server's own wsgi.input, from under wsgiref.validate's wrapper."""
    stream = environ["wsgi.input"]
    return stream.input if isinstance(stream, InputWrapper) else stream


def _server_errors(environ):
    stream = environ["wsgi.errors"]
    return getattr(stream, "errors", stream)


# ------------------------------------------------------------------ environ

def _describe(value):
    if value is None or isinstance(value, (str, bool, int, float)):
        return [type(value).__name__, value]
    if isinstance(value, tuple):
        return ["tuple", list(value)]
    return [type(value).__name__, None]


def env(environ, start_response):
    out = {key: _describe(value) for key, value in environ.items()}
    stream, errors = _server_input(environ), _server_errors(environ)
    out["_input_methods"] = [m for m in ("read", "readline", "readlines", "__iter__")
                             if callable(getattr(stream, m, None))]
    out["_errors_methods"] = [m for m in ("write", "writelines", "flush")
                              if callable(getattr(errors, m, None))]
    out["_environ_type"] = type(environ).__name__
    out["_pid"] = os.getpid()
    return _json(start_response, out)


# ------------------------------------------------------------------ wsgi.input

def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _op(environ, op: str):
    stream = environ["wsgi.input"]          # wsgiref.validate's wrapper: checks types
    name, _, arg = op.partition(":")
    n = int(arg) if arg else None
    if name == "read":
        return _text(stream.read(n) if n is not None else _server_input(environ).read())
    if name == "readline":
        return _text(stream.readline(n) if n is not None else stream.readline())
    if name == "readlines":
        return [_text(line) for line in stream.readlines()]
    if name == "iter":
        return [_text(line) for line in _server_input(environ)]
    if name == "digest":
        total, digest = 0, hashlib.sha256()
        while True:
            chunk = stream.read(n)
            if not chunk:
                return f"{total} {digest.hexdigest()}"
            total += len(chunk)
            digest.update(chunk)
    raise ValueError(f"unknown op {op!r}")


def input_ops(environ, start_response):
    ops = [op for op in _query(environ).get("ops", "").split(",") if op]
    try:
        results = [[op, _op(environ, op)] for op in ops]
    except ValueError as exc:
        return _send(start_response, f"{exc}\n".encode(), "400 Bad Request")
    return _json(start_response, results)


def errors(environ, start_response):
    text = _query(environ).get("m", "pep3333 wsgi.errors")
    stream = environ["wsgi.errors"]
    stream.write(text)
    stream.writelines(["\n"])
    stream.flush()
    return _send(start_response, b"written\n")


# ------------------------------------------------------------------ file_wrapper

def file_bytes(size: int) -> bytes:
    """What /file?size=N serves (from offset 0): byte i is i % 251."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


class CountedFile(io.FileIO):
    """A real file (sendfile can send it) whose explicit close() counts in
    CLOSES[token]; a close by garbage collection does not count."""

    token: str | None = None

    def close(self):
        if self.token is not None and not self.closed:
            CLOSES[self.token] += 1
        super().close()

    def __del__(self):
        self.token = None
        super().__del__()


def _open_file(kind: str, data: bytes, token: str):
    if kind == "bytesio":                      # no fileno(): the server must iterate
        return io.BytesIO(data)
    if kind == "counted":
        fd, path = tempfile.mkstemp(prefix="pep3333-")
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        f = CountedFile(path, "rb")
        os.unlink(path)
        f.token = token
        return f
    f = tempfile.TemporaryFile()               # buffered, with a real descriptor
    f.write(data)
    f.flush()
    return f


def file(environ, start_response):
    q = _query(environ)
    size, offset = int(q.get("size", "100000")), int(q.get("offset", "0"))
    f = _open_file(q.get("kind", "temp"), file_bytes(size), q.get("token", ""))
    if q.get("readahead"):
        f.seek(0)
        f.read(offset)          # buffered: the descriptor's position is further on
    else:
        f.seek(offset)
    cl = q.get("cl", "exact")
    headers = [("Content-Type", "application/octet-stream")]
    if cl == "exact":
        headers.append(("Content-Length", str(size - offset)))
    elif cl != "none":
        headers.append(("Content-Length", cl))
    start_response("200 OK", headers)
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is None:                    # PEP 3333: optional; then iter(read, b"")
        f.close()
        raise RuntimeError("no wsgi.file_wrapper in environ")
    return wrapper(f, 8192)


# ------------------------------------------------------------------ write()

def write_only(environ, start_response):
    headers = [("Content-Type", "text/plain")]
    if _query(environ).get("cl"):
        headers.append(("Content-Length", "7"))
    write = start_response("200 OK", headers)
    write(b"one-")
    write(b"two")
    return []


def write_mixed(environ, start_response):
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"w1-")
    return [b"i1-", b"i2"]


def stream(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def body():
        yield b"a"
        yield b"bb"
        yield b"ccc"
    return body()


# ------------------------------------------------------------------ close()

class Closing:
    """An app iterable with close(), as PEP 3333 describes: the server must
    call close() once, whether the response completed, failed or was cut."""

    def __init__(self, token: str, pieces, delay: float = 0.0, fail_after: int | None = None):
        self.token, self.pieces, self.delay, self.fail_after = token, pieces, delay, fail_after

    def __iter__(self):
        for i, piece in enumerate(self.pieces):
            if self.fail_after is not None and i >= self.fail_after:
                raise RuntimeError("pep3333 /closing-error fails while iterating")
            if self.delay and i:
                gevent.sleep(self.delay)
            yield piece

    def close(self):
        CLOSES[self.token] += 1


def closing(environ, start_response):
    token = _query(environ).get("token", "")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "6")])
    return Closing(token, [b"clo", b"sed"])


def closing_slow(environ, start_response):
    token = _query(environ).get("token", "")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return Closing(token, [b"x" * 1024] * 1500, delay=0.02)     # 1500 x 20 ms = 30 s at most


def closing_error(environ, start_response):
    token = _query(environ).get("token", "")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return Closing(token, [b"first-", b"never"], fail_after=1)


def count(environ, start_response):
    return _json(start_response, {"closes": CLOSES[_query(environ).get("token", "")]})


# ------------------------------------------------------------------ exc_info

def exc_before(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("pep3333 /exc-before: an error before any body")
    except ValueError:
        return _send(lambda status, headers: start_response(status, headers, sys.exc_info()),
                     b"handled", "500 Handled Error")


def exc_after(environ, start_response):
    headers = [("Content-Type", "text/plain")]
    if _query(environ).get("cl"):
        headers.append(("Content-Length", "100"))
    start_response("200 OK", headers)

    def body():
        yield b"partial-"
        try:
            raise ValueError("pep3333 /exc-after: an error after the headers were sent")
        except ValueError:
            # Headers are out: start_response must re-raise this exception.
            start_response("500 Too Late", [("Content-Type", "text/plain")], sys.exc_info())
        yield b"start_response did not re-raise"
    return body()


# ------------------------------------------------------------------ headers

def headers(environ, start_response):
    q = _query(environ)
    extra = [("X-MiXeD-CaSe", "Value")]
    if q.get("date"):
        extra.append(("Date", DATE))
    if q.get("server"):
        extra.append(("Server", SERVER))
    return _send(start_response, b"custom\n", "299 Custom Reason", extra=extra)


def non_latin1(environ, start_response):
    return _send(start_response, b"never sent\n", extra=[("X-Currency", f"{EURO}100")])


def lint_violation(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])    # no Content-Type
    return [b"ok"]


def hello(environ, start_response):
    return _send(start_response, f"hello {_query(environ).get('n', '')}".encode())


def noread(environ, start_response):
    return _send(start_response, b"did not read\n")


ROUTES = {
    "/input": input_ops, "/noread": noread, "/errors": errors, "/file": file,
    "/write": write_only, "/write-mixed": write_mixed, "/stream": stream, "/hello": hello,
    "/closing": closing, "/closing-slow": closing_slow, "/closing-error": closing_error,
    "/count": count, "/exc-before": exc_before, "/exc-after": exc_after,
    "/headers": headers, "/non-latin1": non_latin1, "/lint-violation": lint_violation,
}


def _application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/env" or path.startswith("/env/"):
        return env(environ, start_response)
    route = ROUTES.get(path)
    if route is None:
        return _send(start_response, f"no route {path}\n".encode(), "404 Not Found")
    return route(environ, start_response)


application = validated(_application)
