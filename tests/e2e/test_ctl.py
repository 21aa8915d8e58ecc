"""End-to-end tests of ipservectl (issue 8, items 1, 3 and 5): bad names,
a hung master, a caller without permission, and cleaning up after a master
that is gone (orphaned workers, rules, files).

ipservectl always runs in the testbed's server namespace (the rules it may
remove are that namespace's), against the real `ipserve` command started
there. Every failure must be one line on stderr, never a traceback, with
exit status 2 for usage errors and 1 when the master refuses or cannot be
reached.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import netns
from backends import backend_unavailable, routed_workers, slot_of, which
from netns import HttpClient, call_in, http_json, tcp_connect

PORT = 8000
WORKERS = 2
NOBODY = 65534
HOLD_APP = os.path.join(netns.REPO_ROOT, "tests", "apps", "bind_hold.py") + ":application"


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #

@pytest.fixture(autouse=True)
def _nft():
    why = backend_unavailable("nft")
    if why:
        pytest.skip(why)


def ctl_argv(runtime_dir: str, name: str, *cmd: str, uid: int | None = None) -> list[str]:
    # `--name=-x`: argparse would read `-n -x` as a missing argument.
    named = [f"--name={name}"] if name.startswith("-") else ["-n", name]
    return [*netns.setpriv_argv(uid), sys.executable, "-m", "ipserve.ctl", *named,
            "--runtime-dir", runtime_dir, *cmd]


def ctl_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPSERVE_")}
    env["PYTHONPATH"] = netns.REPO_ROOT
    return env


def ctl(ns: str, runtime_dir: str, name: str, *cmd: str, uid: int | None = None,
        timeout: float = 90) -> subprocess.CompletedProcess:
    """``ipservectl -n NAME --runtime-dir DIR <cmd>`` in `ns` (as `uid`, if given)."""
    return subprocess.run(netns.netns_argv(ns, ctl_argv(runtime_dir, name, *cmd, uid=uid)),
                          capture_output=True, text=True, timeout=timeout, cwd=netns.REPO_ROOT,
                          env=ctl_env())


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit status `code`, nothing on stdout, exactly one line on stderr holding `words`."""
    what = f"exit {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}"
    assert proc.returncode == code, what
    assert "Traceback" not in proc.stderr + proc.stdout, what
    err = lines(proc.stderr)
    assert len(err) == 1 and err[0].startswith("ipservectl: error:"), what
    assert proc.stdout.strip() == "", what
    for word in words:
        assert word in err[0], what
    return err[0]


def nft_objects(ns: str) -> list[dict]:
    out = call_in(ns, [which("nft"), "-j", "list", "ruleset"]).stdout
    return [obj for obj in json.loads(out)["nftables"] if "metainfo" not in obj]


def nft_tables(ns: str) -> set[tuple[str, str]]:
    return {(o["table"]["family"], o["table"]["name"]) for o in nft_objects(ns) if "table" in o}


def iptables_nat(ns: str) -> str:
    out = ""
    for tool in ("iptables", "ip6tables"):
        if which(tool):
            proc = call_in(ns, [which(tool), "-w", "-t", "nat", "-S"], check=False)
            out += proc.stdout + proc.stderr
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def files_of(runtime_dir: str, name: str) -> set[str]:
    """Which of the instance's .sock/.pid/.state files exist."""
    return {kind for kind in ("sock", "pid", "state")
            if os.path.lexists(os.path.join(runtime_dir, f"{name}.{kind}"))}


def serve(ipserve, *, app: str = netns.PROBE_APP, workers: int = WORKERS, extra=(), **kwargs):
    """ipserve (nft) on 0.0.0.0:PORT, waited for until every slot is routed to
    its own worker. Returns (process, {slot: worker status})."""
    srv = ipserve([app, "-w", str(workers), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
                   "--graceful-timeout", "20", *extra], **kwargs)
    st = srv.wait_for(lambda st: routed_workers(st, workers) is not None, timeout=60,
                      what=f"{workers} slots routed to their own active workers")
    return srv, routed_workers(st, workers)


def pids_of(table: dict[int, dict]) -> dict[int, int]:
    return {slot: w["pid"] for slot, w in table.items()}


def assert_serving(tb, srv, table: dict[int, dict]) -> None:
    """The same master and workers hold every slot, and answer their clients."""
    st = srv.status()
    now = routed_workers(st, WORKERS)
    assert now is not None and pids_of(now) == pids_of(table), st
    assert ("ip", f"ipserve_{srv.name}") in nft_tables(tb.server_ns)
    for src in tb.client_ips[:WORKERS]:
        data = http_json(tb.client_ns, src, tb.server_ip, PORT, timeout=10)
        assert data["pid"] == table[slot_of(src, WORKERS)]["pid"], (src, data)


def secure_tmpdir(tb, prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    tb.add_path(path)
    return path


# --------------------------------------------------------------------------- #
# Names
# --------------------------------------------------------------------------- #

INJECTION = "x;table inet mine;delete table inet mine"
TRAVERSAL = "../../tmp/victim"
BAD_NAMES = {
    "nft-injection": INJECTION,
    "path-traversal": TRAVERSAL,
    "200-chars": "a" * 200,
    "25-chars": "a" * 25,
    "empty": "",
    "leading-dot": ".web",
    "leading-dash": "-web",
    "slash": "web/1",
    "space": "web 1",
    "newline": "web\n1",
}


@pytest.mark.parametrize("case", list(BAD_NAMES))
def test_bad_name_refused_before_anything(testbed, case):
    """A bad -n: ipservectl and ipserve exit 2 with one line, and nothing it could name is touched."""
    tb = testbed
    name = BAD_NAMES[case]
    # Bait: an unrelated nft table, and files the traversal would reach.
    call_in(tb.server_ns, [which("nft"), "add", "table", "inet", "mine"])
    call_in(tb.server_ns, [which("nft"), "add", "chain", "inet", "mine", "keep"])
    top = secure_tmpdir(tb, "ips-names-")
    runtime_dir = os.path.join(top, "r1", "r2")
    os.makedirs(runtime_dir, mode=0o700)
    victim_dir = os.path.join(top, "tmp")
    os.makedirs(victim_dir, mode=0o700)
    victims = {}
    for kind in ("sock", "pid", "state", "lock"):
        path = os.path.join(victim_dir, f"victim.{kind}")
        with open(path, "w") as fh:
            fh.write(f"not ipserve's {kind}\n")
        victims[path] = f"not ipserve's {kind}\n"
    before = nft_objects(tb.server_ns)

    for cmd in (["cleanup"], ["stop"], ["status"], ["reload"]):
        assert_one_error_line(ctl(tb.server_ns, runtime_dir, name, *cmd), 2)
    # ipserve itself refuses the same name the same way, before importing anything.
    proc = subprocess.run(netns.netns_argv(tb.server_ns, [
        sys.executable, "-m", "ipserve.cli", netns.PROBE_APP, "-w", "2", "--router", "nft",
        f"--name={name}", "--runtime-dir", runtime_dir]), capture_output=True, text=True, timeout=60,
        cwd=netns.REPO_ROOT)
    assert proc.returncode == 2 and len(lines(proc.stderr)) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""

    assert nft_objects(tb.server_ns) == before
    assert ("inet", "mine") in nft_tables(tb.server_ns)
    for path, content in victims.items():
        with open(path) as fh:
            assert fh.read() == content, path
    assert os.listdir(runtime_dir) == []
    assert netns.ns_pids(tb.server_ns) == []


# --------------------------------------------------------------------------- #
# A master that does not answer, a caller that may not ask
# --------------------------------------------------------------------------- #

def test_hung_master_status_times_out_with_one_line(testbed, ipserve):
    """Master SIGSTOPped: `--timeout 2 status` exits 1 with one line; `cleanup` exits 2, touching nothing."""
    tb = testbed
    srv, table = serve(ipserve)
    before = nft_objects(tb.server_ns)
    srv.send_signal(signal.SIGSTOP)
    try:
        proc = srv.ctl("--timeout", "2", "status", check=False, timeout=60)
        # cleanup must not take a silent master for a dead one: it holds the lock.
        cleanup = srv.ctl("cleanup", check=False, timeout=60)
        assert nft_objects(tb.server_ns) == before
        assert files_of(srv.runtime_dir, srv.name) == {"sock", "pid", "state"}
    finally:
        srv.send_signal(signal.SIGCONT)
    assert_one_error_line(proc, 1, srv.name, "did not answer")
    assert_one_error_line(cleanup, 2, srv.name)
    assert_serving(tb, srv, table)          # it recovers; nothing was done to it meanwhile


@pytest.fixture
def nobody_can_run_python():
    probe = subprocess.run([*netns.setpriv_argv(NOBODY), sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {netns.REPO_ROOT!r}); "
                            f"import ipserve.ctl; open({netns.PROBE_APP_PATH!r}).read()"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"uid {NOBODY} cannot run ipserve from {netns.REPO_ROOT}: "
                    f"{lines(probe.stderr)[-1:]}")


def serve_for_nobody(tb, ipserve, reach: str):
    """A root master whose control socket uid 65534 cannot reach (private 0700
    runtime directory), or can (workers run as nobody: the runtime directory
    is searchable and the socket theirs), so that only the master's
    SO_PEERCRED check stands in the way."""
    if reach == "socket-reachable":
        shared = secure_tmpdir(tb, "ips-nobody-")
        os.chmod(shared, 0o755)
        return serve(ipserve, extra=["--user", "nobody"], runtime_dir=os.path.join(shared, "run"))
    return serve(ipserve)


def assert_unchanged(tb, srv, table, generation: int) -> None:
    st = srv.status()
    assert st["master"]["generation"] == generation and st["reload"] is None, st
    assert_serving(tb, srv, table)
    assert files_of(srv.runtime_dir, srv.name) == {"sock", "pid", "state"}


@pytest.mark.parametrize("reach", ["socket-unreachable", "socket-reachable"])
def test_unprivileged_caller_gets_one_line_and_changes_nothing(testbed, ipserve,
                                                               nobody_can_run_python, reach):
    """ipservectl as uid 65534 against a root master: exit 1, one "permission denied" line, no change."""
    tb = testbed
    srv, table = serve_for_nobody(tb, ipserve, reach)
    generation = srv.status()["master"]["generation"]
    commands = ["status", "reload", "kill-retired", "stop"]
    for cmd in commands:
        line = assert_one_error_line(ctl(tb.server_ns, srv.runtime_dir, srv.name, cmd, uid=NOBODY), 1)
        assert "permission denied" in line.lower(), (cmd, line)
    assert_unchanged(tb, srv, table, generation)
    assert srv.stop(timeout=60) == 0


def test_unprivileged_stop_of_unreachable_master_is_permission_denied(testbed, ipserve,
                                                                       nobody_can_run_python):
    """`ipservectl stop` as uid 65534, socket unreachable: exit 1, one "permission denied" line."""
    tb = testbed
    srv, table = serve_for_nobody(tb, ipserve, "socket-unreachable")
    generation = srv.status()["master"]["generation"]
    proc = ctl(tb.server_ns, srv.runtime_dir, srv.name, "stop", uid=NOBODY)
    assert_unchanged(tb, srv, table, generation)
    line = assert_one_error_line(proc, 1)
    assert "permission denied" in line.lower(), line


# --------------------------------------------------------------------------- #
# Orphans: the master is gone, its workers and rules are not
# --------------------------------------------------------------------------- #

def keepalive_client(tb, worker: dict) -> HttpClient:
    """A keep-alive connection from an address of the worker's slot, used once."""
    src = next(ip for ip in tb.client_ips if slot_of(ip, WORKERS) == worker["slot"])
    client = HttpClient(tb.client_ns, src, tb.server_ip, PORT, timeout=30)
    try:
        assert client.json("/")["pid"] == worker["pid"]
    except BaseException:
        client.close()
        raise
    return client


def nft_table_text(ns: str, table: str) -> str | None:
    """JSON text of everything in nft table `table` (family ip), None if there is none."""
    def owner(obj: dict) -> str | None:
        (kind, body), = obj.items()
        return body.get("name") if kind == "table" else body.get("table")
    objs = [o for o in nft_objects(ns) if owner(o) == table]
    return json.dumps(objs) if objs else None


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("cmd", ["stop", "cleanup"])
def test_orphans_finish_what_they_hold_then_rules_and_files_go(testbed, ipserve, cmd):
    """Master SIGKILLed: stop|cleanup lets the orphans finish what they hold, then removes rules and files."""
    tb = testbed
    srv, table = serve(ipserve, app=HOLD_APP, extra=["--graceful-timeout", "30"])
    pids = {slot: w["pid"] for slot, w in table.items()}
    fds = {slot: os.pidfd_open(pid) for slot, pid in pids.items()}
    flag = os.path.join(srv.workdir, "release")
    clients: list[HttpClient] = []
    result: dict = {}
    thread = None
    proc = None
    try:
        clients = [keepalive_client(tb, table[0]), keepalive_client(tb, table[1])]
        holding, idle = clients

        def held_request() -> None:
            try:
                result["answer"] = holding.request(f"/hold?f={flag}")
            except Exception as exc:        # noqa: BLE001 - reported below
                result["answer"] = exc

        thread = threading.Thread(target=held_request, daemon=True)
        thread.start()
        wait_until(lambda: os.path.exists(flag + ".started"), 30, "the held request in the app")
        srv.kill_master()
        assert not any(netns._pidfd_exited(fd) for fd in fds.values()), "a worker died with its master"
        # The socket file is still there; nobody listens on it.
        assert_one_error_line(ctl(tb.server_ns, srv.runtime_dir, srv.name, "status"), 1, srv.name)
        table_name = f"ipserve_{srv.name}"
        routed = nft_table_text(tb.server_ns, table_name)
        assert routed is not None and "redirect" in routed

        proc = subprocess.Popen(netns.netns_argv(tb.server_ns, ctl_argv(
            srv.runtime_dir, srv.name, cmd)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=netns.REPO_ROOT, env=ctl_env())
        # Drained: the table stays (established connections stay translated)
        # but redirects nothing new; a new connection is refused at once.
        wait_until(lambda: "redirect" not in (nft_table_text(tb.server_ns, table_name) or "redirect"),
                   30, "the drained table")
        with pytest.raises(ConnectionRefusedError):
            tcp_connect(tb.client_ns, tb.client_ips[2], tb.server_ip, PORT, timeout=15).close()
        # The idle keep-alive ends: its worker exits. The other still holds a request.
        idle.close()
        assert not netns._wait_pidfds([fds[1]], 60), "the orphan of slot 1 did not exit"
        assert proc.poll() is None and not netns._pidfd_exited(fds[0]) and "answer" not in result
        with open(flag, "w"):
            pass
        thread.join(30)
        assert isinstance(result.get("answer"), tuple), f"the held request failed: {result}"
        status, _, body = result["answer"]
        assert status == 200 and json.loads(body) == {"pid": pids[0], "released": True}, result
        holding.close()
        assert not netns._wait_pidfds([fds[0]], 60), "the orphan of slot 0 did not exit"
        out, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(OSError):
            open(flag, "w").close()
        for client in clients:
            client.close()
        if thread is not None:
            thread.join(30)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for fd in fds.values():
            os.close(fd)
    what = f"exit {proc.returncode}, stdout {out!r}, stderr {err!r}"
    assert proc.returncode == 0 and "Traceback" not in out + err, what
    assert len(lines(out)) == 1 and f"stopped {len(pids)} orphaned worker" in out, what
    assert not any("error" in line for line in lines(err)), what      # progress only
    assert ("ip", f"ipserve_{srv.name}") not in nft_tables(tb.server_ns)
    assert f"IPS-{srv.name}" not in iptables_nat(tb.server_ns)
    assert files_of(srv.runtime_dir, srv.name) == set()
    assert netns.ns_pids(tb.server_ns) == []


def test_cleanup_refused_while_master_runs(testbed, ipserve):
    """`ipservectl cleanup` with a master serving: exit 2, one line, nothing touched."""
    tb = testbed
    srv, table = serve(ipserve)
    before = nft_objects(tb.server_ns)
    assert_one_error_line(srv.ctl("cleanup", check=False), 2, srv.name, "running")
    assert nft_objects(tb.server_ns) == before
    assert files_of(srv.runtime_dir, srv.name) == {"sock", "pid", "state"}
    assert_serving(tb, srv, table)
    assert srv.stop(timeout=60) == 0


def test_no_master_no_state(testbed):
    """No master, no state file: status exits 1 (one line); stop and cleanup exit 0, others' rules kept."""
    tb = testbed
    runtime_dir = secure_tmpdir(tb, "ips-none-")
    name = netns.unique_name("gone")
    other = netns.unique_name("other")
    kept = {("ip", f"ipserve_{other}"), ("ip", f"ipserve_{name}x")}
    for family, table in kept:
        call_in(tb.server_ns, [which("nft"), "add", "table", family, table])
        call_in(tb.server_ns, [which("nft"), "add", "chain", family, table, "keep"])
    if which("iptables"):
        call_in(tb.server_ns, [which("iptables"), "-w", "-t", "nat", "-N", f"IPS-{other}"])

    assert_one_error_line(ctl(tb.server_ns, runtime_dir, name, "status"), 1, name)
    for cmd in ("cleanup", "stop"):
        proc = ctl(tb.server_ns, runtime_dir, name, cmd)
        what = f"{cmd}: exit {proc.returncode}, stdout {proc.stdout!r}, stderr {proc.stderr!r}"
        assert proc.returncode == 0 and len(lines(proc.stdout)) == 1, what
        assert "Traceback" not in proc.stderr + proc.stdout, what
    assert kept <= nft_tables(tb.server_ns)
    assert ("ip", f"ipserve_{name}") not in nft_tables(tb.server_ns)
    for family, table in kept:
        assert nft_table_text(tb.server_ns, table) is not None and '"keep"' in nft_table_text(
            tb.server_ns, table)
    if which("iptables"):
        listing = iptables_nat(tb.server_ns).splitlines()
        assert f"-N IPS-{other}" in listing and not any(f"IPS-{name}" in ln for ln in listing)
    assert files_of(runtime_dir, name) == set()


def test_cleanup_of_nothing_leaves_the_firewall_as_it_was(testbed):
    """`ipservectl cleanup` of a name that left nothing changes nothing in the nft ruleset."""
    before = nft_objects(testbed.server_ns)
    proc = ctl(testbed.server_ns, secure_tmpdir(testbed, "ips-none-"), netns.unique_name("gone"),
               "cleanup")
    assert proc.returncode == 0, proc
    assert nft_objects(testbed.server_ns) == before


def test_no_state_cleanup_prints_nothing_on_stderr(testbed):
    """With no master and no state file, `stop` and `cleanup` print their one line and no error."""
    runtime_dir = secure_tmpdir(testbed, "ips-none-")
    for cmd in ("cleanup", "stop"):
        proc = ctl(testbed.server_ns, runtime_dir, netns.unique_name("gone"), cmd)
        assert proc.returncode == 0 and len(lines(proc.stdout)) == 1, proc
        assert proc.stderr == "", (cmd, proc.stderr)


@pytest.mark.parametrize("argv", [["bogus"], [], ["--timeout", "abc", "status"]],
                         ids=["unknown-command", "no-command", "bad-timeout"])
def test_usage_error_is_one_line(testbed, argv):
    """An ipservectl usage error that argparse catches is still exit 2 and one line."""
    runtime_dir = secure_tmpdir(testbed, "ips-usage-")
    assert_one_error_line(ctl(testbed.server_ns, runtime_dir, "web", *argv), 2)
