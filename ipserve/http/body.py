"""wsgi.input: the request body, pulled from the connection as the
application reads it, so at most one read's worth is ever buffered ahead."""

from __future__ import annotations


class Input:
    __slots__ = ("_connection", "_request")

    def __init__(self, connection, request):
        self._connection = connection
        self._request = request

    def _fill(self) -> bool:
        """Read more of the body; False once it has all arrived."""
        if self._request.complete:
            return False
        self._connection.read_body(self._request)
        return True

    def read(self, size: int | None = -1) -> bytes:
        buffer = self._request.body
        if size is None or size < 0:
            while self._fill():
                pass
        else:
            while len(buffer) < size and self._fill():
                pass
        data = bytes(buffer[:size]) if size is not None and 0 <= size < len(buffer) else bytes(buffer)
        del buffer[:len(data)]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buffer = self._request.body
        searched = 0
        while True:
            end = buffer.find(b"\n", searched)
            if end >= 0:
                end += 1
                break
            searched = len(buffer)
            if (size is not None and 0 <= size <= len(buffer)) or not self._fill():
                end = len(buffer)
                break
        if size is not None and 0 <= size < end:
            end = size
        data = bytes(buffer[:end])
        del buffer[:end]
        return data

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                return lines

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        line = self.readline()
        if not line:
            raise StopIteration
        return line
