"""End-to-end test of `ipservectl top` (issue 10): the live view, in a real
terminal (tmux), of the real `ipserve` command in the testbed's server
namespace. It shows every active worker in slot order, follows a reload
without being restarted, and quits on `q` with exit status 0.

tmux runs on a server of its own, on a socket in the test's own directory
(`tmux -S`), so no session of anyone else's is ever touched and nothing is
left in /tmp/tmux-<uid>; the session is killed at teardown whatever happened.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import netns
import pytest
from backends import routed_workers

WORKERS = 4
PORT = 8000
IPSERVECTL = os.path.join(os.path.dirname(sys.executable), "ipservectl")


class Tmux:
    """One detached tmux session of 160x50 on a private tmux server."""

    def __init__(self, command: str, workdir: str, width: int = 160, height: int = 50):
        self.socket = os.path.join(workdir, "tmux.sock")
        self.session = "top"
        self.exit_file = os.path.join(workdir, "top.exit")
        # The shell records the command's exit status once it ends; the pane
        # stays (remain-on-exit) so a traceback could still be captured.
        wrapped = f"{command}; echo $? > {shlex.quote(self.exit_file)}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IPSERVE_", "TMUX"))}
        self.tmux("new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height), wrapped,
                  ";", "set-option", "-t", self.session, "remain-on-exit", "on", env=env)

    def tmux(self, *args: str, env: dict | None = None) -> str:
        proc = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True,
                              timeout=30, env=env, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def capture(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", self.session)

    def resize(self, width: int, height: int) -> None:
        self.tmux("resize-window", "-t", self.session, "-x", str(width), "-y", str(height))
        size = f"{width}x{height}"
        wait_until(lambda: self.tmux("display-message", "-p", "-t", self.session,
                                     "#{window_width}x#{window_height}").strip() == size,
                   60, f"a {size} window", self.capture)

    def wait_screen(self, predicate, what: str) -> None:
        """Poll the screen until predicate(screen); fails at once if top exited."""
        def check():
            screen = self.capture()
            if self.exit_status() is not None:
                raise AssertionError(f"top exited ({self.exit_status()}) while waiting for "
                                     f"{what}:\n{screen}")
            return predicate(screen)
        wait_until(check, 60, what, self.capture)

    def send_keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.session, *keys)

    def exit_status(self) -> int | None:
        try:
            with open(self.exit_file) as fh:
                return int(fh.read().strip())
        except (FileNotFoundError, ValueError):
            return None

    def close(self) -> None:
        # Only our session, on our own server (which then has nothing left and exits).
        for args in (["kill-session", "-t", self.session], ["kill-server"]):
            subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, timeout=30,
                           check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


def wait_until(predicate, timeout: float, what: str, last=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{last()}")
        time.sleep(0.2)


def rows_in_slot_order(screen: str, table: dict[int, dict]) -> bool:
    """Each worker of `table` (slot -> worker) has its own "active" row on the
    screen, with its slot and generation, and the rows go slot by slot."""
    lines = screen.splitlines()
    where = []
    for slot, worker in sorted(table.items()):
        pattern = re.compile(rf"^\s*{slot}\s+{worker['pid']}\s+{worker['generation']}\s+active\b")
        found = [i for i, line in enumerate(lines) if pattern.search(line)]
        if not found:
            return False
        where.append(found[0])
    return where == sorted(where)


def top_command(testbed, srv) -> str:
    # A short --timeout: a stopped master is reported after 1 s, not 10.
    return shlex.join(netns.netns_argv(testbed.server_ns, [
        IPSERVECTL, "-n", srv.name, "--runtime-dir", srv.runtime_dir, "--timeout", "1", "top"]))


@pytest.fixture
def tmux_session():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    if not os.access(IPSERVECTL, os.X_OK):
        pytest.skip(f"no {IPSERVECTL} (run ./run tests to install ipserve into its venv)")
    made: list[Tmux] = []

    def start(command: str, workdir: str, **size) -> Tmux:
        session = Tmux(command, workdir, **size)
        made.append(session)
        return session

    yield start
    for session in made:
        session.close()


def test_top_follows_every_slot_through_a_reload_and_quits_on_q(testbed, ipserve, tmux_session):
    """top shows the 4 active workers slot by slot, then the next generation's after a HUP
    (same top process), and `q` ends it with exit status 0 and no traceback."""
    srv = ipserve([netns.PROBE_APP, "-w", str(WORKERS), "-b", f"0.0.0.0:{PORT}"])
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS) is not None, timeout=60,
                      what=f"{WORKERS} slots routed to their own active workers")
    first = routed_workers(st, WORKERS)
    generation = st["master"]["generation"]

    session = tmux_session(top_command(testbed, srv), srv.workdir)
    session.wait_screen(lambda screen: rows_in_slot_order(screen, first),
                        "top to show every active worker in slot order")
    assert re.search(rf"\b{srv.name}\s+master {srv.pid}\s+generation {generation}\b",
                     session.capture()), session.capture()

    srv.send_signal(signal.SIGHUP)
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS, generation + 1) is not None,
                      timeout=60, what="the next generation routed to every slot")
    second = routed_workers(st, WORKERS, generation + 1)
    assert not {w["pid"] for w in second.values()} & {w["pid"] for w in first.values()}
    session.wait_screen(lambda screen: rows_in_slot_order(screen, second),
                        "top to show the next generation in slot order")

    # A master that stops answering: top says so, keeps running, and recovers.
    srv.send_signal(signal.SIGSTOP)
    try:
        session.wait_screen(lambda screen: "master not answering:" in screen,
                            "top to notice the stopped master")
    finally:
        srv.send_signal(signal.SIGCONT)
    session.wait_screen(lambda screen: "master not answering" not in screen,
                        "top to show the master's answers again")
    screen = session.capture()
    print(screen)       # in the report if anything below fails
    assert f"generation {generation + 1}" in screen, screen
    assert re.search(rf"reload: generation {generation + 1} done in", screen), screen

    session.send_keys("q")
    wait_until(lambda: session.exit_status() is not None, 60, "top to exit after q",
               session.capture)
    after = session.capture()
    assert session.exit_status() == 0, after
    assert "Traceback" not in screen + after, after


def test_top_survives_a_tiny_terminal_and_quits_on_ctrl_c(testbed, ipserve, tmux_session):
    """A 12x2 terminal, grown and shrunk again: top draws what fits, never raises; Ctrl-C ends
    it with exit status 0."""
    srv = ipserve([netns.PROBE_APP, "-w", "2", "-b", f"0.0.0.0:{PORT}"])
    srv.wait_for(lambda st: routed_workers(st, 2) is not None, timeout=60,
                 what="2 slots routed to their own active workers")
    session = tmux_session(top_command(testbed, srv), srv.workdir, width=12, height=2)
    session.wait_screen(lambda screen: screen.startswith(srv.name[:12]), "top to draw in 12x2")
    for width, height in ((160, 50), (1, 1), (12, 2)):
        session.resize(width, height)
    session.wait_screen(lambda screen: screen.startswith(srv.name[:12]),
                        "top to draw in 12x2 again")
    session.send_keys("C-c")
    wait_until(lambda: session.exit_status() is not None, 60, "top to exit after Ctrl-C",
               session.capture)
    after = session.capture()
    assert session.exit_status() == 0, after
    assert "Traceback" not in after, after
