"""The HTTP/WebSocket server one worker runs: gevent pywsgi + gevent-websocket."""

from __future__ import annotations

import socket

from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler


class Handler(WebSocketHandler):
    """gevent-websocket's handler, counting requests for the heartbeat."""

    def run_application(self):
        self.server.requests += 1
        return super().run_application()


class Server(pywsgi.WSGIServer):
    """pywsgi server that knows how many connections it holds."""

    handler_class = Handler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.requests = 0

    def handle(self, sock, address):
        # Without TCP_NODELAY a keep-alive client waits on Nagle x delayed ACK
        # (~22 requests/s here instead of thousands).
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        try:
            super().handle(sock, address)
        finally:
            self.connections -= 1
