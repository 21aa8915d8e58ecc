"""The HTTP/WebSocket server one worker runs: gevent pywsgi + gevent-websocket."""

from __future__ import annotations

import socket

from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler


class Handler(WebSocketHandler):
    """gevent-websocket's handler, counting requests and open WebSockets."""

    def run_application(self):
        self.server.requests += 1
        return super().run_application()

    def run_websocket(self):
        self.server.websockets.add(self.websocket)
        try:
            return super().run_websocket()
        finally:
            self.server.websockets.discard(self.websocket)

    def start_response(self, status, headers, exc_info=None):
        # A retiring worker sends keep-alive clients elsewhere: after this
        # response they reconnect, and the kernel routes them to the new worker.
        if self.server.retiring and self.environ.get("HTTP_UPGRADE", "").lower() != "websocket":
            headers = [(k, v) for k, v in headers if k.lower() != "connection"]
            headers.append(("Connection", "close"))
        return super().start_response(status, headers, exc_info)


class Server(pywsgi.WSGIServer):
    """pywsgi server that knows how many connections it holds."""

    handler_class = Handler

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.requests = 0
        self.retiring = False
        self.websockets = set()

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
