"""httptools (llhttp) glue: bytes in, requests out, our limits checked as
the bytes arrive.

llhttp refuses malformed syntax itself (bare LF, NUL, obs-fold, a
Content-Length that is not 1*DIGIT, CL with TE, ...). What it leaves to
the server is checked here: sizes and counts, the HTTP version, Host,
transfer codings we do not implement, Expect, the body limit.
"""

from __future__ import annotations

import collections

import httptools

from ipserve.http.errors import ClientError
from ipserve.http.limits import Limits

# "HTTP/1.1" and the two spaces of a request line, around method and target.
_LINE_OVERHEAD = 10
# Chunked framing (sizes, extensions, line ends, trailers) may take one field's
# worth (limit_request_field_size, or this without one) between two pieces of
# body, and CHUNK_OVERHEAD plus CHUNK_OVERHEAD_RATIO times the body in all:
# llhttp skips chunk extensions of any length, httptools gathers a trailer's
# value in memory, and neither may be endless.
CHUNK_OVERHEAD = 64 * 1024
CHUNK_OVERHEAD_RATIO = 8


class Request:
    """One request as parsed: line, fields, and the body bytes received so far
    that the application has not read yet."""

    __slots__ = ("method", "target", "version", "headers", "content_length", "chunked",
                 "keep_alive", "upgrade", "expect_continue", "body", "received", "complete",
                 "framing_bytes", "framing_since_body")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.upgrade = False          # llhttp saw Connection: upgrade + Upgrade
        self.expect_continue = False
        self.body = bytearray()       # received, not yet read by the application
        self.received = 0             # body bytes received in all
        self.complete = False         # the whole message (body included) has arrived
        self.framing_bytes = 0        # chunked: bytes read in the body that were not body
        self.framing_since_body = 0   # ... since the last feed that carried body bytes

    @property
    def body_pending(self) -> int | None:
        """Body bytes still to arrive: None if unknown (chunked)."""
        if self.complete:
            return 0
        if self.content_length is None:
            return None
        return self.content_length - self.received


class RequestParser:
    """Feed it bytes; complete request heads queue up in `ready`.

    Errors are ClientError(status, kind). Bytes after a request that
    upgrades the connection are returned by feed() and never parsed.
    """

    __slots__ = ("limits", "ready", "current", "in_head", "_parser", "_fields", "_hosts",
                 "_coding", "_expect", "_length", "_head_bytes", "_max_head", "_since_field",
                 "_field_done", "_max_field")

    def __init__(self, limits: Limits):
        self.limits = limits
        self.ready: collections.deque[Request] = collections.deque()
        self.current: Request | None = None   # the request whose bytes arrive now
        self.in_head = False                  # inside a request line or header block
        self._parser = httptools.HttpRequestParser(self)
        self._head_bytes = 0
        self._max_head = limits.header_block
        # httptools joins a field's value piece by piece until its line ends
        # (quadratic in the pieces): bytes since the last whole field are
        # bounded by about one field and a request line.
        self._since_field = 0
        self._field_done = False
        self._max_field = (None if limits.field_size is None
                           else limits.field_size + (limits.request_line or 8190) + 4)

    def feed(self, data: bytes) -> bytes | None:
        current = self.current
        in_chunked_body = (current is not None and current.chunked and not self.in_head
                           and not current.complete)
        if in_chunked_body:
            received = current.received
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            return data[exc.args[0]:]
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, ClientError):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserError as exc:
            raise ClientError(400, "malformed request", str(exc)) from None
        if self.in_head and self._max_head is not None:
            # Overcounts by the bytes of earlier messages in `data`, which is
            # at most one read: far below the limit.
            self._head_bytes += len(data)
            self._since_field = 0 if self._field_done else self._since_field + len(data)
            self._field_done = False
            if self._head_bytes > self._max_head or self._since_field > self._max_field:
                raise ClientError(431, "header block too large")
        if (self.in_head and not self._fields and data[-1:] == b"\n" and self.current.target
                and self._parser.get_http_version() == "0.0"):
            # `GET /` and a line end: HTTP/0.9. llhttp would wait for a blank
            # line; a version, had there been one, would be parsed by now.
            raise ClientError(400, "request line without an HTTP version")
        if in_chunked_body and not current.complete:
            # (A feed that ends the message may carry the next request: not counted.)
            body = current.received - received
            framing = len(data) - body
            current.framing_bytes += framing
            current.framing_since_body = framing if body else current.framing_since_body + framing
            if (current.framing_since_body > (self._max_field or CHUNK_OVERHEAD)
                    or current.framing_bytes > CHUNK_OVERHEAD + CHUNK_OVERHEAD_RATIO * current.received):
                raise ClientError(400, "chunked framing too large for its body")
        return None

    def close(self) -> None:
        """Drop the llhttp parser, which holds our bound callbacks: the cycle
        would otherwise wait for the garbage collector, once per connection."""
        self._parser = None

    # ------------------------------------------------------------ llhttp callbacks
    def on_message_begin(self) -> None:
        self.current = Request()
        self.in_head = True
        self._head_bytes = 0
        self._since_field = 0
        self._fields = 0
        self._hosts = 0
        self._coding = None
        self._expect = None
        self._length = None

    def on_url(self, part: bytes) -> None:
        request = self.current
        request.target += part
        limit = self.limits.request_line
        if limit is not None and len(request.target) > limit:
            raise ClientError(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        value = value.rstrip(b" \t")      # llhttp strips only the leading OWS
        self._field_done = True
        self._fields += 1
        if limits.fields is not None and self._fields > limits.fields:
            raise ClientError(431, "too many header fields")
        # Measured as `Name: value`, one space after the colon, CRLF not counted.
        if limits.field_size is not None and len(name) + 2 + len(value) > limits.field_size:
            raise ClientError(431, "header field too long")
        if not self.in_head:
            return      # a trailer field (RFC 9110 6.5.1): never merged into the headers
        lower = name.lower()
        if lower == b"host":
            self._hosts += 1
        elif lower == b"transfer-encoding":
            self._coding = value if self._coding is None else self._coding + b", " + value
        elif lower == b"expect":
            self._expect = value if self._expect is None else self._expect + b", " + value
        elif lower == b"content-length":
            self._length = int(value)   # llhttp checked: 1*DIGIT, one field, no TE
        self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = self.current
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise ClientError(505, "unsupported HTTP version", version)
        request.version = version
        request.method = parser.get_method()
        limit = self.limits.request_line
        if limit is not None and len(request.method) + len(request.target) + _LINE_OVERHEAD > limit:
            raise ClientError(414, "request line too long")
        # RFC 9112 3.2: exactly one Host in HTTP/1.1, at most one before.
        if self._hosts > 1 or (self._hosts == 0 and version == "1.1"):
            raise ClientError(400, "missing or repeated Host")
        if self._coding is not None:
            # RFC 9112 6.1: TE in HTTP/1.0 is faulty framing; chunked is the
            # only coding we decode.
            if version == "1.0":
                raise ClientError(400, "Transfer-Encoding in HTTP/1.0")
            if self._coding.strip().lower() != b"chunked":
                raise ClientError(501, "unsupported transfer coding")
            request.chunked = True
        if self._expect is not None:
            if self._expect.strip().lower() != b"100-continue":
                raise ClientError(417, "unsupported expectation")
            request.expect_continue = version == "1.1"
        length = self._length
        body_limit = self.limits.body
        if length is not None and body_limit is not None and length > body_limit:
            raise ClientError(413, "request body too large")
        request.content_length = length
        request.keep_alive = parser.should_keep_alive()
        request.upgrade = parser.should_upgrade()
        self.in_head = False
        self.ready.append(request)

    def on_body(self, data: bytes) -> None:
        request = self.current
        request.received += len(data)
        limit = self.limits.body
        if limit is not None and request.received > limit:
            raise ClientError(413, "request body too large")
        request.body += data

    def on_message_complete(self) -> None:
        self.current.complete = True
