"""The AF_UNIX JSON-lines framing spoken by master, workers and ipservectl.

One JSON object per line, at most MAX_LINE bytes. This module only frames
and unframes; what a message may contain is checked in ipserve.messages, and
who may send it is decided by the master from the kernel's word on the peer
(SO_PEERCRED), never from the message.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct

MAX_LINE = 64 * 1024      # the largest message is a status reply, sent the other way
MAX_FDS = 16              # descriptors accepted with one message (a worker's listeners)


class FramingError(ValueError):
    """The peer sent something that is not a line of one JSON object."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """Who is at the other end, as the kernel saw it connect (SO_PEERCRED)."""
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


def socket_path(runtime_dir: str, name: str) -> str:
    return os.path.join(runtime_dir, name + ".sock")


def encode(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":")) + "\n").encode()


def _no_constants(name: str):
    raise FramingError(f"{name} is not a number")


def decode_line(line: bytes) -> dict:
    """One line as a JSON object. NaN/Infinity, nesting deep enough to exhaust
    the parser, bad UTF-8 and anything but an object are framing errors."""
    try:
        message = json.loads(line, parse_constant=_no_constants)
    except RecursionError:
        raise FramingError("control message nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FramingError(f"control message is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise FramingError("control message is not a JSON object")
    return message


class LineReader:
    """Accumulates bytes and returns complete messages; a line longer than
    MAX_LINE (or a peer that never ends its line) is a framing error."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.buffer = bytearray()
        self.max_line = max_line

    def feed(self, data: bytes) -> list[dict]:
        self.buffer += data
        messages = []
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > self.max_line:
                raise FramingError(f"control line longer than {self.max_line} bytes")
            line = bytes(self.buffer[start:end])
            start = end + 1
            if line.strip():
                messages.append(decode_line(line))
        del self.buffer[:start]
        if len(self.buffer) > self.max_line:
            raise FramingError(f"control line longer than {self.max_line} bytes")
        return messages


# ---------------------------------------------------------------- client side

class ControlUnavailable(Exception):
    """The master cannot be reached; the message is one line for the user."""


class NoMaster(ControlUnavailable):
    """Nobody listens on the socket: no master is running."""


def connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise NoMaster(f"no master is listening on {path} ({exc.strerror})") from None
    except PermissionError:
        sock.close()
        raise ControlUnavailable(f"permission denied on {path}: only root and the user that "
                                 f"started ipserve may control it") from None
    except OSError as exc:   # a timeout (a master too busy to accept), a path too long
        sock.close()
        raise ControlUnavailable(f"cannot connect to {path}: {exc.strerror or exc}") from None
    return sock


def request(path: str, message: dict, timeout: float = 10.0,
            max_fds: int = 0) -> tuple[dict, list[int]]:
    """Send one command to the master at `path`; return its reply and any
    descriptors that came with it (handover passes the reserved sockets).
    Raises ControlUnavailable, or TimeoutError if the master does not answer."""
    sock = connect(path, timeout)
    fds: list[int] = []
    try:
        try:
            sock.sendall(encode(message))
            reader = LineReader(max_line=64 << 20)   # a status of thousands of workers
            while True:
                data, new_fds, _, _ = socket.recv_fds(sock, 1 << 20, max_fds or 1)
                fds.extend(new_fds)
                if not data:
                    raise ControlUnavailable("the master closed the connection without replying")
                replies = reader.feed(data)
                if replies:
                    return replies[0], fds
        except socket.timeout:
            raise TimeoutError(f"the master did not answer within {timeout:.0f}s") from None
        except FramingError as exc:
            raise ControlUnavailable(f"the master's reply is unreadable: {exc}") from None
        except (ConnectionResetError, BrokenPipeError):
            raise ControlUnavailable("the master closed the connection without replying") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        sock.close()
