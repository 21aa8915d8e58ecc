"""ipserve.runtime against real files and real attacks (symlinks, hard links,
foreign owners, FIFOs, other processes holding the lock).

Tests that chown files to another uid need root and are skipped otherwise.
Everything lives under pytest's tmp_path; as root, chowned files stay removable.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ipserve.errors import UsageError
from ipserve.runtime import (InstanceLock, open_log, open_log_stream, read_pid_file,
                             read_private_json, remove_pid_file, remove_quietly, secure_dir,
                             write_pid_file, write_private_json)

NOBODY = 65534
OTHER = 12345          # a uid that is neither us nor the workers' user
EUID = os.geteuid()
REPO = Path(__file__).resolve().parents[2]

needs_root = pytest.mark.skipif(EUID != 0, reason="chowning a file to another uid needs root")


def snapshot(path: Path) -> tuple:
    """What an attack could change: content, mode, owner, link count."""
    st = os.lstat(path)
    return path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_nlink


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("root:secret-hash:19000::::::\n")
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def mkdir(path: Path, mode: int, uid: int | None = None) -> Path:
    path.mkdir()
    os.chmod(path, mode)                  # chmod, not mkdir(mode): the umask would strip bits
    if uid is not None:
        os.chown(path, uid, uid)
    return path


# -- secure_dir --------------------------------------------------------------

def test_secure_dir_creates_missing_components_with_mode_and_leaves_parent_alone(tmp_path, umask):
    parent = mkdir(tmp_path / "parent", 0o711)
    umask(0o077)                          # must not strip o+x the workers need
    got = secure_dir(str(parent / "a" / "b"), mode=0o755)
    assert got == str(parent / "a" / "b")
    for d in (parent / "a", parent / "a" / "b"):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == EUID
    assert stat.S_IMODE(os.stat(parent).st_mode) == 0o711

    private = secure_dir(str(tmp_path / "private"), mode=0o700)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700


def test_secure_dir_accepts_existing_good_dir_without_chmod(tmp_path):
    d = mkdir(tmp_path / "run", 0o750)
    assert secure_dir(str(d), mode=0o700) == str(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750


def test_secure_dir_missing_without_create_is_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        secure_dir(str(tmp_path / "nope"), create=False)
    assert not (tmp_path / "nope").exists()


def test_secure_dir_refuses_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a regular file, not a directory"):
        secure_dir(str(tmp_path / "file"))


@needs_root
def test_secure_dir_refuses_dir_owned_by_another_user(tmp_path):
    d = mkdir(tmp_path / "run", 0o755, uid=NOBODY)
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}, not by uid {EUID} \(this process\)"):
        secure_dir(str(d))
    st = os.stat(d)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o755)


def test_secure_dir_refuses_world_writable_dir_and_does_not_fix_it(tmp_path):
    d = mkdir(tmp_path / "run", 0o777)
    with pytest.raises(UsageError, match=r"writable by group or others \(mode 777\): chmod go-w"):
        secure_dir(str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o777
    sticky = mkdir(tmp_path / "sticky", 0o1777)   # sticky does not excuse the dir itself
    with pytest.raises(UsageError, match="writable by group or others"):
        secure_dir(str(sticky))


@needs_root
def test_secure_dir_refuses_parent_world_writable_not_sticky_owned_by_other(tmp_path):
    parent = mkdir(tmp_path / "shared", 0o777, uid=NOBODY)
    with pytest.raises(UsageError, match=r"directory .*shared on its path"):
        secure_dir(str(parent / "ipserve"))
    assert os.listdir(parent) == []
    # Even a good directory of ours in it is refused: nobody can rename it away.
    mkdir(parent / "ipserve", 0o755)
    with pytest.raises(UsageError, match=r"directory .*shared on its path"):
        secure_dir(str(parent / "ipserve"))


def test_secure_dir_refuses_parent_world_writable_not_sticky_even_if_ours(tmp_path):
    parent = mkdir(tmp_path / "shared", 0o777)
    with pytest.raises(UsageError, match=r"ipserve: directory .*shared on its path is writable by group "
                                         r"or others and not sticky \(mode 777\)"):
        secure_dir(str(parent / "ipserve"))
    assert os.listdir(parent) == []                  # refused before creating anything
    # Anyone could have made shared/sub a symlink: nothing is created where it points.
    target = mkdir(tmp_path / "etc", 0o755)
    (parent / "sub").symlink_to(target)
    with pytest.raises(UsageError, match=r"shared on its path is writable"):
        secure_dir(str(parent / "sub" / "ipserve"))
    assert os.listdir(target) == []


@needs_root
def test_secure_dir_refuses_parent_owned_by_another_user(tmp_path):
    parent = mkdir(tmp_path / "home-of-nobody", 0o755, uid=NOBODY)
    mkdir(parent / "ipserve", 0o755)
    with pytest.raises(UsageError, match=rf"home-of-nobody on its path is owned by uid {NOBODY}"):
        secure_dir(str(parent / "ipserve"))


def test_secure_dir_accepts_dir_inside_sticky_world_writable_parent(tmp_path):
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    got = secure_dir(str(fake_tmp / f"ipserve-{EUID}"), mode=0o700)
    assert got == str(fake_tmp / f"ipserve-{EUID}")
    st = os.lstat(got)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (EUID, 0o700)


def test_secure_dir_resolves_symlink_and_judges_the_real_dir(tmp_path):
    good = mkdir(tmp_path / "good", 0o755)
    (tmp_path / "link").symlink_to(good)
    assert secure_dir(str(tmp_path / "link")) == str(good)

    bad = mkdir(tmp_path / "bad", 0o777)
    (tmp_path / "badlink").symlink_to(bad)
    with pytest.raises(UsageError, match=r"badlink \(= .*bad\) is writable"):
        secure_dir(str(tmp_path / "badlink"))


def test_secure_dir_resolves_like_the_kernel(tmp_path, monkeypatch):
    a = mkdir(tmp_path / "a", 0o755)
    b = mkdir(a / "b", 0o755)
    c = mkdir(b / "c", 0o755)
    (tmp_path / "abs").symlink_to(c)                  # absolute target
    (a / "rel").symlink_to("b/c")                     # relative target
    (tmp_path / "chain").symlink_to("a/rel")          # link to a link
    (tmp_path / "loop").symlink_to("loop")
    monkeypatch.chdir(a)
    for p in ("../abs/..", "../chain/..", "../chain/../c/.", str(tmp_path / "a/./rel/../../b"),
              "b", "rel/..", "../abs", "rel/../../../abs"):
        assert secure_dir(p, create=False) == os.path.realpath(p), p
    with pytest.raises(UsageError, match="too many levels of symbolic links"):
        secure_dir(str(tmp_path / "loop"), create=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match=r"/file on its path is a regular file, not a directory"):
        secure_dir(str(tmp_path / "file" / "x"), create=False)


@needs_root
def test_secure_dir_refuses_symlink_to_dir_owned_by_another_user(tmp_path):
    theirs = mkdir(tmp_path / "theirs", 0o755, uid=NOBODY)
    (tmp_path / "link").symlink_to(theirs)
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}"):
        secure_dir(str(tmp_path / "link"))


@needs_root
def test_tmp_runtime_dir_precreated_by_another_user_is_not_adopted(tmp_path):
    """The /tmp/ipserve-<uid> default: anyone can create that name first."""
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    squatted = mkdir(fake_tmp / f"ipserve-{EUID}", 0o700, uid=NOBODY)
    with pytest.raises(UsageError, match=rf"ipserve-{EUID} is owned by uid {NOBODY}, not by uid {EUID}"
                                         rf" \(this process\): another user created it"):
        secure_dir(str(squatted), mode=0o700)
    st = os.lstat(squatted)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o700)
    assert os.listdir(squatted) == []


@needs_root
def test_tmp_runtime_dir_precreated_as_symlink_by_another_user_is_refused(tmp_path):
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    theirs = mkdir(fake_tmp / "attacker", 0o755, uid=NOBODY)
    link = fake_tmp / f"ipserve-{EUID}"
    link.symlink_to(theirs)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}"):
        secure_dir(str(link))


@needs_root
def test_tmp_runtime_dir_precreated_as_symlink_to_a_root_dir_is_refused(tmp_path):
    """The target passes every check (root's, 0755): the link does not, as its
    owner can repoint it at any time, e.g. at /etc."""
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    etc = mkdir(tmp_path / "etc", 0o755)
    link = fake_tmp / f"ipserve-{EUID}"
    link.symlink_to(etc)
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=rf"ipserve-{EUID} is owned by uid {NOBODY} in sticky directory"):
        secure_dir(str(link))
    with pytest.raises(UsageError, match=rf"ipserve-{EUID} is owned by uid {NOBODY} in sticky directory"):
        secure_dir(str(link / "web"))                # would be created inside etc
    assert os.listdir(etc) == []


def test_secure_dir_accepts_our_own_symlink_in_a_sticky_dir(tmp_path):
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    good = mkdir(tmp_path / "good", 0o700)
    (fake_tmp / "link").symlink_to(good)
    assert secure_dir(str(fake_tmp / "link")) == str(good)


def test_dangling_symlink_is_not_created_through(tmp_path):
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    target = tmp_path / "where-the-attacker-wants-a-root-dir"
    (fake_tmp / f"ipserve-{EUID}").symlink_to(target)
    with pytest.raises(UsageError, match="does not exist"):
        secure_dir(str(fake_tmp / f"ipserve-{EUID}"))
    assert not target.exists()


# -- log files ---------------------------------------------------------------

@pytest.mark.parametrize("owner", [None, pytest.param((NOBODY, NOBODY), marks=needs_root)])
def test_log_symlink_to_victim_is_refused_and_victim_untouched(tmp_path, victim, owner):
    before = snapshot(victim)
    log = tmp_path / "error.log"
    log.symlink_to(victim)
    with pytest.raises(UsageError, match=r"error\.log is a symbolic link; refusing to follow it"):
        open_log(str(log), owner)
    assert snapshot(victim) == before
    assert log.is_symlink()


@pytest.mark.parametrize("owner", [None, pytest.param((NOBODY, NOBODY), marks=needs_root)])
def test_log_hard_link_to_victim_is_refused_and_victim_untouched(tmp_path, victim, owner):
    log = tmp_path / "access.log"
    os.link(victim, log)
    before = snapshot(victim)
    with pytest.raises(UsageError, match=r"access\.log has 2 hard links"):
        open_log(str(log), owner)
    assert snapshot(victim) == before


@pytest.mark.parametrize("owner", [None, pytest.param((NOBODY, NOBODY), marks=needs_root)])
def test_log_path_through_a_directory_others_can_rewrite_is_refused(tmp_path, owner):
    """O_NOFOLLOW guards only the last component: `sub` swapped for a symlink
    would have root create (and chown) error.log in a directory of the attacker's
    choosing. Here `shared` is ours but world-writable and not sticky."""
    shared = mkdir(tmp_path / "shared", 0o777)
    target = mkdir(tmp_path / "etc", 0o755)
    (shared / "sub").symlink_to(target)
    with pytest.raises(UsageError, match=r"log file .*sub/error\.log: directory .*shared on its path is "
                                         r"writable by group or others and not sticky"):
        open_log(str(shared / "sub" / "error.log"), owner)
    assert os.listdir(target) == []


@needs_root
def test_log_path_below_a_directory_owned_by_the_workers_is_refused(tmp_path):
    theirs = mkdir(tmp_path / "theirs", 0o755, uid=NOBODY)
    target = mkdir(tmp_path / "etc", 0o755)
    (theirs / "logs").symlink_to(target)
    with pytest.raises(UsageError, match=rf"directory .*theirs on its path is owned by uid {NOBODY}"):
        open_log(str(theirs / "logs" / "error.log"), (NOBODY, NOBODY))
    assert os.listdir(target) == []


@needs_root
def test_log_in_a_directory_owned_by_the_workers_is_accepted(tmp_path):
    """Their own log directory is fine: whatever they plant there is refused."""
    logs = mkdir(tmp_path / "logs", 0o755, uid=NOBODY)
    os.close(open_log(str(logs / "error.log"), (NOBODY, NOBODY)))
    assert os.lstat(logs / "error.log").st_uid == NOBODY


@needs_root
def test_log_dir_owned_by_the_workers_in_a_sticky_dir_is_accepted(tmp_path):
    fake_tmp = mkdir(tmp_path / "tmp", 0o1777)
    logs = mkdir(fake_tmp / "logs", 0o755, uid=NOBODY)
    os.close(open_log(str(logs / "error.log"), (NOBODY, NOBODY)))
    assert os.lstat(logs / "error.log").st_uid == NOBODY


def test_log_path_naming_a_directory_is_refused(tmp_path):
    for p in (str(tmp_path) + "/", str(tmp_path / "..")):
        with pytest.raises(UsageError, match="names a directory"):
            open_log(p)


def test_relative_log_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.close(open_log("error.log"))
    assert (tmp_path / "error.log").is_file()


@needs_root
def test_log_in_a_search_only_directory():
    """Workers (not root) reopen their logs: execute permission on the directories
    must be enough, as it is for a plain open()."""
    base = Path(tempfile.mkdtemp(prefix="ipserve-test-"))   # tmp_path's parents are 0700
    try:
        os.chmod(base, 0o711)
        logs = mkdir(base / "logs", 0o311)
        log = logs / "error.log"
        log.write_text("")
        os.chown(log, NOBODY, NOBODY)
        code = (f"import os; from ipserve.runtime import open_log; "
                f"os.setgroups([]); os.setresgid({NOBODY}, {NOBODY}, {NOBODY}); "
                f"os.setresuid({NOBODY}, {NOBODY}, {NOBODY}); "
                f"os.write(open_log({str(log)!r}, ({NOBODY}, {NOBODY})), b'from a worker')")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)), cwd="/")
        assert result.returncode == 0, result.stderr
        assert log.read_text() == "from a worker"
    finally:
        shutil.rmtree(base)


@needs_root
def test_fresh_log_is_created_and_handed_to_owner(tmp_path, umask):
    log = tmp_path / "error.log"
    fd = open_log(str(log), (NOBODY, NOBODY))
    try:
        os.write(fd, b"one\n")
        os.write(fd, b"two\n")
    finally:
        os.close(fd)
    st = os.lstat(log)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o640)
    assert log.read_text() == "one\ntwo\n"


def test_fresh_log_without_owner_and_existing_log_is_appended_not_truncated(tmp_path):
    log = tmp_path / "error.log"
    fd = open_log(str(log))
    os.write(fd, b"old\n")
    os.close(fd)
    st = os.lstat(log)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (EUID, 0o640)
    fd = open_log(str(log))
    assert os.get_inheritable(fd) is False
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK   # only for the open
    os.lseek(fd, 0, os.SEEK_SET)          # O_APPEND writes at the end anyway
    os.write(fd, b"new\n")
    os.close(fd)
    assert log.read_text() == "old\nnew\n"


@pytest.mark.parametrize("owner", [None, pytest.param((NOBODY, NOBODY), marks=needs_root)])
@needs_root
def test_existing_log_owned_by_another_uid_is_refused(tmp_path, owner):
    log = tmp_path / "error.log"
    log.write_text("theirs\n")
    os.chown(log, OTHER, OTHER)
    with pytest.raises(UsageError, match=rf"owned by uid {OTHER}"):
        open_log(str(log), owner)
    st = os.lstat(log)
    assert (st.st_uid, st.st_gid) == (OTHER, OTHER)
    assert log.read_text() == "theirs\n"


@needs_root
def test_existing_log_owned_by_the_workers_user_is_accepted(tmp_path):
    log = tmp_path / "error.log"
    log.write_text("")
    os.chown(log, NOBODY, NOBODY)
    os.close(open_log(str(log), (NOBODY, NOBODY)))
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}"):
        open_log(str(log))                # without workers, only ours will do


def test_log_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "error.log"
    os.mkfifo(fifo)

    def unblock():                        # if open_log blocks on the FIFO, free it after 5 s
        time.sleep(5)
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    start = time.monotonic()
    with pytest.raises(UsageError, match="not a regular file"):
        open_log(str(fifo))
    assert time.monotonic() - start < 3


def test_log_directory_is_refused(tmp_path):
    with pytest.raises(UsageError, match="log file .* cannot be opened: Is a directory"):
        open_log(str(tmp_path))


def test_open_log_stream_writes_lines(tmp_path):
    log = tmp_path / "access.log"
    stream = open_log_stream(str(log))
    stream.write("GET / 200\n")
    assert log.read_text() == "GET / 200\n"   # line-buffered
    stream.write("bad \udcff byte\n")
    stream.close()
    assert log.read_text() == "GET / 200\nbad \\udcff byte\n"


def test_open_log_stream_refuses_symlink(tmp_path, victim):
    (tmp_path / "x.log").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        open_log_stream(str(tmp_path / "x.log"))


# -- pid file ----------------------------------------------------------------

def test_write_pid_file_over_symlink_replaces_the_link_not_the_victim(tmp_path, victim, umask):
    umask(0o077)                          # ipservectl (not root) must still read it: 0644
    before = snapshot(victim)
    pid_file = tmp_path / "web.pid"
    pid_file.symlink_to(victim)
    write_pid_file(str(pid_file), 4321)
    assert snapshot(victim) == before
    st = os.lstat(pid_file)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert pid_file.read_text() == "4321\n"
    assert sorted(os.listdir(tmp_path)) == ["victim", "web.pid"]      # no temp file left


def test_write_pid_file_failure_leaves_no_temp_file(tmp_path):
    (tmp_path / "web.pid").mkdir()        # rename cannot replace a directory
    with pytest.raises(UsageError, match=r"pid file .*web\.pid cannot be written"):
        write_pid_file(str(tmp_path / "web.pid"), 1)
    assert os.listdir(tmp_path) == ["web.pid"]
    with pytest.raises(UsageError, match="cannot be written"):
        write_pid_file(str(tmp_path / "missing" / "web.pid"), 1)


def test_read_pid_file(tmp_path):
    pid_file = tmp_path / "web.pid"
    assert read_pid_file(str(pid_file)) is None
    write_pid_file(str(pid_file), 77)
    assert read_pid_file(str(pid_file)) == 77
    (tmp_path / "link.pid").symlink_to(pid_file)
    assert read_pid_file(str(tmp_path / "link.pid")) is None
    for garbage in (b"", b"abc\n", b"-1\n", b"0\n", b"12 34\n", b"1_000\n", b"9" * 20 + b"\n",
                    b"\xd9\xa3\n", b"5\n" + b"x" * 100):
        pid_file.write_bytes(garbage)
        assert read_pid_file(str(pid_file)) is None, garbage
    os.mkfifo(tmp_path / "fifo.pid")
    assert read_pid_file(str(tmp_path / "fifo.pid")) is None


def test_remove_pid_file_only_removes_our_pid(tmp_path):
    pid_file = tmp_path / "web.pid"
    write_pid_file(str(pid_file), 100)
    remove_pid_file(str(pid_file), 101)
    assert pid_file.read_text() == "100\n"
    remove_pid_file(str(pid_file), 100)
    assert not pid_file.exists()
    remove_pid_file(str(pid_file), 100)   # already gone: fine


# -- private JSON ------------------------------------------------------------

def test_private_json_round_trip_mode_0600(tmp_path, umask):
    umask(0)
    state = tmp_path / "web.state"
    data = {"generation": 3, "workers": [{"pid": 11, "slot": 0}], "name": "wéb"}
    write_private_json(str(state), data)
    assert read_private_json(str(state)) == data
    st = os.lstat(state)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, EUID)
    write_private_json(str(state), {"generation": 4})
    assert read_private_json(str(state)) == {"generation": 4}
    assert os.listdir(tmp_path) == ["web.state"]
    assert read_private_json(str(tmp_path / "missing.state")) is None


def test_private_json_write_over_symlink_leaves_victim(tmp_path, victim):
    before = snapshot(victim)
    state = tmp_path / "web.state"
    state.symlink_to(victim)
    write_private_json(str(state), {"a": 1})
    assert snapshot(victim) == before
    assert not state.is_symlink() and read_private_json(str(state)) == {"a": 1}


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620])
def test_private_json_group_or_other_accessible_is_refused(tmp_path, mode):
    state = tmp_path / "web.state"
    write_private_json(str(state), {"a": 1})
    os.chmod(state, mode)
    with pytest.raises(UsageError, match=rf"web\.state is accessible by group or others \(mode {mode:o}\)"):
        read_private_json(str(state))


@needs_root
def test_private_json_foreign_owned_is_refused(tmp_path):
    state = tmp_path / "web.state"
    write_private_json(str(state), {"a": 1})
    os.chown(state, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}"):
        read_private_json(str(state))


def test_private_json_symlink_is_refused(tmp_path):
    real = tmp_path / "real.state"
    write_private_json(str(real), {"a": 1})         # a perfectly good file behind the link
    (tmp_path / "web.state").symlink_to(real)
    with pytest.raises(UsageError, match=r"web\.state is a symbolic link"):
        read_private_json(str(tmp_path / "web.state"))


@pytest.mark.parametrize("content, why", [
    (b"{not json", "is not valid JSON"),
    (b"\xff\xfe{}", "is not valid JSON"),
    (b"[1, 2]", "holds an array, not a JSON object"),
    (b"null", "holds null, not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "is not valid JSON"),
])
def test_private_json_bad_content_raises_usage_error(tmp_path, content, why):
    state = tmp_path / "web.state"
    state.write_bytes(content)
    os.chmod(state, 0o600)
    with pytest.raises(UsageError, match=rf"state file .*web\.state {why}") as info:
        read_private_json(str(state))
    assert "\n" not in str(info.value)


def test_private_json_too_big_is_refused(tmp_path):
    state = tmp_path / "web.state"
    write_private_json(str(state), {"pad": "x" * 200})
    with pytest.raises(UsageError, match="more than the 100 allowed"):
        read_private_json(str(state), max_bytes=100)


def test_private_json_fifo_is_refused(tmp_path):
    os.mkfifo(tmp_path / "web.state", 0o600)
    with pytest.raises(UsageError, match="a FIFO, not a regular file"):
        read_private_json(str(tmp_path / "web.state"))


# -- instance lock -----------------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, subprocess, sys, time
    from ipserve.runtime import InstanceLock
    path, child = sys.argv[1], sys.argv[2]
    lock = InstanceLock(path)
    ok = lock.try_acquire()
    child_pid = 0
    if child == "popen":                      # close_fds default (True)
        child_pid = subprocess.Popen(["sleep", "60"]).pid
    elif child == "popen-keep-fds":           # only O_CLOEXEC keeps the lock out of it
        child_pid = subprocess.Popen(["sleep", "60"], close_fds=False).pid
    elif child == "fork":                     # how the master starts workers
        child_pid = os.fork()
        if child_pid == 0:
            time.sleep(60)
            os._exit(0)
    print(ok, os.getpid(), child_pid, flush=True)
    sys.stdin.readline()
    os._exit(0)                               # die holding it: no release()
""")


class Holder:
    """Another process holding the lock until told to exit."""

    def __init__(self, path: Path, child: str = "none"):
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), child],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        ok, pid, child_pid = self.proc.stdout.readline().split()
        assert ok == "True", "the holder could not take the lock"
        self.pid, self.child_pid = int(pid), int(child_pid)

    def exit(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(10)

    def cleanup(self) -> None:
        for pid in (self.child_pid, self.pid):
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(10)
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def holders():
    started: list[Holder] = []
    yield lambda *args: started.append(Holder(*args)) or started[-1]
    for h in started:
        h.cleanup()


def test_lock_excludes_another_process_until_it_exits(tmp_path, holders):
    path = tmp_path / "web.lock"
    first = holders(path)
    lock = InstanceLock(str(path))
    assert lock.try_acquire() is False
    assert lock.holder() == first.pid
    assert path.read_text() == f"{first.pid}\n"     # the loser did not clobber it
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first.exit()
    assert lock.try_acquire() is True
    assert lock.holder() == os.getpid()
    lock.release()


@pytest.mark.parametrize("child", ["popen", "popen-keep-fds", "fork"])
def test_lock_is_not_kept_by_children_of_the_holder(tmp_path, holders, child):
    path = tmp_path / "web.lock"
    first = holders(path, child)
    lock = InstanceLock(str(path))
    assert lock.try_acquire() is False
    first.exit()
    os.kill(first.child_pid, 0)                      # the child outlives its parent...
    assert lock.try_acquire() is True                # ...without keeping the lock
    lock.release()


def test_lock_acquire_waits_and_times_out(tmp_path, holders):
    path = tmp_path / "web.lock"
    first = holders(path)
    lock = InstanceLock(str(path))
    start = time.monotonic()
    assert lock.acquire(0.3) is False
    assert 0.3 <= time.monotonic() - start < 2
    threading.Timer(0.3, first.exit).start()
    assert lock.acquire(10) is True
    assert lock.holder() == os.getpid()
    lock.release()


def test_lock_release_is_idempotent_and_context_manager(tmp_path):
    path = str(tmp_path / "web.lock")
    with InstanceLock(path) as lock:
        assert lock.held
        other = InstanceLock(path)              # another open file description: excluded
        assert other.try_acquire() is False
        with pytest.raises(UsageError, match=rf"held by pid {os.getpid()}"):
            other.__enter__()
    assert not lock.held
    lock.release()
    assert other.try_acquire() is True
    assert other.try_acquire() is True          # already ours
    other.release()
    other.release()
    assert InstanceLock(path).try_acquire() is True


def test_lock_symlink_is_refused(tmp_path, victim):
    before = snapshot(victim)
    (tmp_path / "web.lock").symlink_to(victim)
    with pytest.raises(UsageError, match=r"web\.lock is a symbolic link"):
        InstanceLock(str(tmp_path / "web.lock")).try_acquire()
    assert snapshot(victim) == before
    assert InstanceLock(str(tmp_path / "web.lock")).holder() is None


@needs_root
def test_lock_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "web.lock"
    path.write_text("")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=rf"owned by uid {NOBODY}"):
        InstanceLock(str(path)).try_acquire()


def test_lock_file_readable_by_others_is_made_private(tmp_path):
    path = tmp_path / "web.lock"
    path.write_text("")
    os.chmod(path, 0o644)                 # anyone could open it and flock it first
    lock = InstanceLock(str(path))
    assert lock.try_acquire()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lock.release()


def test_holder_without_lock_file(tmp_path):
    assert InstanceLock(str(tmp_path / "web.lock")).holder() is None


# -- remove_quietly ----------------------------------------------------------

def test_remove_quietly(tmp_path):
    sock = tmp_path / "web.sock"
    sock.write_text("")
    remove_quietly(str(sock))
    assert not sock.exists()
    remove_quietly(str(sock))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UsageError, match="cannot be removed"):
        remove_quietly(str(tmp_path / "dir"))
