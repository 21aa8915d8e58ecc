"""The app bench/ws_echo.py measures: a plain WebSocket echo loop.

    GET /ws   a WebSocket (environ["wsgi.websocket"], gevent-websocket's API):
              every message received is sent back as it came (text as text,
              bytes as binary), until the client closes
    GET /     "ok" (readiness)

ipserve serves it by path (bench/apps/ws_echo.py:application); gunicorn with
-k geventwebsocket.gunicorn.workers.GeventWebSocketWorker as
ws_echo:application with --pythonpath bench/apps. Same code in both.
"""


def application(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is not None:
        while True:
            message = ws.receive()
            if message is None:
                return []
            ws.send(message)
    body = b"ok\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
