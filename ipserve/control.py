"""The AF_UNIX JSON-lines protocol spoken by master, workers and ipservectl.

One JSON object per line. Workers send {"type": "ready", ...} then
{"type": "heartbeat", ...} every second; the master sends them commands
({"type": "stop"|"quit"|"retire", ...}). ipservectl sends {"cmd": ...} and
reads one reply line.
"""

from __future__ import annotations

import json
import os
import socket
import struct


def socket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, name + ".sock")


def encode(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


class LineReader:
    """Accumulates bytes and yields complete JSON messages."""

    MAX_LINE = 1 << 20  # a peer that never ends its line is cut off

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> list[dict]:
        self.buffer += data
        messages = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip():
                message = json.loads(line)
                if not isinstance(message, dict):
                    raise ValueError("control message is not an object")
                messages.append(message)
        if len(self.buffer) > self.MAX_LINE:
            raise ValueError("control line too long")
        return messages


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end, as the kernel saw it connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[0]


class ControlUnavailable(Exception):
    pass


def request(path: str, message: dict, timeout: float = 10.0) -> dict:
    """Send one command to the master at `path` and return its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(f"no master is listening on {path} ({exc.strerror})") from None
        except PermissionError:
            raise ControlUnavailable(f"permission denied on {path}: run as the user that started ipserve") from None
        sock.sendall(encode(message))
        reader = LineReader()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ControlUnavailable("the master closed the connection without replying")
            replies = reader.feed(data)
            if replies:
                return replies[0]
    finally:
        sock.close()
