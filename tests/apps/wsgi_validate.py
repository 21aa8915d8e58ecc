"""Run a test app under wsgiref.validate, so that every end-to-end test also
checks the server's side of PEP 3333 (and the app's).

    from wsgi_validate import validated
    application = validated(_application)

Plain HTTP requests go through ``wsgiref.validate.validator(app)``: it checks
the environ the server built (a plain dict, every required key, str values,
wsgi.input / wsgi.errors methods, no HTTP_CONTENT_TYPE/HTTP_CONTENT_LENGTH ...),
what the server's start_response and write() accept and return, and what the
app does (status, headers, Content-Type, bytes out, read(size) with a size,
close() called on the iterable). A violation raises AssertionError inside the
worker: the server answers 500 and logs the traceback, so a test that expects
200, or checks that its server's log has no "AssertionError", catches it. (A
result that is never closed is reported only when it is garbage collected, on
the worker's stderr: "Iterator garbage collected without being closed".)

WebSocket requests (``"wsgi.websocket" in environ``) go straight to the app:
an upgrade never calls start_response, which the validator cannot judge.
An instance of the server's ``wsgi.file_wrapper`` class that the app returns
goes back to the server unwrapped (start_response was still checked), so the
server's file path (sendfile) is what gets tested.

An app given by path (``tests/apps/probe.py:application``) has tests/apps/ on
sys.path. Apps that tests copy elsewhere alone (probe, trust_*, bind_*) or
import as ``tests.apps.<name>`` fall back to the same thing inline::

    try:
        from wsgi_validate import validated
    except ModuleNotFoundError:         # a copy elsewhere (no WebSocket routes here)
        from wsgiref.validate import validator as validated

(probe.py, which has a WebSocket route, inlines validated() itself.)
"""

from __future__ import annotations

import functools
from wsgiref.validate import validator


def validated(app):
    """`app` under wsgiref.validate for plain HTTP, untouched for WebSockets."""
    lint = validator(app)

    @functools.wraps(app)
    def application(environ, start_response):
        if "wsgi.websocket" in environ:
            return app(environ, start_response)
        result = lint(environ, start_response)
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result.original_iterator, wrapper):
            # The server's own file wrapper goes back to it as is, so that its
            # sendfile path runs (behind the validator's wrapper it would only
            # be iterated). The server closes it; the validator's own
            # close-at-garbage-collection check does not apply to it.
            result.closed = True
            return result.original_iterator
        return result

    return application
