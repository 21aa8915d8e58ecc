"""ipserve.http.response: build_head's framing decisions and checks, chunk
framing, the Date line. Pure functions."""

from __future__ import annotations

import re
import types

import pytest

from ipserve.http import response
from ipserve.http.response import LAST_CHUNK, Framing, build_head, chunk, date_line


def head(status="200 OK", headers=(), *, http10=False, head_request=False, body_length=None,
         keep_alive=True):
    return build_head(status, list(headers), http10=http10, head_request=head_request,
                      body_length=body_length, keep_alive=keep_alive)


def lines(data: bytes) -> list[str]:
    text = data.decode("latin-1")
    assert text.endswith("\r\n\r\n")
    return text[:-4].split("\r\n")


def fields(data: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in lines(data)[1:]]


def names(data: bytes) -> list[str]:
    return [name.lower() for name, _ in fields(data)]


# ------------------------------------------------------------------ framing
def test_length_from_the_applications_content_length():
    data, framing, length, keep = head(headers=[("Content-Length", "12")])
    assert framing == Framing.LENGTH
    assert length == 12
    assert keep is True
    assert names(data).count("content-length") == 1
    assert ("Content-Length", "12") in fields(data)
    assert "transfer-encoding" not in names(data)


def test_length_from_the_body_length():
    data, framing, length, _keep = head(body_length=5)
    assert framing == Framing.LENGTH
    assert length == 5
    assert ("Content-Length", "5") in fields(data)
    assert "transfer-encoding" not in names(data)


def test_empty_list_body_has_length_zero():
    data, framing, length, _ = head(body_length=0)
    assert framing == Framing.LENGTH and length == 0
    assert ("Content-Length", "0") in fields(data)


def test_applications_content_length_not_duplicated_with_body_length():
    data, framing, length, _ = head(headers=[("Content-Length", "3")], body_length=3)
    assert framing == Framing.LENGTH and length == 3
    assert names(data).count("content-length") == 1


def test_chunked_on_http11_without_a_length():
    data, framing, length, keep = head()
    assert framing == Framing.CHUNKED
    assert length is None
    assert keep is True
    assert ("Transfer-Encoding", "chunked") in fields(data)
    assert "content-length" not in names(data)
    assert "connection" not in names(data)


def test_close_delimited_on_http10_without_a_length():
    data, framing, length, keep = head(http10=True)
    assert framing == Framing.CLOSE
    assert length is None
    assert keep is False
    assert ("Connection", "close") in fields(data)
    assert "transfer-encoding" not in names(data)
    assert "content-length" not in names(data)


def test_http10_with_a_length_keeps_alive_and_says_so():
    data, framing, length, keep = head(http10=True, body_length=3)
    assert framing == Framing.LENGTH and length == 3
    assert keep is True
    assert ("Connection", "keep-alive") in fields(data)


def test_http10_not_keep_alive_says_close():
    data, framing, _, keep = head(http10=True, body_length=3, keep_alive=False)
    assert framing == Framing.LENGTH
    assert keep is False
    assert ("Connection", "close") in fields(data)


def test_response_line_is_http11_even_for_http10():
    data, *_ = head("404 Not Found", http10=True, body_length=0)
    assert lines(data)[0] == "HTTP/1.1 404 Not Found"


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified", "100 Continue",
                                    "101 Switching Protocols", "103 Early Hints"])
def test_no_body_for_1xx_204_304(status):
    for http10 in (False, True):
        data, framing, _, keep = head(status, http10=http10)
        assert framing == Framing.NONE
        assert keep is True
        assert "transfer-encoding" not in names(data)
        assert "content-length" not in names(data)


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_even_with_a_body_length(status):
    data, framing, _, _ = head(status, body_length=0)
    assert framing == Framing.NONE
    assert "transfer-encoding" not in names(data)


def test_head_request_has_no_body():
    data, framing, _, keep = head(head_request=True)
    assert framing == Framing.NONE
    assert keep is True
    assert "transfer-encoding" not in names(data)


def test_head_request_keeps_the_applications_content_length():
    data, framing, _length, _ = head(headers=[("Content-Length", "42")], head_request=True)
    assert framing == Framing.NONE
    assert ("Content-Length", "42") in fields(data)


def test_head_request_http10_without_length_can_keep_alive():
    data, framing, _, keep = head(http10=True, head_request=True)
    assert framing == Framing.NONE
    assert keep is True
    assert ("Connection", "keep-alive") in fields(data)


# ------------------------------------------------------------------ Connection
def test_keep_alive_false_says_connection_close():
    data, _framing, _, keep = head(body_length=2, keep_alive=False)
    assert keep is False
    assert ("Connection", "close") in fields(data)
    assert names(data).count("connection") == 1


def test_applications_connection_close_is_honoured():
    data, _framing, _, keep = head(headers=[("Connection", "close")], body_length=2)
    assert keep is False
    assert names(data).count("connection") == 1
    assert ("Connection", "close") in fields(data)


def test_applications_connection_close_any_case():
    data, _, _, keep = head(headers=[("connection", "Close")], body_length=2)
    assert keep is False
    assert names(data).count("connection") == 1


def test_applications_connection_keep_alive_is_dropped():
    data, _, _, keep = head(headers=[("Connection", "keep-alive")], body_length=2)
    assert keep is True
    assert "connection" not in names(data)
    data, _, _, keep = head(headers=[("Connection", "keep-alive")], body_length=2, keep_alive=False)
    assert keep is False
    assert fields(data).count(("Connection", "close")) == 1
    assert names(data).count("connection") == 1


# ------------------------------------------------------------------ Date, Server
def test_date_and_server_added():
    data, *_ = head(body_length=0)
    assert names(data).count("date") == 1
    assert ("Server", "ipserve") in fields(data)


def test_applications_date_and_server_not_duplicated():
    data, *_ = head(headers=[("Date", "Mon, 01 Jan 2001 00:00:00 GMT"), ("server", "mine")],
                    body_length=0)
    assert names(data).count("date") == 1
    assert names(data).count("server") == 1
    assert ("Date", "Mon, 01 Jan 2001 00:00:00 GMT") in fields(data)
    assert ("server", "mine") in fields(data)


def test_application_headers_kept_in_order_and_repeated():
    data, *_ = head(headers=[("Set-Cookie", "a=1"), ("X-A", "1"), ("Set-Cookie", "b=2")],
                    body_length=0)
    got = [f for f in fields(data) if f[0] in ("Set-Cookie", "X-A")]
    assert got == [("Set-Cookie", "a=1"), ("X-A", "1"), ("Set-Cookie", "b=2")]


def test_latin1_value_is_encoded_as_latin1():
    data, *_ = head(headers=[("X-Name", "caf\u00e9")], body_length=0)
    assert b"X-Name: caf\xe9\r\n" in data


# ------------------------------------------------------------------ what the application gets wrong
@pytest.mark.parametrize("headers", [
    [("X-A", "a\r\nSet-Cookie: evil=1")],
    [("X-A", "a\nb")],
    [("X-A", "a\rb")],
    [("X-A", "a\r\n")],
    [("X-A\r\nSet-Cookie", "evil=1")],
    [("X-A\n", "b")],
])
def test_cr_or_lf_in_a_header_is_a_value_error(headers):
    with pytest.raises(ValueError):
        head(headers=headers, body_length=0)


@pytest.mark.parametrize("status", ["200 OK\r\nSet-Cookie: evil=1", "200 OK\n", "200 O\rK"])
def test_cr_or_lf_in_the_status_is_a_value_error(status):
    with pytest.raises(ValueError):
        head(status, body_length=0)


@pytest.mark.parametrize("status", ["200", "OK", "2000 OK", "20 OK", "abc OK", "", b"200 OK", 200])
def test_invalid_status_is_a_value_error(status):
    with pytest.raises(ValueError):
        head(status, body_length=0)


@pytest.mark.parametrize("headers", [
    [("X-A", 1)],
    [(b"X-A", "1")],
    [("X-A", b"1")],
    [("X-A", None)],
])
def test_non_str_header_is_a_type_error(headers):
    with pytest.raises(TypeError):
        head(headers=headers, body_length=0)


@pytest.mark.parametrize("name", ["Transfer-Encoding", "transfer-encoding", "Keep-Alive", "Upgrade",
                                  "TE", "Trailer", "Proxy-Authenticate", "Proxy-Authorization"])
def test_hop_by_hop_header_from_the_application_is_a_value_error(name):
    with pytest.raises(ValueError):
        head(headers=[(name, "chunked")])


@pytest.mark.parametrize("value", ["-1", "1.5", "", "abc", " 5", "5 ", "\u0665"])
def test_invalid_content_length_is_a_value_error(value):
    with pytest.raises(ValueError):
        head(headers=[("Content-Length", value)])


def test_conflicting_content_lengths_are_a_value_error():
    # Two different lengths in one head: the server frames by one, a client or
    # proxy may read the other (response desync on a kept-alive connection).
    with pytest.raises(ValueError):
        head(headers=[("Content-Length", "5"), ("content-length", "10")])


@pytest.mark.parametrize("headers", [[("X-A", "\u20ac")], [("X-\u0100", "a")]])
def test_non_latin1_header_is_a_unicode_encode_error(headers):
    with pytest.raises(UnicodeEncodeError):
        head(headers=headers, body_length=0)


def test_non_latin1_status_is_a_unicode_encode_error():
    with pytest.raises(UnicodeEncodeError):
        head("200 \u2713", body_length=0)


# ------------------------------------------------------------------ chunks
def test_chunk_framing():
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    assert chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    assert chunk(b"x" * 4096) == b"1000\r\n" + b"x" * 4096 + b"\r\n"
    assert LAST_CHUNK == b"0\r\n\r\n"


# ------------------------------------------------------------------ Date
def _fake_time(monkeypatch, now: float) -> None:
    monkeypatch.setattr(response, "time", types.SimpleNamespace(time=lambda: now))


def test_date_line_format(monkeypatch):
    _fake_time(monkeypatch, 784111777.5)       # RFC 9110's example date
    assert date_line() == "Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"


def test_date_line_changes_with_the_second(monkeypatch):
    _fake_time(monkeypatch, 784111777.0)
    first = date_line()
    _fake_time(monkeypatch, 784111777.9)
    assert date_line() == first
    _fake_time(monkeypatch, 784111778.0)
    assert date_line() == "Date: Sun, 06 Nov 1994 08:49:38 GMT\r\n"


def test_date_line_now():
    assert re.fullmatch(r"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul"
                        r"|Aug|Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT\r\n", date_line())


def test_head_carries_the_current_date_line(monkeypatch):
    _fake_time(monkeypatch, 784111777.0)
    data, *_ = head(body_length=0)
    assert b"\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n" in data
