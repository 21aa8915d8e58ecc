"""ipserve.http.clientlog.ClientErrorLog: the first client error of a kind is
logged, the rest of its interval counted, the count logged after it."""

from __future__ import annotations

import itertools
import logging

import pytest

from ipserve.http.clientlog import INTERVAL, ClientErrorLog


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


_LOGGERS = itertools.count()


@pytest.fixture
def setup():
    logger = logging.getLogger(f"test_clientlog.{next(_LOGGERS)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    capture = Capture()
    logger.addHandler(capture)
    clock = Clock()
    yield ClientErrorLog(logger, clock), clock, capture
    logger.removeHandler(capture)


def test_default_interval_is_10_seconds():
    assert INTERVAL == 10.0
    assert ClientErrorLog(logging.getLogger("x"), Clock()).interval == 10.0


def test_first_of_a_kind_is_logged(setup):
    log, _clock, capture = setup
    log.note("request line too long", "192.0.2.1", "detail here")
    [message] = capture.messages()
    assert "request line too long" in message
    assert "192.0.2.1" in message
    assert "detail here" in message


def test_no_detail(setup):
    log, _clock, capture = setup
    log.note("malformed request", "192.0.2.1")
    [message] = capture.messages()
    assert "malformed request" in message and "192.0.2.1" in message
    assert not message.endswith(": ")


def test_never_a_traceback(setup):
    log, _clock, capture = setup
    try:
        raise ValueError("inside a handler")
    except ValueError:
        log.note("malformed request", "192.0.2.1", "x")
    assert capture.records[0].exc_info is None


def test_the_rest_of_the_interval_is_counted_not_logged(setup):
    log, clock, capture = setup
    log.note("malformed request", "192.0.2.1")
    for i in range(999):
        clock.now += 0.001
        log.note("malformed request", f"192.0.2.{i % 250}")
    assert len(capture.records) == 1


def test_kinds_are_counted_separately(setup):
    log, _clock, capture = setup
    log.note("malformed request", "a")
    log.note("request line too long", "a")
    log.note("malformed request", "a")
    log.note("request line too long", "a")
    messages = capture.messages()
    assert len(messages) == 2
    assert "malformed request" in messages[0]
    assert "request line too long" in messages[1]


def test_summary_after_the_interval_via_note(setup):
    log, clock, capture = setup
    log.note("malformed request", "a")
    for _ in range(5):
        log.note("malformed request", "b")
    clock.now += 9.5
    log.note("malformed request", "c")
    assert len(capture.records) == 1
    clock.now += 0.5                                # the interval has passed
    log.note("malformed request", "d", "the new first")
    messages = capture.messages()
    assert len(messages) == 3
    assert "malformed request" in messages[1] and "6" in messages[1]
    assert "10s" in messages[1]
    assert "d" in messages[2] and "the new first" in messages[2]
    # and a new window started with it
    log.note("malformed request", "e")
    assert len(capture.records) == 3


def test_summary_after_the_interval_via_flush(setup):
    log, clock, capture = setup
    log.note("header block too large", "a")
    log.note("header block too large", "a")
    log.note("header block too large", "a")
    log.flush()
    assert len(capture.records) == 1                # interval not over yet
    clock.now += INTERVAL
    log.flush()
    messages = capture.messages()
    assert len(messages) == 2
    assert "header block too large" in messages[1]
    assert "2 more" in messages[1]
    log.flush()
    assert len(capture.records) == 2                # reported once
    log.note("header block too large", "a")         # a new window: logged again
    assert len(capture.records) == 3


def test_flush_without_suppressed_errors_logs_nothing(setup):
    log, clock, capture = setup
    log.note("malformed request", "a")
    clock.now += 60
    log.flush()
    assert len(capture.records) == 1
    log.note("malformed request", "a")
    assert len(capture.records) == 2


def test_flush_reports_only_the_windows_that_ended(setup):
    log, clock, capture = setup
    log.note("kind a", "x")
    log.note("kind a", "x")
    clock.now += 5
    log.note("kind b", "x")
    log.note("kind b", "x")
    clock.now += 5                                  # a's window is over, b's is not
    log.flush()
    messages = capture.messages()
    assert len(messages) == 3
    assert "kind a" in messages[2] and "1 more" in messages[2]
    clock.now += 5
    log.flush()
    messages = capture.messages()
    assert len(messages) == 4
    assert "kind b" in messages[3] and "1 more" in messages[3]


def test_custom_interval(setup):
    default, clock, capture = setup
    log = ClientErrorLog(default.log, clock, interval=2.5)
    log.note("k", "x")
    log.note("k", "x")
    clock.now += 2.4
    log.flush()
    assert len(capture.records) == 1
    clock.now += 0.1
    log.flush()
    assert len(capture.records) == 2
    assert "2.5s" in capture.messages()[-1]
