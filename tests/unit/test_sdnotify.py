"""sd_notify: the wording and framing (pure), the sender against real datagram
sockets, and what the master (driven with fakes) tells systemd, in what order."""

from __future__ import annotations

import logging
import os
import signal
import socket

import pytest
from master_fakes import booting, exit_worker, make_master, say_ready, sig, start

from ipserve import sdnotify
from ipserve.master import adoption
from ipserve.sdnotify import Event, Notifier, Phase, Snapshot, message, status_line

LOG = logging.getLogger("test-sdnotify")


def parse(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().split("\n"))


# ---------------------------------------------------------------- framing

def test_message_is_key_value_lines_in_order():
    assert message(READY=1, STATUS="4 workers, generation 3") == \
        b"READY=1\nSTATUS=4 workers, generation 3"


def test_a_newline_in_a_value_cannot_forge_another_assignment():
    assert parse(message(STATUS="failed:\nMAINPID=1\r\nREADY=1")) == \
        {"STATUS": "failed: MAINPID=1  READY=1"}


@pytest.mark.parametrize("key", ["ready", "A=B", "", "1X", "STATUS\n"])
def test_a_key_that_is_not_a_key_is_a_bug(key):
    with pytest.raises(ValueError):
        message(**{key: 1})


def test_each_event_is_the_datagrams_systemd_expects():
    def fields(event, **kw):
        return [parse(d) for d in sdnotify.messages(event, "s", monotonic_usec=42, **kw)]
    assert fields(Event.READY) == [{"READY": "1", "STATUS": "s"}]
    assert fields(Event.RELOADING) == [{"RELOADING": "1", "MONOTONIC_USEC": "42", "STATUS": "s"}]
    assert fields(Event.RELOAD_REFUSED) == [{"RELOADING": "1", "MONOTONIC_USEC": "42"},
                                            {"READY": "1", "STATUS": "s"}]
    assert fields(Event.STOPPING) == [{"STOPPING": "1", "STATUS": "s"}]
    assert fields(Event.MAIN_PID, pid=1234) == [{"MAINPID": "1234", "STATUS": "s"}]
    assert fields(Event.MAIN_PID) == []


@pytest.mark.parametrize("value,expected", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@sd-notify/1", "\0sd-notify/1"),
    (None, None), ("", None), ("@", None), ("relative/path", None),
])
def test_notify_socket_addresses(value, expected):
    assert sdnotify.address(value) == expected


@pytest.mark.parametrize("usec,pid,expected", [
    ("30000000", None, 15.0),
    ("30000000", "4242", 15.0),          # meant for us
    ("30000000", "1", None),             # meant for another process
    (None, None, None), ("", None, None), ("0", None, None), ("-5", None, None),
    ("soon", None, None), ("30000000", "me", None),
])
def test_watchdog_interval_is_half_of_watchdog_usec_and_only_ours(usec, pid, expected):
    assert sdnotify.watchdog_interval(usec, pid, own_pid=4242) == expected


# ---------------------------------------------------------------- STATUS= wording

@pytest.mark.parametrize("snap,line", [
    (Snapshot(Phase.SERVING, 4, 3, served=4, retiring=1), "4 workers, generation 3, 1 retiring"),
    (Snapshot(Phase.SERVING, 4, 3, served=4), "4 workers, generation 3"),
    (Snapshot(Phase.SERVING, 1, 1, served=1), "1 worker, generation 1"),
    (Snapshot(Phase.SERVING, 4, 3, served=3), "3 of 4 workers serving, generation 3"),
    (Snapshot(Phase.SERVING, 4, 2, served=4, last_reload_failed=True),
     "4 workers, generation 2 (the last reload failed: see ipservectl status)"),
    (Snapshot(Phase.RELOADING, 4, 2, served=4, reload_generation=3, reload_ready=2,
              reload_targets=4), "reloading: 2/4 of generation 3 ready"),
    (Snapshot(Phase.RELOADING, 4, 3, served=4, retiring=4, reload_generation=4,
              reload_ready=0, reload_targets=8), "reloading: 0/8 of generation 4 ready; 4 retiring"),
    (Snapshot(Phase.STOPPING, 4, 3, finishing=3), "stopping: 3 workers finishing"),
    (Snapshot(Phase.STOPPING, 4, 3, finishing=1), "stopping: 1 worker finishing"),
    (Snapshot(Phase.STARTING, 4, 1, served=2), "starting: 2/4 workers ready"),
])
def test_status_lines_a_person_can_read(snap, line):
    assert status_line(snap) == line


# ---------------------------------------------------------------- sending

@pytest.fixture
def listener(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_sends_one_datagram_to_a_path_socket(listener):
    sock, path = listener
    notifier = Notifier(path, LOG)
    notifier.notify(Event.READY, "2 workers, generation 1")
    assert parse(sock.recv(4096)) == {"READY": "1", "STATUS": "2 workers, generation 1"}
    notifier.close()


def test_sends_to_an_abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"ipserve-test-{os.getpid()}-{id(sock)}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, LOG)
        notifier.notify(Event.STOPPING, "stopping: 2 workers finishing")
        assert parse(sock.recv(4096))["STOPPING"] == "1"
    finally:
        sock.close()


def test_from_environ_takes_the_variables_away_from_children():
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid()),
           "PATH": "/bin"}
    notifier = Notifier.from_environ(env, LOG)
    assert env == {"PATH": "/bin"}
    assert notifier.address == "/run/x" and notifier.watchdog == 1.0


def test_nothing_is_sent_or_computed_without_notify_socket():
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "2000000"}, LOG)
    assert not notifier.enabled and notifier.watchdog is None
    notifier.notify(Event.READY, "x")
    notifier.tick(0.0, lambda: pytest.fail("STATUS computed with nobody listening"))


def test_a_send_that_fails_never_raises_and_is_logged_once(tmp_path, caplog):
    notifier = Notifier(str(tmp_path / "nobody-listens"), LOG)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for _ in range(3):
            notifier.notify(Event.READY, "x")
            assert notifier.send(b"READY=1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_tick_sends_status_only_when_it_changes_and_watchdog_when_due(listener):
    sock, path = listener
    sock.setblocking(False)
    notifier = Notifier(path, LOG, watchdog=1.0)
    text = ["4 workers, generation 1"]

    def received() -> list[dict]:
        out = []
        while True:
            try:
                out.append(parse(sock.recv(4096)))
            except BlockingIOError:
                return out
    notifier.tick(100.0, lambda: text[0])
    assert received() == [{"STATUS": "4 workers, generation 1", "WATCHDOG": "1"}]
    notifier.tick(100.5, lambda: text[0])
    assert received() == []                              # nothing changed, nothing due
    text[0] = "reloading: 0/4 of generation 2 ready"
    notifier.tick(100.6, lambda: text[0])
    assert received() == [{"STATUS": "reloading: 0/4 of generation 2 ready"}]
    notifier.tick(101.0, lambda: text[0])
    assert received() == [{"WATCHDOG": "1"}]


def test_a_bug_describing_the_master_costs_neither_the_tick_nor_the_watchdog(listener, caplog):
    sock, path = listener
    notifier = Notifier(path, LOG, watchdog=1.0)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        notifier.tick(0.0, lambda: 1 / 0)
        notifier.tick(5.0, lambda: 1 / 0)
    assert parse(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert parse(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert len([r for r in caplog.records if "STATUS" in r.message]) == 1


# ---------------------------------------------------------------- what the master says

class Recorder(Notifier):
    """A notifier that keeps the datagrams it would send."""

    def __init__(self):
        super().__init__("/nowhere", LOG)
        self.sent: list[dict] = []

    def send(self, data: bytes) -> bool:
        self.sent.append(parse(data))
        return True

    def events(self) -> list[str]:
        keys = ("READY", "RELOADING", "STOPPING", "MAINPID")
        return [k for m in self.sent for k in keys if k in m]


def master_with_recorder(tmp_path, **kw):
    master = make_master(tmp_path, **kw)
    master.notifier = Recorder()
    return master, master.notifier


def test_ready_once_every_slot_is_served_and_not_before(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    master.begin()
    master.tick()
    say_ready(master, booting(master)[:1])
    master.tick()
    master.tick()                                     # STATUS= is counted as a tick begins
    assert rec.events() == []
    assert rec.sent[-1] == {"STATUS": "starting: 1/2 workers ready"}
    start(master)
    assert rec.events() == ["READY"]
    ready = next(m for m in rec.sent if "READY" in m)
    assert ready["STATUS"] == "2 workers, generation 1"
    for _ in range(3):
        master.tick()
    assert rec.events() == ["READY"]                  # never again for the start


def test_hup_is_reloading_then_ready_when_the_new_generation_has_every_slot(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    rec.sent.clear()
    sig(master, signal.SIGHUP)
    assert rec.events() == ["RELOADING"]
    assert int(rec.sent[0]["MONOTONIC_USEC"]) <= sdnotify.monotonic_usec()
    assert rec.sent[0]["STATUS"] == "reloading: 0/2 of generation 2 ready"
    master.tick()
    say_ready(master, booting(master)[:1])
    master.tick()
    assert "reloading: 1/2 of generation 2 ready" in [m.get("STATUS") for m in rec.sent]
    assert rec.events() == ["RELOADING"]
    say_ready(master, booting(master))
    master.tick()
    assert rec.events() == ["RELOADING", "READY"]
    ready = next(m for m in rec.sent if "READY" in m)
    assert ready["STATUS"] == "2 workers, generation 2, 2 retiring"
    for record in [w for w in master.registry if w.generation == 1]:
        exit_worker(master, record)
    master.tick()
    assert rec.sent[-1]["STATUS"] == "2 workers, generation 2"


def test_a_failed_reload_is_over_too(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    rec.sent.clear()
    sig(master, signal.SIGTTIN)
    master.tick()
    failing = booting(master)[0]
    failing.boot_error = "SyntaxError: invalid syntax"
    exit_worker(master, failing, code=1)
    assert rec.events() == ["RELOADING", "READY"]
    assert rec.sent[-1]["STATUS"] == ("2 workers, generation 1 (the last reload failed: see "
                                      "ipservectl status)")


def test_a_refused_configuration_is_reloading_then_ready_at_once(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    rec.sent.clear()
    master.cfg.cli["workers"] = 3                     # not a power of two: refused on re-read
    sig(master, signal.SIGHUP)
    assert rec.events() == ["RELOADING", "READY"]
    assert "RELOADING" in rec.sent[0] and "MONOTONIC_USEC" in rec.sent[0]
    assert master.deploy is None and master.generation == 1


def test_a_reload_superseded_ends_before_the_next_begins(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    rec.sent.clear()
    sig(master, signal.SIGHUP)
    sig(master, signal.SIGHUP)
    assert rec.events() == ["RELOADING", "READY", "RELOADING"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT])
def test_stop_is_stopping_once_and_a_cancelled_reload_is_not_ready(tmp_path, signum):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    sig(master, signal.SIGHUP)
    rec.sent.clear()
    sig(master, signum)
    sig(master, signal.SIGINT)                        # TERM then INT: still one stop
    assert rec.events() == ["STOPPING"]
    assert rec.sent[0]["STATUS"] == "stopping: 2 workers finishing"


def test_handing_over_remembers_whom_to_name_as_main_pid(tmp_path):
    master, rec = master_with_recorder(tmp_path, workers=2)
    start(master)
    answer, _ = adoption.handover(master, 4321)
    assert answer["ok"] and master.successor_pid == 4321
    master.notify(Event.MAIN_PID, pid=master.successor_pid)
    assert rec.sent[-1]["MAINPID"] == "4321"


def test_no_tick_no_watchdog(tmp_path):
    """WATCHDOG=1 comes from the loop's tick only: a loop that stops ticking stops it."""
    master, rec = master_with_recorder(tmp_path, workers=2)
    rec.watchdog = 1.0
    start(master)
    pings = sum(1 for m in rec.sent if "WATCHDOG" in m)
    assert pings >= 1
    master.clock.advance(10)                          # time passes, the loop does not turn
    assert sum(1 for m in rec.sent if "WATCHDOG" in m) == pings
    master.tick()
    assert sum(1 for m in rec.sent if "WATCHDOG" in m) == pings + 1
