import json

import pytest

from ipserve import ctl
from ipserve.status import duration, render_leaks, render_table, signed_size


def test_table_shows_workers_reload_and_sockets():
    status = {
        "name": "web", "router": "reuseport", "bind": ["0.0.0.0:8000"], "app": "a:b",
        "master": {"pid": 10, "generation": 3}, "route_error": None,
        "reload": {"generation": 3, "state": "failed", "error": "SyntaxError in app.py",
                   "reason": "reload"},
        "slot_table": [{"slot": 0, "waiting_s": 4.5, "refusing": False}],
        "routing": {"sockets": [{"slot": 0, "fd": 7, "address": "0.0.0.0:8000"}]},
        "workers": [{"pid": 11, "slot": 0, "generation": 2, "port": 8000, "state": "retiring",
                     "rss": 31 << 20, "connections": 4, "requests": 9, "lag_ms": 0.5, "nice": 10,
                     "age_s": 60.0, "retired_for_s": 12.0}],
    }
    text = render_table(status)
    assert "router reuseport" in text
    assert ("last reload: generation 3 FAILED, every slot kept its worker: SyntaxError in app.py"
            in text)
    assert "slot 0: no active worker for 4.5s (its clients wait in its queue)" in text
    assert "slot 0 socket: fd 7 0.0.0.0:8000" in text
    row = text.splitlines()[-1].split()
    assert row == ["11", "0", "2", "8000", "retiring", "31.0MiB", "4", "9", "0.5", "10", "60", "12"]


def test_table_adds_websockets_and_requests_per_second_when_the_master_has_them():
    status = {"name": "web", "router": "nft", "bind": ["0.0.0.0:8000"], "master": {"pid": 1,
              "generation": 1},
              "workers": [{"pid": 11, "slot": 0, "generation": 1, "port": 8000, "state": "active",
                           "rss": 1 << 20, "connections": 4, "requests": 9, "lag_ms": 0.5,
                           "nice": 0, "age_s": 60.0, "retired_for_s": None, "websockets": 2,
                           "requests_per_s": 12.34}]}
    header, row = (line.split() for line in render_table(status).splitlines()[-2:])
    assert header == ["pid", "slot", "gen", "port", "state", "rss", "conns", "ws", "requests",
                      "req/s", "lag_ms", "nice", "age_s", "retired_s"]
    assert row == ["11", "0", "1", "8000", "active", "1.0MiB", "4", "2", "9", "12.3", "0.5", "0",
                   "60", "-"]


def test_table_of_a_worker_missing_fields_shows_dashes():
    status = {"name": "web", "router": "nft", "bind": [], "master": {"pid": 1, "generation": 1},
              "workers": [{"pid": 11, "slot": 0, "generation": 1, "state": "booting",
                           "rss": None, "lag_ms": None}]}
    row = render_table(status).splitlines()[-1].split()
    assert row == ["11", "0", "1", "-", "booting", "-", "-", "-", "-", "-", "-", "-"]


def test_table_says_how_old_the_heartbeat_counts_are():
    """Requests, connections and lag are what each worker said in its last
    heartbeat: the table says how long ago, per worker, and what that means."""
    status = {"name": "web", "router": "reuseport", "bind": ["127.0.0.1:8000"],
              "master": {"pid": 1, "generation": 1},
              "workers": [{"pid": 11, "slot": 0, "generation": 1, "port": 8000, "state": "active",
                           "rss": 1 << 20, "connections": 0, "requests": 10, "lag_ms": 0.5,
                           "nice": 0, "age_s": 60.0, "retired_for_s": None,
                           "heartbeat_age_s": 0.43},
                          {"pid": 12, "slot": 1, "generation": 1, "port": 8000, "state": "booting",
                           "heartbeat_age_s": 12}]}
    lines = render_table(status).splitlines()
    note, header, first, second = lines[-4:]
    assert note.startswith("conns, ws, requests, req/s, lag_ms: as each worker reported them in "
                           "its last heartbeat, beat_s seconds ago")
    assert header.split() == ["pid", "slot", "gen", "port", "state", "rss", "conns", "requests",
                              "lag_ms", "beat_s", "nice", "age_s", "retired_s"]
    assert first.split() == ["11", "0", "1", "8000", "active", "1.0MiB", "0", "10", "0.5", "0.4",
                             "0", "60", "-"]
    assert second.split()[header.split().index("beat_s")] == "12.0"


def test_table_of_an_older_master_has_no_heartbeat_column_nor_note():
    status = {"name": "web", "router": "nft", "bind": [], "master": {"pid": 1, "generation": 1},
              "workers": [{"pid": 11, "slot": 0, "generation": 1, "requests": 3}]}
    text = render_table(status)
    assert "beat_s" not in text and "heartbeat" not in text


def test_worker_status_carries_its_heartbeat_age():
    from ipserve.master.registry import WorkerRecord

    record = WorkerRecord(pid=11, slot=0, generation=1, serial=1, process=None, start_time=0,
                          spawned_at=100.0, last_seen=130.25, requests=10)
    st = record.as_status(now=131.0)
    assert (st["requests"], st["heartbeat_age_s"], st["age_s"]) == (10, 0.8, 31.0)


def leak_report(**overrides):
    return {"pid": 21, "slot": 1, "generation": 2, "mode": "types", "at": 1_700_000_000.0,
            "lifetime_s": 3725.0, "requests": 1200, "significant": False, "growth": [],
            "error": None} | overrides


def test_no_leak_reports_yet():
    assert render_leaks([]) == "no leak reports yet"


def test_leak_reports_oldest_first_with_growth_rows_under_each():
    text = render_leaks([
        leak_report(pid=21, significant=True, growth=[
            {"what": "app.models.Session", "count": 1200, "size": 3 << 20},
            {"what": "builtins.dict", "count": -5, "size": -400}]),
        leak_report(pid=22, mode="tracemalloc", lifetime_s=30.0, requests=3,
                    growth=[{"what": "app/views.py:123", "count": 7, "size": 2048}]),
    ])
    lines = text.splitlines()
    assert lines[0].split() == ["pid", "slot", "gen", "lifetime", "requests", "mode", "at",
                                "count", "size", "what"]
    first = lines[1].split()
    assert first[:7] == ["!", "21", "1", "2", "1h02m", "1200", "types"]
    assert first[-3:] == ["+1200", "+3.0MiB", "app.models.Session"]
    assert lines[2].split() == ["-5", "-400B", "builtins.dict"]
    newest = lines[3].split()
    assert newest[:6] == ["22", "1", "2", "30s", "3", "tracemalloc"]
    assert newest[-3:] == ["+7", "+2.0KiB", "app/views.py:123"]
    assert lines[-1] == "! = significant growth"
    # The numbers line up, the names start in one column.
    assert len({line.index(name) for line, name in zip(lines[1:4], (
        "app.models.Session", "builtins.dict", "app/views.py:123"))}) == 1


def test_leak_report_with_an_error_or_nothing_grown_or_keys_missing():
    text = render_leaks([leak_report(error="tracemalloc is not tracing"), leak_report(pid=23),
                         {"pid": 24}])
    lines = text.splitlines()
    assert lines[1].endswith("error: tracemalloc is not tracing")
    assert lines[2].split()[0] == "23" and lines[2].endswith("(nothing grew)")
    assert lines[3].split() == ["24", "-", "-", "-", "-", "-", "-", "(nothing", "grew)"]
    assert "significant" not in text


def test_signed_size():
    assert (signed_size(0), signed_size(512), signed_size(-3 << 20)) == ("0B", "+512B", "-3.0MiB")


@pytest.mark.parametrize("seconds, text", [(None, "-"), (5.4, "5s"), (65, "1m05s"),
                                           (3725, "1h02m"), (2 * 86400 + 3 * 3600, "2d03h")])
def test_duration(seconds, text):
    assert duration(seconds) == text


@pytest.fixture
def master_says(monkeypatch, tmp_path):
    """Run ipservectl against a pretend master that answers `status` with `reply`."""
    def run(reply, *argv):
        monkeypatch.setattr(ctl, "ask", lambda path, name, command, timeout: reply)
        return ctl.run(["-n", "web", "--runtime-dir", str(tmp_path), *argv])
    return run


def test_leaks_command_prints_the_table_or_the_list(master_says, capsys):
    reports = [leak_report()]
    assert master_says({"leak_reports": reports}, "leaks") == 0
    assert capsys.readouterr().out == render_leaks(reports) + "\n"
    assert master_says({"leak_reports": reports}, "leaks", "--json") == 0
    assert json.loads(capsys.readouterr().out) == reports
    assert master_says({"name": "older master"}, "leaks") == 0
    assert capsys.readouterr().out == "no leak reports yet\n"


# ---------------------------------------------------------------- no master

@pytest.mark.parametrize("uid, looked_in, elsewhere", [
    (0, "/run/ipserve is root's default runtime directory",
     "a master started by a user listens in its $XDG_RUNTIME_DIR/ipserve or /tmp/ipserve-<uid>"),
    (1000, "/tmp/ipserve-1000 is uid 1000's default runtime directory",
     ("a master started by root listens in /run/ipserve, by another user in its "
     "$XDG_RUNTIME_DIR/ipserve or /tmp/ipserve-<uid>")),
])
def test_no_master_says_where_it_looked_and_how_to_look_elsewhere(uid, looked_in, elsewhere):
    runtime_dir = "/run/ipserve" if uid == 0 else "/tmp/ipserve-1000"
    hint = ctl.where_we_looked(runtime_dir, "web", given=False, uid=uid)
    assert hint.startswith(looked_in + "; ") and elsewhere in hint
    assert hint.endswith("give ipservectl the same --runtime-dir (and -n)")


def test_no_master_in_a_given_runtime_dir_names_both():
    assert (ctl.where_we_looked("/srv/run", "web", given=True, uid=1000)
            == "is a master running with -n web --runtime-dir /srv/run?")


@pytest.mark.parametrize("command", ["status", "top", "leaks", "reload"])
def test_ipservectl_with_no_master_prints_one_line_with_the_directory(
        command, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(ctl.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(ctl.config.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as exit_:
        ctl.main(["-n", "web", command])
    out, err = capsys.readouterr()
    assert (exit_.value.code, out) == (1, "")
    runtime_dir = tmp_path / "ipserve"
    assert err.splitlines() == [
        (f"ipservectl: error: web: no master is listening on {runtime_dir}/web.sock (No such file "
        f"or directory); {runtime_dir} is uid 1000's default runtime directory; a master started "
        f"by root listens in /run/ipserve, by another user in its $XDG_RUNTIME_DIR/ipserve or "
        f"/tmp/ipserve-<uid>, with --runtime-dir DIR in DIR: give ipservectl the same "
        f"--runtime-dir (and -n)")]
