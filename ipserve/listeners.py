"""Listening sockets for workers, opened by the master.

The master opens each worker's sockets and keeps a copy for as long as the
worker may be routed to. A worker that crashes then leaves a port that still
accepts connections into its backlog, for its replacement to serve, instead
of a closed port that refuses them while the routes are being rewritten.
"""

from __future__ import annotations

import errno
import socket


def open_listeners(families: list[int], backlog: int) -> list[socket.socket]:
    """Listen on the wildcard of every family, on one port shared by all."""
    for _ in range(50):
        sockets: list[socket.socket] = []
        port = 0
        try:
            for family in families:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                port = sock.getsockname()[1]
                sock.listen(backlog)
            return sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no port is free in every family")


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()
