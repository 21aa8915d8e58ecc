"""The access log's atoms and formats (ipserve.accesslog), the format check at
config time, and the JSON formatters of both logs (ipserve.logs)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import sys
import time

import pytest

from ipserve import accesslog, config, logs
from ipserve.accesslog import atoms, format_line, validate_format

# 10/Oct/2000 13:55:36 at -0700 (gunicorn's example), plus a quarter second.
STARTED = 971211336.25


@pytest.fixture
def mst(monkeypatch):
    """Local time is UTC-7 (a POSIX TZ rule: no tz database needed)."""
    monkeypatch.setenv("TZ", "MST+7")
    # Cached per second, not per zone.
    monkeypatch.setattr(accesslog, "_clf_cache", (-1, ""))
    monkeypatch.setattr(accesslog, "_iso_cache", (-1, "", ""))
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make(**overrides) -> accesslog.Atoms:
    environ = {
        "REQUEST_METHOD": "GET", "PATH_INFO": "/a b", "QUERY_STRING": "x=1&y=2",
        "REMOTE_ADDR": "198.18.0.16", "REMOTE_PORT": "40000", "wsgi.url_scheme": "http",
        "HTTP_REFERER": "http://example.com/from", "HTTP_USER_AGENT": "curl/8.0",
        "HTTP_X_TEST": "hello", "CONTENT_TYPE": "text/plain",
        "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"alice:s3cret").decode(),
    }
    environ.update(overrides.pop("environ", {}))
    fields = {"remote": "198.18.0.16", "method": "GET", "target": "/a%20b?x=1&y=2",
              "version": "1.1", "status": "200 OK", "sent": 1234,
              "response_headers": [("Content-Type", "application/json"), ("Set-Cookie", "a=1"),
                                   ("set-cookie", "b=2")],
              "environ": environ, "started": STARTED, "duration": 1.2345678, "pid": 4242}
    fields.update(overrides)
    return atoms(**fields)


# ------------------------------------------------------------------ atoms

def test_every_atom(mst):
    a = make()
    expected = {
        "h": "198.18.0.16", "l": "-", "u": "alice", "t": "[10/Oct/2000:13:55:36 -0700]",
        "r": "GET /a%20b?x=1&y=2 HTTP/1.1", "m": "GET", "U": "/a%20b", "q": "x=1&y=2",
        "H": "HTTP/1.1", "s": "200", "B": 1234, "b": "1234", "f": "http://example.com/from",
        "a": "curl/8.0", "T": 1, "D": 1234567, "M": 1234, "L": "1.234568", "p": "<4242>",
    }
    assert set(expected) == set(accesslog.ATOM_NAMES)
    for name, value in expected.items():
        assert a[name] == value, name


def test_common_log_format_default(mst):
    line = format_line(config.DEFAULT_ACCESS_LOG_FORMAT, make())
    assert line == '198.18.0.16 - alice [10/Oct/2000:13:55:36 -0700] "GET /a%20b?x=1&y=2 HTTP/1.1" 200 1234'


def test_absent_values_are_dashes():
    a = make(environ={"HTTP_AUTHORIZATION": None}, remote="", status=None, sent=0,
             response_headers=None)
    a.environ.clear()
    assert [a[k] for k in "hufasbB"] == ["-", "-", "-", "-", "-", "-", 0]
    assert a["{x-test}i"] == a["{content-type}o"] == a["{nothing}e"] == "-"


@pytest.mark.parametrize("authorization", [
    "Bearer abc", "Basic !!!notbase64", "Basic", "Digest username=alice"])
def test_user_only_from_a_valid_basic_header(authorization):
    assert make(environ={"HTTP_AUTHORIZATION": authorization})["u"] == "-"


def test_header_and_environ_atoms_are_case_insensitive():
    a = make()
    assert a["{X-Test}i"] == a["{x-test}i"] == a["{X-TEST}i"] == "hello"
    assert a["{content-type}i"] == "text/plain"      # CONTENT_TYPE has no HTTP_ prefix
    assert a["{Content-Type}o"] == a["{content-type}o"] == "application/json"
    assert a["{set-cookie}o"] == "a=1, b=2"           # repeated fields, joined
    assert a["{remote_port}e"] == a["{REMOTE_PORT}e"] == "40000"
    assert a["{WSGI.URL_SCHEME}e"] == "http"


def test_path_and_query_as_sent():
    assert (make(target="/p%2Fq?a=%41#frag")["U"], make(target="/p%2Fq?a=%41#frag")["q"]) == \
        ("/p%2Fq", "a=%41")
    absolute = make(target="http://example.com/x/y?z=1")
    assert (absolute["U"], absolute["q"]) == ("/x/y", "z=1")
    assert make(target="*", method="OPTIONS")["U"] == "*"


def test_http_10():
    a = make(version="1.0")
    assert a["H"] == "HTTP/1.0" and a["r"].endswith(" HTTP/1.0")


def test_unknown_atom_is_a_key_error():
    with pytest.raises(KeyError):
        make()["x"]


# ------------------------------------------------------------------ escaping

HOSTILE = 'a\x1b[31mb\r\nc"d\\e\tf\xe9\x85\u2028'


def test_escaping_keeps_one_line_and_its_quotes():
    a = make(target="/" + HOSTILE, environ={"HTTP_USER_AGENT": HOSTILE})
    line = format_line('%(h)s "%(r)s" "%(a)s" %(U)s %({user-agent}i)s', a)
    assert len(line.splitlines()) == 1
    assert not re.search(r'[\x00-\x1f\x7f-\uffff]', line), line
    escaped = 'a\\x1b[31mb\\r\\nc\\"d\\\\e\\tf\\xe9\\x85\\u2028'
    assert line == (f'198.18.0.16 "GET /{escaped} HTTP/1.1" "{escaped}" /{escaped} {escaped}')
    # Every quoted field ends where it seems to: a log parser splits it back.
    fields = re.findall(r'"((?:[^"\\]|\\.)*)"', line)
    assert fields == [f"GET /{escaped} HTTP/1.1", escaped]


def test_escaping_of_every_source():
    bad = "x\ny"
    a = make(environ={"HTTP_REFERER": bad, "HTTP_X_TEST": bad, "evil": bad,
                      "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(b"a\nb:pw").decode()},
             response_headers=[("X-Out", bad)])
    line = format_line("%(f)s %({x-test}i)s %({evil}e)s %(u)s %({x-out}o)s", a)
    assert line == "x\\ny x\\ny x\\ny a\\nb x\\ny"


def test_printable_ascii_is_left_alone():
    text = "".join(chr(c) for c in range(0x20, 0x7f) if chr(c) not in '"\\')
    assert accesslog.escape(text) == text


# ------------------------------------------------------------------ checking formats

@pytest.mark.parametrize("fmt", [
    config.DEFAULT_ACCESS_LOG_FORMAT,
    '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"',   # gunicorn's default
    "%(B)d %(D)06d %(T)s %(M)d %(L)s %(p)s 100%%",
    "%({X-Request-Id}i)s %({content-type}o)s %({REMOTE_PORT}e)s %(m)s %(U)s %(q)s %(H)s",
    "no atoms at all",
])
def test_good_formats(fmt):
    assert validate_format(fmt) == fmt


@pytest.mark.parametrize("fmt, says", [
    ("%(h)s %(x)s", "unknown atom %(x)s"),
    ("%({x-test})s", "unknown atom %({x-test})s"),
    ("%({x-test}z)s", "unknown atom %({x-test}z)s"),
    ("%(h)s %s", "every % needs an atom name"),
    ("%s", "every % needs an atom name"),
    ("%r", "every % needs an atom name"),
    ("%(h)", "bad % pattern"),
    ("%(h", "bad % pattern"),
    ("%(h)y", "bad % pattern"),
    ("100%", "bad % pattern"),
    ("%(s)d", "bad % pattern"),        # s is text, as in gunicorn
    ("", "non-empty"),
])
def test_bad_formats(fmt, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        validate_format(fmt)


def test_config_names_the_key_in_one_line():
    with pytest.raises(config.ConfigError) as info:
        config.resolve({"app": "a:b", "access_log_format": "%(h)s %(hh)s"}, environ={})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("access_log_format = '%(h)s %(hh)s' (from command line "
                              "--access-log-format): unknown atom %(hh)s")


def test_config_default_format_is_common_log_format():
    cfg = config.resolve({"app": "a:b"}, environ={})
    assert cfg.access_log_format == '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'
    assert cfg.log_format == "text"


# ------------------------------------------------------------------ JSON

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}[+-]\d{2}:\d{2}$")


def test_iso_time_has_the_offset(mst):
    assert accesslog.iso_time(STARTED) == "2000-10-10T13:55:36.250-07:00"


def _access_log(log_format: logs.LogFormat, fmt: str = config.DEFAULT_ACCESS_LOG_FORMAT):
    stream = io.StringIO()
    logger = logging.getLogger(f"test.access.{log_format.value}")
    logger.handlers[:] = [logging.StreamHandler(stream)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logs.AccessLog(logger, fmt, log_format), stream


def test_access_log_text_line(mst):
    log, stream = _access_log(logs.LogFormat.TEXT, "%(r)s 100%% %(s)s")
    log.write(make())
    assert stream.getvalue() == "GET /a%20b?x=1&y=2 HTTP/1.1 100% 200\n"


def test_access_log_json_object(mst):
    log, stream = _access_log(logs.LogFormat.JSON)
    log.write(make(target="/" + HOSTILE + "?q=" + HOSTILE, environ={"HTTP_USER_AGENT": HOSTILE}))
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.isascii()
    entry = json.loads(text)
    assert entry == {
        "time": "2000-10-10T13:55:36.250-07:00", "remote_addr": "198.18.0.16", "method": "GET",
        "path": "/" + HOSTILE, "query": "q=" + HOSTILE, "protocol": "HTTP/1.1", "status": 200,
        "bytes": 1234, "duration_s": 1.234568, "referer": "http://example.com/from",
        "user_agent": HOSTILE, "pid": 4242, "message": entry["message"],
    }
    assert entry["message"].startswith('198.18.0.16 - alice [10/Oct/2000:13:55:36 -0700] "GET /a\\x1b')


def test_access_log_json_without_a_response_or_headers():
    log, stream = _access_log(logs.LogFormat.JSON)
    log.write(make(status=None, sent=0, environ={"HTTP_REFERER": None}, remote=""))
    entry = json.loads(stream.getvalue())
    assert entry["status"] is None and entry["bytes"] == 0 and entry["remote_addr"] is None


def _record(message: str, exc_info=None, stack_info: str | None = None) -> logging.LogRecord:
    return logging.LogRecord("ipserve", logging.ERROR, __file__, 1, message, (), exc_info,
                             sinfo=stack_info)


def test_json_error_log_is_one_line_with_a_traceback():
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        exc_info = sys.exc_info()
    message = "leak report:\n  growth: dict +12\n  growth: list +3 \u2028 end"
    text = logs.JsonFormatter().format(_record(message, exc_info, "Stack (most recent call last):\n  x"))
    assert "\n" not in text and text.isascii()
    entry = json.loads(text)
    assert set(entry) == {"time", "level", "pid", "logger", "message", "exc_info", "stack"}
    assert entry["message"] == message
    assert entry["level"] == "error" and entry["logger"] == "ipserve"
    assert isinstance(entry["pid"], int)
    assert ISO.match(entry["time"]), entry["time"]
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert entry["exc_info"].endswith("RuntimeError: boom\nsecond line")
    assert entry["stack"].startswith("Stack (most recent call last):")


def test_json_error_log_without_exception_has_no_exc_fields():
    entry = json.loads(logs.JsonFormatter().format(_record("ready on port 8000")))
    assert set(entry) == {"time", "level", "pid", "logger", "message"}


def test_text_error_log_has_a_timezone_aware_timestamp(mst):
    record = _record("hello")
    record.created = STARTED
    assert logs.error_formatter(logs.LogFormat.TEXT).format(record) == \
        f"[2000-10-10 13:55:36 -0700] [{record.process}] [ERROR] hello"


def test_setup_logs_write_json_to_files(tmp_path):
    error_path, access_path = tmp_path / "error.log", tmp_path / "access.log"
    error_logger = logging.getLogger("ipserve")
    access_logger = logging.getLogger("ipserve.access")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in (error_logger, access_logger)]
    try:
        log = logs.setup_error_log(str(error_path), "info", log_format="json")
        access = logs.setup_access_log(str(access_path), fmt="%(m)s %(U)s", log_format="json")
        log.info("two\nlines")
        access.write(make())
        logs.reopen_error_log()
        log.warning("after reopen")
    finally:
        for lg, handlers, level, propagate in saved:
            for handler in lg.handlers:
                if handler not in handlers:
                    lg.removeHandler(handler)
                    handler.close()
                    handler.stream.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate
        logs._error_log = None
    errors = [json.loads(line) for line in error_path.read_text().splitlines()]
    assert [e["message"] for e in errors] == ["two\nlines", "after reopen"]
    [entry] = [json.loads(line) for line in access_path.read_text().splitlines()]
    assert entry["message"] == "GET /a%20b" and entry["pid"] == 4242


def test_setup_access_log_none_without_a_target():
    assert logs.setup_access_log(None) is None
