"""WebSocket echo with gevent-websocket's API (environ["wsgi.websocket"]).

    ipserve examples/websocket_echo.py:application -w 2 -b 127.0.0.1:8000
    open http://127.0.0.1:8000/ in a browser, or:
    python -c "import websocket; w = websocket.create_connection('ws://127.0.0.1:8000/ws'); w.send('hi'); print(w.recv())"
"""

import os

PAGE = b"""<!doctype html><title>ipserve echo</title>
<input id=m value=hello><button onclick="ws.send(m.value)">send</button><pre id=log></pre>
<script>
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.onmessage = e => log.textContent += e.data + "\\n";
</script>"""


def application(environ, start_response):
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("200 OK", [("Content-Type", "text/html"), ("Content-Length", str(len(PAGE)))])
        return [PAGE]
    ws.send(f"connected to worker pid {os.getpid()}")
    while True:
        message = ws.receive()
        if message is None:   # the client closed the connection
            return []
        ws.send(message)
