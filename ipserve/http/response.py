"""The response head: framing decided from the status, the application's
headers and the request (pure functions, unit-tested), and a Date header
formatted once a second."""

from __future__ import annotations

import email.utils
import enum
import os
import time

SERVER = "ipserve"

# Hop-by-hop fields are the server's business (PEP 3333); an application's
# Connection: close is honoured, a Transfer-Encoding is an error.
_HOP_BY_HOP_ERRORS = frozenset(("transfer-encoding", "keep-alive", "upgrade", "te", "trailer",
                                "proxy-authenticate", "proxy-authorization"))

_date_second = -1
_date_line = ""


def date_line() -> str:
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n"
    return _date_line


class Framing(enum.IntEnum):
    """How the body of a response is delimited."""
    NONE = 0        # no body (HEAD, 1xx, 204, 304)
    LENGTH = 1      # Content-Length
    CHUNKED = 2     # Transfer-Encoding: chunked
    CLOSE = 3       # until the connection closes (HTTP/1.0 without a length)


def build_head(status: str, headers: list, *, http10: bool, head_request: bool,
               body_length: int | None, keep_alive: bool) -> tuple[bytes, int, int | None, bool]:
    """The head of a response.

    `body_length` is the body's size when the server knows it (the application
    returned a list); `keep_alive` whether the connection may stay open as far as
    the request and the server are concerned. Returns (head bytes, framing,
    declared length, keep-alive). Raises ValueError or TypeError for what the
    application got wrong (the caller answers 500).
    """
    if type(status) is not str or len(status) < 4 or not status[:3].isdigit() or status[3] != " ":
        raise ValueError(f"invalid status {status!r}")
    code = int(status[:3])
    length = None
    has_date = has_server = False
    lines = []
    for name, value in headers:
        if type(name) is not str or type(value) is not str:
            raise TypeError(f"header {name!r}: {value!r}: names and values must be str")
        lower = name.lower()
        if lower == "content-length":
            if not value.isdigit() or not value.isascii():
                raise ValueError(f"invalid Content-Length {value!r}")
            if length is not None:
                if int(value) != length:
                    raise ValueError("two different Content-Length headers")
                continue
            length = int(value)
            if code < 200 or code == 204:
                continue        # RFC 9110 8.6: never on 1xx or 204
        elif lower == "connection":
            if "close" in value.lower():
                keep_alive = False
            continue
        elif lower == "date":
            has_date = True
        elif lower == "server":
            has_server = True
        elif lower in _HOP_BY_HOP_ERRORS:
            raise ValueError(f"hop-by-hop header {name!r} from the application")
        lines.append(f"{name}: {value}\r\n")
    bodyless = code < 200 or code in (204, 304)
    if bodyless or head_request:
        framing = Framing.NONE
        if head_request and length is None and body_length:
            # A HEAD answered with the GET body: its length is the GET's.
            lines.append(f"Content-Length: {body_length}\r\n")
    elif length is not None:
        framing = Framing.LENGTH
    elif body_length is not None:
        framing = Framing.LENGTH
        length = body_length
        lines.append(f"Content-Length: {length}\r\n")
    elif not http10:
        framing = Framing.CHUNKED
        lines.append("Transfer-Encoding: chunked\r\n")
    else:
        framing = Framing.CLOSE
        keep_alive = False
    if not has_date:
        lines.append(date_line())
    if not has_server:
        lines.append(f"Server: {SERVER}\r\n")
    if not keep_alive:
        lines.append("Connection: close\r\n")
    elif http10:
        lines.append("Connection: keep-alive\r\n")
    text = f"HTTP/1.1 {status}\r\n{''.join(lines)}\r\n"
    # A CR or LF inside a name, a value or the status would split the head
    # (response splitting): one line break per line, and no stray CR.
    if text.count("\n") != len(lines) + 2 or text.count("\r") != len(lines) + 2:
        raise ValueError("CR or LF inside the status or a header")
    return text.encode("latin-1"), framing, length, keep_alive


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class FileWrapper:
    """wsgi.file_wrapper: the server sends a real file with sendfile(2)."""

    def __init__(self, filelike, blksize: int = 65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def fileno(self) -> int | None:
        """The file's descriptor if sendfile(2) can send it, else None."""
        try:
            fd = self.filelike.fileno()
            os.fstat(fd)
        except (AttributeError, OSError, ValueError):
            return None
        return fd

    def __iter__(self):
        read = self.filelike.read
        while True:
            data = read(self.blksize)
            if not data:
                return
            yield data
