"""The control protocol: framing (ipserve.control) and message checks (ipserve.messages)."""

from __future__ import annotations

import math
import socket

import pytest

from ipserve import control, messages
from ipserve.master import state
from ipserve.messages import BadMessage, Phase


def test_lines_are_split_and_partial_lines_kept():
    reader = control.LineReader()
    assert reader.feed(b'{"a": 1}\n{"b"') == [{"a": 1}]
    assert reader.feed(b': 2}\n\n') == [{"b": 2}]


@pytest.mark.parametrize("line, why", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not a JSON object"),
    (b'"text"\n', "not a JSON object"),
    (b'{"lag_ms": NaN}\n', "NaN is not a number"),
    (b'{"lag_ms": Infinity}\n', "Infinity"),
    (b"\xff\xfe\n", "not JSON"),
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", "longer than 65536 bytes"),
])
def test_framing_errors(line, why):
    with pytest.raises(control.FramingError, match=why):
        control.LineReader().feed(line)


def test_deep_nesting_within_the_line_limit_is_a_framing_error():
    with pytest.raises(control.FramingError, match="nested too deeply"):
        control.LineReader().feed(b"[" * 30_000 + b"]" * 30_000 + b"\n")


def test_a_line_that_never_ends_is_cut_off():
    reader = control.LineReader(max_line=1000)
    reader.feed(b"x" * 900)
    with pytest.raises(control.FramingError, match="longer than 1000"):
        reader.feed(b"x" * 200)


def test_peer_credentials_come_from_the_kernel():
    a, b = socket.socketpair()
    with a, b:
        peer = control.peer_of(a)
    import os
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())


def good_hello(**changes):
    return {"type": "hello", "name": "web", "pid": 123, "slot": 1, "generation": 2,
            "phase": "ready", "connections": 0, "requests": 5, **changes}


def good_heartbeat(**changes):
    return {"type": "heartbeat", "connections": 3, "requests": 9, "lag_ms": 1.5,
            "too_busy": False, "shed": 0, "websockets": 1, "phase": "active", **changes}


def test_well_formed_worker_messages():
    h = messages.parse_from_worker(good_hello(port=1, extra={"ignored": True}))
    assert (h.pid, h.slot, h.generation, h.phase) == (123, 1, 2, Phase.READY)
    beat = messages.parse_from_worker(good_heartbeat(lag_ms=3))
    assert beat.lag_ms == 3.0 and isinstance(beat.lag_ms, float)
    assert messages.parse_from_worker({"type": "boot-failed", "error": "x"}).error == "x"
    beat = messages.parse_from_worker(good_heartbeat(responses=[0, 5, 0, 1, 0], durations=[3] * 17,
                                                     duration_sum=0.25))
    assert beat.responses == (0, 5, 0, 1, 0) and beat.durations == (3,) * 17
    report = messages.parse_from_worker({"type": "leak-report", "mode": "types", "lifetime_s": 1,
                                         "requests": 2, "growth": [{"what": "a.B", "count": -3,
                                                                    "size": 40}]})
    assert report.growth == (messages.Growth("a.B", -3, 40),) and report.error is None


def test_text_a_worker_sends_for_people_to_read_cannot_carry_control_characters():
    # Application code names its classes and writes its exceptions: a terminal
    # escape in a type name must not reach `ipservectl leaks`, nor a newline
    # forge a line of the master's log.
    report = messages.parse_from_worker({
        "type": "leak-report", "mode": "types", "lifetime_s": 1, "requests": 2,
        "error": "boom\nFAKE LINE", "growth": [{"what": "m.\x1b[2JX", "count": 1, "size": 1}]})
    assert report.growth[0].what == "m.\\x1b[2JX" and report.error == "boom\\nFAKE LINE"
    failed = messages.parse_from_worker({"type": "boot-failed", "error": "bad\r\x07 é"})
    assert failed.error == "bad\\r\\x07 é"


@pytest.mark.parametrize("message", [
    good_hello(pid=0), good_hello(pid="123"), good_hello(pid=True), good_hello(pid=1.0),
    good_hello(slot=-1), good_hello(slot=1 << 20), good_hello(generation=0),
    good_hello(phase="dancing"), good_hello(name="x" * 65), good_hello(name=None),
    {k: v for k, v in good_hello().items() if k != "requests"},
    good_heartbeat(connections=-1), good_heartbeat(connections=1 << 41),
    good_heartbeat(lag_ms=math.inf), good_heartbeat(lag_ms="1"), good_heartbeat(too_busy=1),
    good_heartbeat(websockets=None), good_heartbeat(phase=3),
    {"type": "boot-failed", "error": "e" * 2001}, {"type": "boot-failed", "error": ["e"]},
    good_heartbeat(responses=[1, "2"]), good_heartbeat(responses=[-1]),
    good_heartbeat(durations=[0] * 65), good_heartbeat(durations="0"),
    good_heartbeat(duration_sum=math.nan),
    {"type": "leak-report", "mode": "heap", "lifetime_s": 1, "requests": 0, "growth": []},
    {"type": "leak-report", "mode": "types", "lifetime_s": 1, "requests": 0,
     "growth": [{"what": "x", "count": 1, "size": 0}] * 51},
    {"type": "leak-report", "mode": "types", "lifetime_s": 1, "requests": 0, "growth": {}},
    {"type": "ready", "pid": 1}, {"type": None}, {},
])
def test_malformed_worker_messages_are_refused_whole(message):
    with pytest.raises(BadMessage):
        messages.parse_from_worker(message)


def test_requests():
    assert messages.parse_request({"cmd": "status"}).command is messages.Command.STATUS
    assert messages.parse_request({"cmd": "handover", "pid": 7}).pid == 7
    for bad in ({"cmd": "rm -rf"}, {"cmd": ["status"]}, {"cmd": "handover", "pid": -1}):
        with pytest.raises(BadMessage):
            messages.parse_request(bad)


def test_orders_to_workers():
    assert messages.parse_order({"type": "retire"}).kind is messages.ToWorker.RETIRE
    with pytest.raises(BadMessage):
        messages.parse_order({"type": "exec", "argv": ["sh"]})


def recorded(**worker_changes):
    return {"version": 1, "name": "web", "master_pid": 10, "router": "nft",
            "binds": ["0.0.0.0:8000"], "generation": 3, "serial": 9, "slots": 2,
            "workers": [{"pid": 11, "start_time": 5, "slot": 0, "generation": 3, "serial": 9,
                         "state": "active", "port": 40000, "inodes": [77], "holder": True,
                         **worker_changes}]}


def test_state_file_round_trip():
    parsed = state.parse(recorded())
    assert parsed.workers[0].inodes == (77,) and parsed.workers[0].holder is True
    again = state.render(parsed.name, parsed.master_pid, parsed.router, list(parsed.binds),
                         parsed.generation, parsed.serial, parsed.slots, list(parsed.workers))
    assert state.parse(again) == parsed


@pytest.mark.parametrize("changes", [{"pid": "11"}, {"state": "zombie"}, {"inodes": "77"},
                                     {"inodes": [-1]}, {"holder": 1}, {"port": 70000}])
def test_a_damaged_state_file_is_refused(changes):
    with pytest.raises(BadMessage):
        state.parse(recorded(**changes))
