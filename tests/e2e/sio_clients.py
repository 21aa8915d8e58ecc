"""A python-socketio client all of whose connections leave from one source
address. No option of python-socketio says so, but both libraries under it
take a hook:

  * long-polling goes through `requests`: the client is given a Session
    (http_session=) whose adapter builds urllib3 pools with
    source_address=(src, 0), so every polling connection binds to src;
  * the WebSocket is made by websocket-client's create_connection(), which
    takes `class_` (passed through websocket_extra_options=): a WebSocket
    subclass whose connect() opens the TCP connection with
    socket.create_connection(..., source_address=(src, 0)) and hands it over
    as websocket-client's documented `socket=` option (a given socket is
    used as is: no proxy from the environment either).

The Socket.IO tests run this inside a client namespace (their test file run
as a script, with this directory on sys.path), one client per address.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit


def bound_client(src: str, wait: float):
    """A socketio.Client (no reconnection) whose every connection comes from `src`."""
    import requests
    import socketio
    import websocket
    from requests.adapters import HTTPAdapter

    class SourceAddressAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            kwargs["source_address"] = (src, 0)
            super().init_poolmanager(*args, **kwargs)

    class BoundWebSocket(websocket.WebSocket):
        def connect(self, url, **options):
            if options.get("socket") is None:
                u = urlsplit(url)
                options["socket"] = socket.create_connection(
                    (u.hostname, u.port), timeout=wait, source_address=(src, 0))
            return super().connect(url, **options)

    session = requests.Session()
    session.trust_env = False          # no proxy from the environment: straight to the server
    session.mount("http://", SourceAddressAdapter())
    return socketio.Client(reconnection=False, request_timeout=wait, http_session=session,
                           websocket_extra_options={"class_": BoundWebSocket})
