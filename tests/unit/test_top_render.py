"""`ipservectl top`: the pure rendering, the drawing on a small window, the poller."""

import curses
import io

import pytest

from ipserve import top
from ipserve.errors import UsageError
from ipserve.top import Line, Poller, Style, draw, render_lines

NOW = 1_000_000.0


def worker(pid, slot, generation, state, **extra):
    return {"pid": pid, "slot": slot, "generation": generation, "state": state, "rss": 40 << 20,
            "connections": 2, "websockets": 1, "requests_per_s": 3.5, "lag_ms": 0.4,
            "age_s": 65, "nice": 0, **extra}


def full_status(**overrides):
    status = {
        "name": "web", "router": "nft", "bind": ["0.0.0.0:8000", "[::]:8000"], "time": NOW,
        "master": {"pid": 10, "generation": 3, "uptime_s": 3725.0},
        "slots": 2,
        "reload": {"generation": 3, "reason": "reload", "state": "done", "seconds": 0.5,
                   "booted": 2, "targets": 2},
        "memory": {"cluster_rss": 256 << 20, "cluster_limit": 1 << 30, "retire_at": 800 << 20,
                   "kill_at": 950 << 20, "worker_limit": None},
        "workers": [
            # Deliberately out of order: the view sorts by slot, then by role.
            worker(31, 1, 3, "active"),
            worker(20, 0, 2, "retiring", nice=10, connections=3, connections_at_retire=12),
            worker(30, 0, 3, "active"),
            worker(40, 1, 4, "booting"),
        ],
    }
    return status | overrides


def texts(lines):
    return [line.text for line in lines]


def row_of(lines, pid):
    (found,) = [line for line in lines if f" {pid} " in f" {line.text} "]
    return found


def test_header_names_the_instance_reload_and_memory():
    lines = render_lines(full_status(), 160, NOW)
    assert lines[0].style is Style.TITLE
    for part in ("web", "master 10", "generation 3", "up 1h02m", "router nft",
                 "bind 0.0.0.0:8000, [::]:8000"):
        assert part in lines[0].text
    assert "reload: generation 3 done in 0.5s" in texts(lines)
    assert "memory: cluster 256.0MiB of 1.0GiB limit (25%)" in texts(lines)


def test_slots_in_order_active_first_successor_and_retiring_indented_under_it():
    lines = render_lines(full_status(), 160, NOW)
    header = next(i for i, line in enumerate(lines) if line.style is Style.COLUMNS)
    for title in ("SLOT", "PID", "GEN", "STATE", "RSS", "CONNS", "WS", "REQ/S", "LAG ms", "AGE",
                  "NICE", "DRAIN"):
        assert title in lines[header].text
    rows = [line.text.split() for line in lines[header + 1:]]
    assert [row[:4] for row in rows] == [
        ["0", "30", "3", "active"],
        ["\\_", "20", "2", "retiring"],
        ["1", "31", "3", "active"],
        ["\\_", "40", "4", "booting"],
    ]
    assert rows[0] == ["0", "30", "3", "active", "40.0MiB", "2", "1", "3.5", "0.4", "1m05s", "0"]
    # Retiring: its nice and how much of what it held has gone (1 - 3/12).
    assert rows[1][-2:] == ["10", "75%"]
    assert row_of(lines, 20).style is Style.RETIRING
    assert row_of(lines, 30).style is Style.PLAIN


def test_drain_progress_without_a_count_at_retire():
    status = full_status(workers=[worker(20, 0, 2, "retiring", connections_at_retire=None),
                                  worker(21, 1, 2, "retiring", connections=0,
                                         connections_at_retire=0)])
    lines = render_lines(status, 160, NOW)
    assert row_of(lines, 20).text.split()[-1] == "-"
    assert row_of(lines, 21).text.split()[-1] == "100%"


def test_a_slot_without_workers_and_workers_in_trouble_stand_out():
    status = full_status(slots=3, workers=[worker(30, 0, 3, "active", too_busy=True),
                                           worker(31, 1, 3, "hung")],
                         slot_table=[{"slot": 2, "waiting_s": 4.0, "refusing": True}])
    lines = render_lines(status, 160, NOW)
    assert row_of(lines, 30).style is Style.WARNING
    assert row_of(lines, 31).style is Style.WARNING
    assert lines[-1].text.split()[:3] == ["2", "-", "(none)"]
    assert Line("slot 2: no active worker for 4s (resetting its connections)",
                Style.WARNING) in lines


@pytest.mark.parametrize("reload, text, style", [
    ({"generation": 4, "state": "in progress", "booted": 1, "targets": 4, "reason": "TTIN"},
     "TTIN: generation 4 in progress, 1/4 booted for 7s", Style.PLAIN),
    ({"generation": 4, "state": "failed", "error": "SyntaxError in app.py"},
     "reload: generation 4 failed: SyntaxError in app.py", Style.WARNING),
    (None, "reload: none yet", Style.PLAIN),
])
def test_reload_states(reload, text, style):
    status = full_status(reload=reload,
                         reloads=[{"generation": 4, "started": NOW - 7, "state": "in progress"}]
                         if reload else [])
    assert Line(text, style) in render_lines(status, 160, NOW)


def test_reload_from_the_history_when_the_current_one_is_missing():
    status = full_status(reload=None, reloads=[
        {"generation": 2, "state": "done", "seconds": 1.25, "reason": "reload"}],
        counters={"reloads": {"ok": 1, "failed": 0}})
    assert ("reload: generation 2 done in 1.2s   (reloads: 1 ok, 0 failed)"
            in texts(render_lines(status, 160, NOW)))


def test_memory_without_limit_and_over_the_retire_mark():
    no_limit = full_status(memory={"cluster_rss": 1 << 20, "cluster_limit": None})
    assert "memory: cluster 1.0MiB, no limit" in texts(render_lines(no_limit, 160, NOW))
    over = full_status(memory={"cluster_rss": 900 << 20, "cluster_limit": 1 << 30,
                               "retire_at": 800 << 20, "worker_limit": 256 << 20})
    line = next(line for line in render_lines(over, 160, NOW) if line.text.startswith("memory"))
    assert line == Line("memory: cluster 900.0MiB of 1.0GiB limit (88%); 256.0MiB per worker",
                        Style.WARNING)


def test_cluster_counters_when_present():
    status = full_status(counters={"requests": 1234, "shed": 2,
                                   "responses": {"2xx": 1200, "3xx": 0, "4xx": 30, "5xx": 4}})
    assert ("requests: 1234  now 14.0/s  2xx 1200  3xx 0  4xx 30  5xx 4  shed 2"
            in texts(render_lines(status, 160, NOW)))


def test_an_older_master_missing_keys_shows_dashes():
    status = {"name": "old", "master": {"pid": 5},
              "workers": [{"pid": 7, "slot": 0, "state": "active"}, {"pid": 8}]}
    lines = render_lines(status, 160, NOW)
    assert "generation -" in lines[0].text and "up -" in lines[0].text
    assert "memory: -" in texts(lines)
    assert row_of(lines, 7).text.split() == ["0", "7", "-", "active", "-", "-", "-", "-", "-",
                                             "-", "-"]
    render_lines({}, 160, NOW)        # nothing at all: still a screen
    render_lines({"workers": None, "master": None, "reloads": None, "memory": 3}, 160, NOW)


def test_master_not_answering_keeps_the_last_answer_on_screen():
    lines = render_lines(full_status(), 160, NOW + 65,
                         problem="no master is listening on /run/web.sock (Connection refused)")
    assert lines[1] == Line("master not answering: no master is listening on /run/web.sock "
                            "(Connection refused)   (showing its answer of 1m05s ago)",
                            Style.WARNING)
    assert row_of(lines, 30)
    first = render_lines(None, 160, NOW, problem="timed out")
    assert [line.style for line in first] == [Style.TITLE, Style.WARNING]
    assert first[1].text == "master not answering: timed out"


@pytest.mark.parametrize("width", [0, 1, 7, 40, 80])
def test_lines_never_exceed_the_width(width):
    status = full_status(route_error="nft: " + "x" * 300)
    lines = render_lines(status, width, NOW, problem="y" * 300)
    assert lines and all(len(line.text) <= width for line in lines)


class FakeWindow:
    """What curses does on a window of height x width: writing the bottom-right
    cell raises (after writing), writing outside the window raises."""

    def __init__(self, height, width):
        self.height, self.width = height, width
        self.cells = [[" "] * width for _ in range(height)]

    def getmaxyx(self):
        return self.height, self.width

    def erase(self):
        self.cells = [[" "] * self.width for _ in range(self.height)]

    def refresh(self):
        pass

    def addnstr(self, y, x, text, n, attr=0):
        if not (0 <= y < self.height and 0 <= x < self.width):
            raise curses.error("addnstr() returned ERR")
        text = text[:n]
        for i, char in enumerate(text[:self.width - x]):
            self.cells[y][x + i] = char
        if y == self.height - 1 and x + len(text) >= self.width:
            raise curses.error("addnstr() returned ERR")

    def screen(self):
        return ["".join(row) for row in self.cells]


@pytest.mark.parametrize("height, width", [(1, 1), (3, 10), (5, 40), (50, 160)])
def test_draw_fits_any_window_and_leaves_the_last_cell_alone(height, width):
    window = FakeWindow(height, width)
    attrs = dict.fromkeys(Style, 0)
    lines = render_lines(full_status(), width, NOW)
    draw(window, lines, attrs)          # never raises
    screen = window.screen()
    assert screen[-1][-1] == " "
    for y, line in enumerate(lines[:height]):
        room = width - 1 if y == height - 1 else width
        assert screen[y].rstrip() == line.text[:room].rstrip()


def test_poller_keeps_the_last_status_when_the_master_stops_answering():
    answers = [{"name": "one"}, TimeoutError("the master did not answer within 10s"),
               {"name": "two"}]

    def fetch():
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    poller = Poller(fetch, first=None, interval=1.0)
    poller.poll()
    assert poller.snapshot() == ({"name": "one"}, None)
    poller.poll()
    assert poller.snapshot() == ({"name": "one"}, "the master did not answer within 10s")
    poller.poll()
    assert poller.snapshot() == ({"name": "two"}, None)


def test_top_without_a_terminal_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(top.sys, "stdin", io.StringIO())
    with pytest.raises(UsageError, match="needs a terminal"):
        top.run(dict, first={})
