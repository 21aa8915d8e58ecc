from ipserve.status import render_table


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
