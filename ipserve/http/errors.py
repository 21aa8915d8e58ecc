"""What a client can do wrong, and what it is answered."""

from __future__ import annotations


class ClientError(OSError):
    """A request we refuse: answered `status` (if no response has started),
    then the connection closes. An OSError, so that an application reading
    wsgi.input sees what it sees for a vanished client."""

    def __init__(self, status: int, kind: str, detail: str = ""):
        super().__init__(f"{status} {kind}" + (f": {detail}" if detail else ""))
        self.status = status
        self.kind = kind          # a short fixed phrase: the rate-limited log's key
        self.detail = detail


class ClientGone(OSError):
    """The client closed the connection, or stopped sending, mid-request."""


REASONS = {
    400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
    414: "URI Too Long", 417: "Expectation Failed", 426: "Upgrade Required",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


def error_response(status: int, extra: str = "", body: str | None = None) -> bytes:
    """A complete response that ends the connection."""
    text = (body if body is not None else REASONS[status].lower()) + "\n"
    return (f"HTTP/1.1 {status} {REASONS[status]}\r\nConnection: close\r\n"
            f"Content-Type: text/plain\r\n{extra}Content-Length: {len(text)}\r\n\r\n{text}").encode()
