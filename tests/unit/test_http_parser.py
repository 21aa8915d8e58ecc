"""ipserve.http.parser.RequestParser (httptools/llhttp glue + our limits), and
the pure helpers of ipserve.http.connection (environ_key, split_target).

Pure: bytes in, Request objects / ClientError out. No sockets."""

from __future__ import annotations

import pytest

from ipserve.http.connection import environ_key, split_target
from ipserve.http.errors import ClientError
from ipserve.http.limits import Limits
from ipserve.http.parser import Request, RequestParser


def parser(**limits) -> RequestParser:
    return RequestParser(Limits(**limits))


def parse(data: bytes, **limits) -> list[Request]:
    p = parser(**limits)
    assert p.feed(data) is None
    return list(p.ready)


def parse_bytewise(data: bytes, **limits) -> list[Request]:
    p = parser(**limits)
    for i in range(len(data)):
        assert p.feed(data[i:i + 1]) is None
    return list(p.ready)


def refused(data: bytes, *, bytewise: bool = False, **limits) -> int:
    """The status of the ClientError `data` is refused with."""
    p = parser(**limits)
    with pytest.raises(ClientError) as info:
        if bytewise:
            for i in range(len(data)):
                p.feed(data[i:i + 1])
        else:
            p.feed(data)
    return info.value.status


def line_of(length: int, method: bytes = b"GET", version: bytes = b"HTTP/1.1") -> bytes:
    """A request line (no CRLF) of exactly `length` bytes."""
    fixed = len(method) + 1 + 1 + len(version)
    target = b"/" + b"a" * (length - fixed - 1)
    line = method + b" " + target + b" " + version
    assert len(line) == length
    return line


# ------------------------------------------------------------------ the Request fields
def test_simple_get_fields():
    [r] = parse(b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\nX-A: b\r\n\r\n")
    assert r.method == b"GET"
    assert r.target == b"/p?q=1"
    assert r.version == "1.1"
    assert r.headers == [(b"Host", b"example.com"), (b"X-A", b"b")]
    assert r.content_length is None
    assert r.chunked is False
    assert r.keep_alive is True
    assert r.upgrade is False
    assert r.expect_continue is False
    assert r.body == b""
    assert r.complete is True
    assert r.body_pending == 0


def test_header_names_and_values_keep_their_case_and_order():
    [r] = parse(b"GET / HTTP/1.1\r\nhOsT: a\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n")
    assert r.headers == [(b"hOsT", b"a"), (b"X-Dup", b"1"), (b"x-dup", b"2")]


def test_leading_whitespace_of_a_value_is_not_part_of_it():
    [r] = parse(b"GET / HTTP/1.1\r\nHost:    a\r\nX:b\r\n\r\n")
    assert r.headers == [(b"Host", b"a"), (b"X", b"b")]


def test_post_with_content_length_body():
    [r] = parse(b"POST /f HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    assert r.method == b"POST"
    assert r.content_length == 5
    assert r.chunked is False
    assert r.body == b"hello"
    assert r.received == 5
    assert r.complete is True


def test_partial_body_is_queued_at_headers_complete_and_grows():
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    [r] = p.ready
    assert r.body == b"abc" and not r.complete
    assert r.body_pending == 7
    p.feed(b"defg")
    assert r.body == b"abcdefg" and r.body_pending == 3
    del r.body[:]            # the application read it
    p.feed(b"hij")
    assert r.body == b"hij" and r.complete and r.received == 10
    assert r.body_pending == 0


def test_chunked_body():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    assert r.chunked is True
    assert r.content_length is None
    assert r.body == b"hello world"
    assert r.complete is True


def test_chunked_body_pending_unknown_until_complete():
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
    [r] = p.ready
    assert r.body_pending is None and not r.complete
    p.feed(b"lo\r\n0\r\n\r\n")
    assert r.body == b"hello" and r.complete and r.body_pending == 0


def test_transfer_encoding_chunked_is_case_insensitive():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n")
    assert r.chunked is True and r.complete


def test_http10_request_needs_no_host_and_is_not_keep_alive():
    [r] = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert r.version == "1.0"
    assert r.keep_alive is False


def test_http10_keep_alive():
    [r] = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert r.version == "1.0"
    assert r.keep_alive is True


def test_connection_close_ends_keep_alive():
    [r] = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert r.keep_alive is False


def test_expect_100_continue():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert r.expect_continue is True
    assert r.body == b"" and not r.complete


def test_expect_100_continue_case_insensitive():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
    assert r.expect_continue is True


def test_expect_100_continue_ignored_on_http10():
    [r] = parse(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert r.expect_continue is False


def test_absolute_form_and_asterisk_targets_are_accepted():
    [r] = parse(b"GET http://h/p?q=1 HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.target == b"http://h/p?q=1"
    [r] = parse(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert r.method == b"OPTIONS" and r.target == b"*"


# ------------------------------------------------------------------ pipelining, split feeds
PIPELINE = (b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
            b"GET /4 HTTP/1.0\r\n\r\n")


def _check_pipeline(requests: list[Request]) -> None:
    assert [r.target for r in requests] == [b"/1", b"/2", b"/3", b"/4"]
    assert [r.method for r in requests] == [b"GET", b"POST", b"POST", b"GET"]
    assert [bytes(r.body) for r in requests] == [b"", b"abc", b"xy", b""]
    assert [r.content_length for r in requests] == [None, 3, None, None]
    assert [r.chunked for r in requests] == [False, False, True, False]
    assert [r.version for r in requests] == ["1.1", "1.1", "1.1", "1.0"]
    assert [r.keep_alive for r in requests] == [True, True, True, False]
    assert all(r.complete for r in requests)


def test_pipelined_requests_in_one_feed():
    _check_pipeline(parse(PIPELINE))


def test_pipelined_requests_fed_one_byte_at_a_time():
    _check_pipeline(parse_bytewise(PIPELINE))


def test_requests_split_at_every_position():
    for cut in range(1, len(PIPELINE)):
        p = parser()
        assert p.feed(PIPELINE[:cut]) is None
        assert p.feed(PIPELINE[cut:]) is None
        _check_pipeline(list(p.ready))


def test_head_is_not_ready_until_its_last_byte():
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    p = parser()
    for i in range(len(data) - 1):
        p.feed(data[i:i + 1])
        assert not p.ready
        assert p.in_head
    p.feed(data[-1:])
    assert len(p.ready) == 1
    assert not p.in_head


def test_request_fields_survive_one_byte_feeds():
    data = (b"PUT /x/y?z=1 HTTP/1.1\r\nHost: h\r\nX-Long-Name: some value here\r\n"
            b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\nbody")
    [r] = parse_bytewise(data)
    assert r.method == b"PUT"
    assert r.target == b"/x/y?z=1"
    assert r.headers == [(b"Host", b"h"), (b"X-Long-Name", b"some value here"),
                         (b"Expect", b"100-continue"), (b"Content-Length", b"4")]
    assert r.content_length == 4 and r.expect_continue
    assert r.body == b"body" and r.complete


# ------------------------------------------------------------------ upgrade
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def test_upgrade_returns_the_bytes_after_the_head():
    p = parser()
    frame = b"\x81\x85abcd" + bytes(c ^ m for c, m in zip(b"hello", b"abcda"))
    rest = p.feed(UPGRADE + frame + b"GET / HTTP/1.1\r\n")
    assert rest == frame + b"GET / HTTP/1.1\r\n"
    [r] = p.ready
    assert r.upgrade is True
    assert r.target == b"/ws"


def test_upgrade_with_nothing_after_returns_empty_bytes():
    p = parser()
    assert p.feed(UPGRADE) == b""
    assert p.ready[0].upgrade is True


def test_upgrade_fed_one_byte_at_a_time():
    p = parser()
    for i in range(len(UPGRADE) - 1):
        assert p.feed(UPGRADE[i:i + 1]) is None
    assert p.feed(UPGRADE[-1:]) == b""
    assert p.ready[0].upgrade is True


def test_upgrade_header_without_connection_upgrade_is_a_plain_request():
    data = (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"
            b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
    requests = parse(data)
    assert [r.target for r in requests] == [b"/ws", b"/next"]
    assert requests[0].upgrade is False


def test_upgrade_request_with_a_body_hands_the_body_over_as_upgrade_bytes():
    # llhttp stops at an upgrade request's head: what follows is the new
    # protocol's, never parsed as a request of its own (request smuggling).
    # The connection refuses such a request (400) unless it is a WebSocket.
    inner = b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    p = parser()
    rest = p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(inner) + inner)
    assert [r.target for r in p.ready] == [b"/"]
    assert p.ready[0].upgrade and p.ready[0].content_length == len(inner)
    assert rest == inner


# ------------------------------------------------------------------ 414 request line
@pytest.mark.parametrize("bytewise", [False, True])
def test_request_line_exactly_at_the_limit_is_accepted(bytewise):
    data = line_of(64) + b"\r\nHost: a\r\n\r\n"
    requests = parse_bytewise(data, request_line=64) if bytewise else parse(data, request_line=64)
    assert len(requests) == 1
    assert len(requests[0].target) == 64 - 13


@pytest.mark.parametrize("bytewise", [False, True])
def test_request_line_one_over_the_limit_is_414(bytewise):
    assert refused(line_of(65) + b"\r\nHost: a\r\n\r\n", request_line=64, bytewise=bytewise) == 414


def test_request_line_limit_counts_the_method():
    assert len(parse(line_of(64, b"DELETE") + b"\r\nHost: a\r\n\r\n", request_line=64)) == 1
    assert refused(line_of(65, b"DELETE") + b"\r\nHost: a\r\n\r\n", request_line=64) == 414


def test_request_line_limit_http10():
    assert len(parse(line_of(64, version=b"HTTP/1.0") + b"\r\n\r\n", request_line=64)) == 1
    assert refused(line_of(65, version=b"HTTP/1.0") + b"\r\n\r\n", request_line=64) == 414


def test_endless_target_is_414_before_the_line_ends():
    p = parser(request_line=64)
    p.feed(b"GET /")
    with pytest.raises(ClientError) as info:
        for _ in range(100):
            p.feed(b"a" * 10)
    assert info.value.status == 414


def test_default_request_line_limit():
    assert len(parse(line_of(4094) + b"\r\nHost: a\r\n\r\n")) == 1
    assert refused(line_of(4095) + b"\r\nHost: a\r\n\r\n") == 414


# ------------------------------------------------------------------ 431 fields
def _field(size: int, name: bytes = b"X-Field") -> bytes:
    """A field line `Name: value` (no CRLF) of exactly `size` bytes."""
    line = name + b": " + b"v" * (size - len(name) - 2)
    assert len(line) == size
    return line


@pytest.mark.parametrize("bytewise", [False, True])
def test_field_line_exactly_at_field_size_is_accepted(bytewise):
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + _field(40) + b"\r\n\r\n"
    requests = parse_bytewise(data, field_size=40) if bytewise else parse(data, field_size=40)
    assert requests[0].headers[1] == (b"X-Field", b"v" * 31)


@pytest.mark.parametrize("bytewise", [False, True])
def test_field_line_one_over_field_size_is_431(bytewise):
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + _field(41) + b"\r\n\r\n"
    assert refused(data, field_size=40, bytewise=bytewise) == 431


def test_default_field_size():
    assert len(parse(b"GET / HTTP/1.1\r\nHost: a\r\n" + _field(8190) + b"\r\n\r\n")) == 1
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\n" + _field(8191) + b"\r\n\r\n") == 431


def test_fields_at_the_count_limit_accepted_one_more_is_431():
    head = b"GET / HTTP/1.1\r\nHost: a\r\n"
    ok = head + b"".join(b"X-%d: v\r\n" % i for i in range(4)) + b"\r\n"
    assert len(parse(ok, fields=5)[0].headers) == 5
    over = head + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n"
    assert refused(over, fields=5) == 431


def test_default_field_count():
    head = b"GET / HTTP/1.1\r\nHost: a\r\n"
    assert len(parse(head + b"".join(b"X-%d: v\r\n" % i for i in range(99)) + b"\r\n")) == 1
    assert refused(head + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n") == 431


SMALL = {"request_line": 100, "fields": 10, "field_size": 100}


def test_header_block_bound():
    assert Limits(**SMALL).header_block == 100 + 2 + 11 * 102 + 2


def test_endless_header_value_fed_in_chunks_is_431():
    p = parser(**SMALL)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(ClientError) as info:
        for _ in range(100):
            p.feed(b"a" * 100)
    assert info.value.status == 431


def test_endless_header_name_fed_in_chunks_is_431():
    p = parser(**SMALL)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX")
    with pytest.raises(ClientError) as info:
        for _ in range(100):
            p.feed(b"a" * 100)
    assert info.value.status == 431


def test_largest_legal_head_fed_bytewise_is_accepted():
    # request line at its limit, `fields` fields each at field_size
    data = (line_of(100) + b"\r\nHost: " + b"h" * 94 + b"\r\n"
            + b"".join(_field(100, b"X-%d" % i) + b"\r\n" for i in range(9)) + b"\r\n")
    [r] = parse_bytewise(data, **SMALL)
    assert len(r.headers) == 10


def test_endless_header_value_is_refused_without_a_field_count_limit():
    # limit_request_fields = 0 (no limit) must not lift the bound on one field:
    # httptools buffers a value until its line ends.
    p = parser(request_line=100, fields=None, field_size=100)
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    with pytest.raises(ClientError) as info:
        for _ in range(200):
            p.feed(b"a" * 100)
    assert info.value.status == 431


def test_endless_trailer_value_is_refused():
    # A chunked body's trailer section is a field block too: an endless
    # trailer value (buffered whole by httptools until its line ends) must be
    # bounded like a header field, not only by the chunk-framing allowance
    # (64 KiB + 8 x the body).
    p = parser(**SMALL)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nX-Trailer: ")
    with pytest.raises(ClientError) as info:
        for _ in range(200):
            p.feed(b"a" * 100)
    assert info.value.status in (400, 431)


def test_trailer_field_over_field_size_is_431():
    p = parser(**SMALL)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n")
    with pytest.raises(ClientError) as info:
        p.feed(_field(101) + b"\r\n\r\n")
    assert info.value.status == 431


def test_trailer_fields_are_not_merged_into_the_headers():
    # RFC 9110 6.5.1: trailer fields must not be merged into the header
    # section (they would show up in the environ as HTTP_* headers).
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\nHost: evil\r\n\r\n")
    [r] = p.ready
    assert r.body == b"abc" and r.complete
    assert r.headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]


# ------------------------------------------------------------------ 413 body
def test_content_length_at_the_body_limit_is_accepted():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n" + b"x" * 10, body=10)
    assert r.body == b"x" * 10


def test_content_length_over_the_body_limit_is_413():
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", body=10) == 413


def test_content_length_over_the_limit_with_expect_is_413_at_the_head():
    p = parser(body=10)
    with pytest.raises(ClientError) as info:
        p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 11\r\n\r\n")
    assert info.value.status == 413
    assert not p.ready          # never handed to the application


def test_default_body_limit():
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                   % (100 * 1024 * 1024 + 1)) == 413
    p = parser()
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (100 * 1024 * 1024))
    assert p.ready[0].content_length == 100 * 1024 * 1024


def test_no_body_limit():
    p = parser(body=None)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (10 ** 12))
    assert p.ready[0].content_length == 10 ** 12


def test_chunked_body_at_the_limit_is_accepted():
    [r] = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n", body=10)
    assert r.body == b"abcdefghij"


def test_chunked_body_growing_past_the_limit_is_413():
    p = parser(body=10)
    p.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
    [r] = p.ready
    del r.body[:]                        # the application read it: still counted
    with pytest.raises(ClientError) as info:
        p.feed(b"5\r\nghijk\r\n")
    assert info.value.status == 413


def test_chunked_body_past_the_limit_in_one_chunk_is_413():
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"b\r\nabcdefghijk\r\n0\r\n\r\n", body=10) == 413


# ------------------------------------------------------------------ chunk framing
CHUNKED_HEAD = b"POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_chunk_extensions_are_accepted():
    [r] = parse(CHUNKED_HEAD + b"3;name=value;x\r\nabc\r\n0;last\r\n\r\n")
    assert r.body == b"abc" and r.complete


def test_many_one_byte_chunks_are_accepted():
    [r] = parse(CHUNKED_HEAD + b"1\r\nx\r\n" * 50000 + b"0\r\n\r\n")
    assert r.body == b"x" * 50000 and r.complete


def test_endless_chunk_extension_is_refused():
    p = parser()
    p.feed(CHUNKED_HEAD + b"5;ext=")
    with pytest.raises(ClientError) as info:
        for _ in range(1000):
            p.feed(b"a" * 1000)
    assert info.value.status == 400


def test_pipelined_request_after_a_chunked_body_is_not_chunk_framing():
    # The end of a chunked body and a pipelined request in the same read
    # (64 KiB, RECV_SIZE): the next request's bytes are not the chunked
    # request's framing overhead.
    following = b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n" + b"x" * 70000
    p = parser()
    p.feed(CHUNKED_HEAD)
    p.feed(b"0\r\nX-Checksum: abc\r\n")
    data = b"\r\n" + following
    p.feed(data[:65536])
    p.feed(data[65536:])
    assert [r.target for r in p.ready] == [b"/a", b"/b"]
    assert p.ready[1].complete and len(p.ready[1].body) == 70000


# ------------------------------------------------------------------ version, Host, TE, Expect
def test_http2_is_505():
    assert refused(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n") == 505


def test_http09_style_request_is_refused():
    assert refused(b"GET /\r\n\r\n") in (400, 505)


def test_http12_is_refused():
    assert refused(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n") in (400, 505)


def test_missing_host_in_http11_is_400():
    assert refused(b"GET / HTTP/1.1\r\n\r\n") == 400


def test_duplicate_host_is_400():
    assert refused(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n") == 400
    assert refused(b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n") == 400


@pytest.mark.parametrize("coding", [b"gzip", b"gzip, chunked", b"deflate", b"identity"])
def test_unsupported_transfer_coding_is_501(coding):
    data = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n"
    assert refused(data) == 501


def test_transfer_coding_split_over_two_fields_is_501():
    # Two fields are one list (RFC 9110 5.3): "gzip, chunked" -> 501, not a
    # chunked body whose gzip coding is silently ignored.
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    assert refused(data) in (400, 501)


def test_transfer_encoding_in_http10_is_400():
    assert refused(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n") == 400


def test_expect_other_than_100_continue_is_417():
    assert refused(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: foo\r\nContent-Length: 0\r\n\r\n") == 417


def test_unsupported_expectation_with_a_second_expect_field_is_417():
    data = (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: foo\r\nExpect: 100-continue\r\n"
            b"Content-Length: 0\r\n\r\n")
    assert refused(data) == 417


# ------------------------------------------------------------------ llhttp-refused shapes -> 400
# record header (handshake, TLS 1.0, 512 bytes), ClientHello, TLS 1.2, random, session id
TLS_CLIENT_HELLO = (bytes.fromhex("16 0301 0200 01 0001fc 0303") + bytes(range(32))
                    + b"\x20" + bytes(32) + b"\x00\x3e\x13\x02\x13\x03")

MALFORMED = {
    "cl_plus": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "cl_underscore": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1_0\r\n\r\nabc",
    "cl_overflow": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551616\r\n\r\n",
    "cl_list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\nabc",
    "cl_negative": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "cl_duplicate": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    "cl_and_te": (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "te_and_cl": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Length: 3\r\n\r\n0\r\n\r\n"),
    "te_vt": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \x0bchunked\r\n\r\n0\r\n\r\n",
    "te_ff": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\x0c\r\n\r\n0\r\n\r\n",
    "bare_lf_line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare_lf_field": b"GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
    "bare_lf_all": b"GET / HTTP/1.1\nHost: a\n\n",
    "nul_value": b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    "nul_name": b"GET / HTTP/1.1\r\nHost: a\r\nX\x00: b\r\n\r\n",
    "nul_target": b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n  z\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "tab_before_colon": b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
    "unknown_method": b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
    "lowercase_method": b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "bad_chunk_end": (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabcX\r\n0\r\n\r\n"),
    "tls_client_hello": TLS_CLIENT_HELLO,
    "garbage": b"\x00\x01\x02\x03 hello\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_400(name):
    assert refused(MALFORMED[name]) == 400


@pytest.mark.parametrize("name", ["cl_plus", "bare_lf_field", "obs_fold", "te_vt", "tls_client_hello"])
def test_malformed_request_fed_bytewise_is_400(name):
    assert refused(MALFORMED[name], bytewise=True) == 400


def test_malformed_error_kind_and_detail():
    p = parser()
    with pytest.raises(ClientError) as info:
        p.feed(MALFORMED["cl_plus"])
    assert info.value.kind == "malformed request"
    assert info.value.detail                       # llhttp's reason
    assert isinstance(info.value, OSError)


def test_good_request_then_garbage_queues_the_good_one_then_raises():
    p = parser()
    with pytest.raises(ClientError) as info:
        p.feed(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\nBLAH\x00\r\n\r\n")
    assert info.value.status == 400
    assert [r.target for r in p.ready] == [b"/ok"]
    assert p.ready[0].complete


# ------------------------------------------------------------------ connection helpers
@pytest.mark.parametrize("name, key", [
    (b"Host", "HTTP_HOST"),
    (b"x-forwarded-for", "HTTP_X_FORWARDED_FOR"),
    (b"X-Forwarded-For", "HTTP_X_FORWARDED_FOR"),
    (b"Content-Type", "CONTENT_TYPE"),
    (b"content-type", "CONTENT_TYPE"),
    (b"Content-Length", "CONTENT_LENGTH"),
    (b"CONTENT-LENGTH", "CONTENT_LENGTH"),
    (b"X_Forwarded_For", ""),
    (b"Content_Length", ""),
    (b"x_y", ""),
])
def test_environ_key(name, key):
    assert environ_key(name) == key


@pytest.mark.parametrize("target, expected", [
    (b"/", (b"/", b"")),
    (b"/p", (b"/p", b"")),
    (b"/p?q=1", (b"/p", b"q=1")),
    (b"/p?q=1&r=2", (b"/p", b"q=1&r=2")),
    (b"/p?a?b", (b"/p", b"a?b")),
    (b"/p?", (b"/p", b"")),
    (b"/p#frag", (b"/p", b"")),
    (b"/p?q=1#frag", (b"/p", b"q=1")),
    (b"/p#frag?notquery", (b"/p", b"")),
    (b"/a%20b?x=%20", (b"/a%20b", b"x=%20")),
    (b"http://h/p?q=1", (b"/p", b"q=1")),
    (b"http://h:8080/p/q", (b"/p/q", b"")),
    (b"http://h", (b"/", b"")),
    (b"http://h/p?q=1#f", (b"/p", b"q=1")),
    (b"*", (b"*", b"")),
])
def test_split_target(target, expected):
    assert split_target(target) == expected


def test_split_target_refuses_a_target_that_is_no_url():
    with pytest.raises(ClientError) as info:
        split_target(b"no url")
    assert info.value.status == 400
