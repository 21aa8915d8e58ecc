"""ipserve.http.body.Input (wsgi.input) over a fake connection whose
read_body() delivers the next piece of the body, as the parser would."""

from __future__ import annotations

import pytest

from ipserve.http.body import Input
from ipserve.http.parser import Request


class FakeConnection:
    def __init__(self, pieces):
        self.pieces = list(pieces)
        self.calls = 0

    def read_body(self, request: Request) -> None:
        self.calls += 1
        assert not request.complete, "read_body() called after the body was complete"
        piece = self.pieces.pop(0)
        request.body += piece
        request.received += len(piece)
        if not self.pieces:
            request.complete = True


def make(pieces, buffered: bytes = b"") -> tuple[Input, FakeConnection, Request]:
    """An Input whose request has `buffered` already received (with the head)
    and `pieces` still to come, one per read_body()."""
    request = Request()
    request.body += buffered
    request.received = len(buffered)
    request.complete = not pieces
    connection = FakeConnection(pieces)
    return Input(connection, request), connection, request


# ------------------------------------------------------------------ read
def test_read_all():
    stream, connection, _ = make([b"hello ", b"wor", b"ld"], b">")
    assert stream.read() == b">hello world"
    assert stream.read() == b""
    assert connection.pieces == []


def test_read_none_reads_all():
    stream, _, _ = make([b"ab", b"cd"])
    assert stream.read(None) == b"abcd"


def test_read_negative_reads_all():
    stream, _, _ = make([b"ab", b"cd"])
    assert stream.read(-5) == b"abcd"


def test_read_n_pulls_only_what_it_needs():
    stream, connection, _ = make([b"abc", b"def", b"ghi"])
    assert stream.read(2) == b"ab"
    assert connection.calls == 1
    assert stream.read(2) == b"cd"
    assert connection.calls == 2
    assert stream.read(5) == b"efghi"
    assert connection.calls == 3
    assert stream.read(5) == b""
    assert stream.read(1) == b""
    assert connection.calls == 3


def test_read_n_from_what_is_buffered_does_not_read_more():
    stream, connection, _ = make([b"later"], b"now")
    assert stream.read(3) == b"now"
    assert connection.calls == 0


def test_read_n_short_at_the_end():
    stream, _, _ = make([b"abc"])
    assert stream.read(10) == b"abc"
    assert stream.read(10) == b""


def test_read_zero():
    stream, connection, _ = make([b"abc"])
    assert stream.read(0) == b""
    assert connection.calls == 0
    assert stream.read() == b"abc"
    assert stream.read(0) == b""


def test_read_of_an_empty_body():
    stream, connection, _ = make([])
    assert stream.read() == b""
    assert stream.read(5) == b""
    assert stream.readline() == b""
    assert stream.readlines() == []
    assert list(stream) == []
    assert connection.calls == 0


def test_read_with_empty_pieces_in_between():
    # a recv that only carried chunk framing adds nothing to the body
    stream, _, _ = make([b"", b"ab", b"", b"", b"c"])
    assert stream.read(3) == b"abc"
    assert stream.read() == b""


def test_read_returns_bytes():
    stream, _, _ = make([b"abc"], b"x")
    assert type(stream.read(1)) is bytes
    assert type(stream.read()) is bytes


def test_read_consumes_the_request_buffer():
    stream, _, request = make([b"abcdef"])
    stream.read(4)
    assert request.body == b"ef"


# ------------------------------------------------------------------ readline
def test_readline_across_pieces():
    stream, _, _ = make([b"ab", b"c\nde", b"f\n", b"tail"])
    assert stream.readline() == b"abc\n"
    assert stream.readline() == b"def\n"
    assert stream.readline() == b"tail"
    assert stream.readline() == b""
    assert stream.readline() == b""


def test_readline_does_not_read_past_a_buffered_line():
    stream, connection, _ = make([b"more\n"], b"one\ntwo")
    assert stream.readline() == b"one\n"
    assert connection.calls == 0
    assert stream.readline() == b"twomore\n"


def test_readline_with_a_size():
    stream, _, _ = make([b"abcdef\n", b"gh\n"])
    assert stream.readline(3) == b"abc"
    assert stream.readline(3) == b"def"
    assert stream.readline(3) == b"\n"
    assert stream.readline(10) == b"gh\n"
    assert stream.readline(10) == b""


def test_readline_size_stops_at_the_newline():
    stream, _, _ = make([b"ab\ncd\n"])
    assert stream.readline(5) == b"ab\n"
    assert stream.readline(5) == b"cd\n"


def test_readline_size_does_not_read_more_than_it_needs():
    stream, connection, _ = make([b"efgh\n"], b"abcd")
    assert stream.readline(2) == b"ab"
    assert connection.calls == 0
    assert stream.readline(4) == b"cdef"    # 2 buffered < 4: one more read, then cut
    assert connection.calls == 1
    assert stream.readline() == b"gh\n"


def test_readline_zero():
    stream, _connection, _ = make([b"abc\n"])
    assert stream.readline(0) == b""
    assert stream.readline(-1) == b"abc\n"


def test_readline_none_is_unbounded():
    stream, _, _ = make([b"abc", b"def\n"])
    assert stream.readline(None) == b"abcdef\n"


# ------------------------------------------------------------------ readlines, iteration
def test_readlines():
    stream, _, _ = make([b"a\nb", b"\nc\n", b"d"])
    assert stream.readlines() == [b"a\n", b"b\n", b"c\n", b"d"]
    assert stream.readlines() == []


def test_readlines_with_a_hint():
    stream, _, _ = make([b"aa\nbb\n", b"cc\ndd\n"])
    assert stream.readlines(4) == [b"aa\n", b"bb\n"]      # stops once 4 bytes are reached
    assert stream.readlines(1) == [b"cc\n"]
    assert stream.readlines(0) == [b"dd\n"]                # 0: no hint


def test_readlines_hint_none_or_negative_reads_all():
    stream, _, _ = make([b"a\nb\n"])
    assert stream.readlines(None) == [b"a\n", b"b\n"]
    stream, _, _ = make([b"a\nb\n"])
    assert stream.readlines(-1) == [b"a\n", b"b\n"]


def test_iteration():
    stream, _, _ = make([b"line 1\nli", b"ne 2\n", b"last"])
    assert iter(stream) is stream
    assert list(stream) == [b"line 1\n", b"line 2\n", b"last"]
    with pytest.raises(StopIteration):
        next(stream)


def test_for_loop_over_a_body_ending_in_newline():
    stream, _, _ = make([b"a\n", b"b\n"])
    assert [line for line in stream] == [b"a\n", b"b\n"]


def test_mixed_reads():
    stream, _, _ = make([b"head\nbody", b"-rest\nend"])
    assert stream.readline() == b"head\n"
    assert stream.read(4) == b"body"
    assert stream.readline() == b"-rest\n"
    assert stream.read() == b"end"
    assert stream.read() == b""
    assert stream.readline() == b""


def test_large_body_in_many_pieces():
    pieces = [bytes([65 + i % 26]) * 1000 + b"\n" for i in range(200)]
    stream, _, _ = make(pieces)
    assert list(stream) == pieces
