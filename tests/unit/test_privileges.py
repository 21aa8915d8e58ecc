"""ipserve.privileges against the real kernel: capability dropping in child
processes (so the test runner keeps its own), trusted system tool lookup."""

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from ipserve import privileges
from ipserve.privileges import (
    SYSTEM_DIRS, _sys_capset_number, _trusted_file, capability_sets,
    describe_capabilities, system_tool,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(REPO, "ipserve", "privileges.py")
SETPRIV = "/usr/bin/setpriv"
NOBODY = 65534
CAP_NET_ADMIN_BIT = 1 << 12
SET_NAMES = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: capabilities to drop, root-owned files")
needs_setpriv = pytest.mark.skipif(not os.access(SETPRIV, os.X_OK),
                                   reason=f"needs {SETPRIV} (util-linux) to set up capabilities")

# Runs in the child: drop, then exec a grandchild, and report all three views.
CHILD = textwrap.dedent("""
    import json, subprocess, sys
    {import_line}
    before = privileges.capability_sets()
    privileges.drop_capabilities()
    after = privileges.capability_sets()
    grandchild = subprocess.run(["/bin/cat", "/proc/self/status"],
                                capture_output=True, text=True, check=True).stdout
    print(json.dumps({{"before": before, "after": after, "grandchild": grandchild}}))
""")


def status_sets(text: str) -> dict[str, int]:
    """The Cap* lines of a /proc/<pid>/status text, parsed here independently."""
    sets = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in SET_NAMES:
            sets[key] = int(value, 16)
    return sets


def run_child(argv: list[str], **kw) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stderr}"
    result = json.loads(proc.stdout)
    result["grandchild"] = status_sets(result["grandchild"])
    return result


def assert_all_zero(sets: dict[str, int], names: list[str]):
    assert {n: sets[n] for n in names} == {n: 0 for n in names}, describe_capabilities(sets)


# ---------------------------------------------------------------- dropping

@needs_root
def test_root_child_drops_everything_and_exec_cannot_regain():
    code = CHILD.format(import_line="from ipserve import privileges")
    env = dict(os.environ, PYTHONPATH=REPO)
    result = run_child([sys.executable, "-c", code], env=env, cwd=REPO)

    assert result["before"]["CapEff"] != 0
    assert result["before"]["CapEff"] >> privileges.CAP_SETPCAP & 1
    assert_all_zero(result["after"], SET_NAMES)
    # uid 0 execs with permitted = bounding set: empty now, so nothing back.
    assert result["grandchild"]["CapEff"] == 0
    assert result["grandchild"]["CapPrm"] == 0
    assert_all_zero(result["grandchild"], SET_NAMES)


@needs_root
def test_syscall_path_without_libc_capset():
    # libc's capset() is preferred; the raw syscall is the fallback. Force it.
    code = CHILD.format(import_line=textwrap.dedent("""
        from ipserve import privileges
        real = privileges._libc()
        class NoCapset:          # a libc without capset()
            prctl = real.prctl
            syscall = real.syscall
        privileges._libc = lambda: NoCapset
    """))
    env = dict(os.environ, PYTHONPATH=REPO)
    result = run_child([sys.executable, "-c", code], env=env, cwd=REPO)

    assert result["before"]["CapEff"] != 0
    assert_all_zero(result["after"], SET_NAMES)
    assert_all_zero(result["grandchild"], SET_NAMES)


@needs_root
def test_failures_raise_oserror():
    # A capset() that fails, then one that "succeeds" without doing anything:
    # both must raise rather than let a worker run with capabilities.
    code = textwrap.dedent("""
        import ctypes, errno, json
        from ipserve import privileges
        out = []
        def failing(header, data):
            ctypes.set_errno(errno.EPERM)
            return -1
        for fake in (failing, lambda header, data: 0):
            privileges._capset = fake
            try:
                privileges.drop_capabilities()
                out.append(None)
            except OSError as e:
                out.append([e.errno, str(e)])
        out.append(privileges.capability_sets()["CapEff"])
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    failed, left, cap_eff = json.loads(proc.stdout)
    assert failed[0] == errno.EPERM
    assert "capset(permitted=effective=inheritable=0) failed" in failed[1]
    assert left[0] == errno.EPERM
    assert "capabilities left after dropping them: CapPrm=" in left[1]
    assert cap_eff != 0


@pytest.fixture
def module_for_nobody():
    """A directory uid 65534 can read, holding a copy of privileges.py.

    The module uses only the standard library, so a copy spares the test any
    dependence on the permissions of the repository or the virtualenv.
    """
    directory = tempfile.mkdtemp(prefix="ipserve-privileges-", dir="/tmp")
    try:
        os.chmod(directory, 0o755)
        copy = os.path.join(directory, "privileges.py")
        shutil.copyfile(MODULE, copy)
        os.chmod(copy, 0o644)
        yield directory
    finally:
        shutil.rmtree(directory)


@needs_root
@needs_setpriv
def test_ambient_child_like_systemd_drops_everything(module_for_nobody):
    # Like a unit with User=nobody and AmbientCapabilities=CAP_NET_ADMIN. The
    # ambient bit needs the inheritable one: --ambient-caps alone silently
    # gives CapAmb=0.
    import_line = f"sys.path.insert(0, {module_for_nobody!r}); import privileges"
    code = CHILD.format(import_line=import_line)
    interpreter = os.path.realpath(sys.executable)   # the system python3.11
    argv = [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
            "--inh-caps", "+net_admin", "--ambient-caps", "+net_admin",
            "--", interpreter, "-I", "-c", code]
    result = run_child(argv, cwd=module_for_nobody)

    before = result["before"]
    assert before["CapAmb"] & CAP_NET_ADMIN_BIT
    assert before["CapEff"] & CAP_NET_ADMIN_BIT
    assert before["CapEff"] == CAP_NET_ADMIN_BIT   # nothing else: not root
    assert_all_zero(result["after"], ["CapInh", "CapPrm", "CapEff", "CapAmb"])
    # Without CAP_SETPCAP the bounding set stays as it was.
    assert result["after"]["CapBnd"] == before["CapBnd"] != 0
    assert_all_zero(result["grandchild"], ["CapInh", "CapPrm", "CapEff", "CapAmb"])


# ---------------------------------------------------------------- reading

@needs_root
@needs_setpriv
def test_capability_sets_of_another_pid():
    argv = [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
            "--inh-caps", "+net_admin", "--ambient-caps", "+net_admin",
            "--", "/bin/sleep", "30"]
    proc = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + 10
        while open(f"/proc/{proc.pid}/comm").read().strip() != "sleep":
            assert time.monotonic() < deadline, "setpriv never exec'd sleep"
            time.sleep(0.01)
        sets = capability_sets(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert list(sets) == SET_NAMES
    assert sets == {"CapInh": CAP_NET_ADMIN_BIT, "CapPrm": CAP_NET_ADMIN_BIT,
                    "CapEff": CAP_NET_ADMIN_BIT, "CapBnd": capability_sets()["CapBnd"],
                    "CapAmb": CAP_NET_ADMIN_BIT}


def test_capability_sets_of_self_match_status():
    with open("/proc/self/status") as f:
        expected = status_sets(f.read())
    assert capability_sets() == expected
    assert capability_sets(os.getpid()) == expected
    assert capability_sets()["CapBnd"] != 0


def test_sys_capset_numbers():
    assert _sys_capset_number("x86_64") == 126
    assert _sys_capset_number("aarch64") == 91
    with pytest.raises(OSError, match="no syscall number known for architecture 'sparc64'"):
        _sys_capset_number("sparc64")


# ---------------------------------------------------------------- describing

def test_describe_capabilities():
    zero = dict.fromkeys(SET_NAMES, 0)
    assert describe_capabilities(zero) == "none"
    assert describe_capabilities(dict(zero, CapEff=0x1000, CapAmb=0x1000)) == \
        "CapEff=0x1000 (cap_net_admin) CapAmb=0x1000 (cap_net_admin)"
    assert describe_capabilities(dict(zero, CapPrm=0x3001)) == \
        "CapPrm=0x3001 (cap_chown,cap_net_admin,cap_net_raw)"
    assert describe_capabilities(dict(zero, CapBnd=1 << 40 | 1 << 41)) == \
        "CapBnd=0x30000000000 (cap_checkpoint_restore,cap_41)"


@needs_setpriv
def test_cap_names_match_util_linux():
    # setpriv has its own copy of the table: compare names for our bounding set.
    dump = subprocess.run([SETPRIV, "--dump"], capture_output=True, text=True, check=True).stdout
    line = next(l for l in dump.splitlines() if l.startswith("Capability bounding set:"))
    theirs = line.partition(":")[2].strip().split(",")
    bounding = capability_sets()["CapBnd"]
    ours = [name for bit, name in enumerate(privileges.CAP_NAMES) if bounding >> bit & 1]
    assert len(ours) > 1
    assert ours == theirs


# ---------------------------------------------------------------- system tools

def test_system_tool_finds_nft_in_fixed_dirs():
    if not any(os.path.lexists(os.path.join(d, "nft")) for d in SYSTEM_DIRS):
        pytest.skip("nftables is not installed")
    path = system_tool("nft")
    assert path in [os.path.join(d, "nft") for d in SYSTEM_DIRS]
    assert os.path.isabs(path)


def test_system_tool_keeps_alternatives_symlink_path():
    # Debian: /usr/sbin/iptables -> /etc/alternatives/iptables -> iptables-nft
    # -> xtables-nft-multi, which acts on argv[0]: the link path is returned.
    link = "/usr/sbin/iptables"
    if not os.path.islink(link) or not os.path.islink("/etc/alternatives/iptables"):
        pytest.skip("iptables is not a Debian alternatives symlink here")
    assert system_tool("iptables") == link
    assert os.path.realpath(link) != link


def test_system_tool_ignores_path(monkeypatch):
    planted = tempfile.mkdtemp(prefix="ipserve-path-")
    try:
        for name in ("nft", "ipserve-no-such-tool"):
            fake = os.path.join(planted, name)
            with open(fake, "w") as f:
                f.write("#!/bin/sh\necho planted\n")
            os.chmod(fake, 0o755)
        monkeypatch.setenv("PATH", planted + os.pathsep + os.environ.get("PATH", ""))
        # The plant works on anything that searches $PATH...
        assert shutil.which("nft") == os.path.join(planted, "nft")
        assert shutil.which("ipserve-no-such-tool") == os.path.join(planted, "ipserve-no-such-tool")
        # ...but not on system_tool.
        found = system_tool("nft")
        assert found is None or os.path.dirname(found) in SYSTEM_DIRS
        assert system_tool("ipserve-no-such-tool") is None
    finally:
        shutil.rmtree(planted)


def test_system_tool_rejects_paths():
    for name in ("", ".", "..", "sbin/nft", "/usr/sbin/nft"):
        with pytest.raises(ValueError):
            system_tool(name)


@pytest.fixture
def trusted_dir():
    """A root-owned 0700 directory under /run (root-owned, 0755)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create root-owned files")
    st = os.stat("/run")
    if st.st_uid != 0 or st.st_mode & 0o022:
        pytest.skip("/run is not root-owned and closed to others here")
    directory = tempfile.mkdtemp(prefix="ipserve-trusted-", dir="/run")
    try:
        yield directory
    finally:
        shutil.rmtree(directory)


def plant(directory: str, name: str, mode: int = 0o755) -> str:
    path = os.path.join(directory, name)
    shutil.copyfile("/bin/true", path)
    os.chmod(path, mode)
    return path


def test_trusted_file_accepts_root_only_executable(trusted_dir):
    good = plant(trusted_dir, "tool")
    assert _trusted_file(good)
    assert _trusted_file(os.path.join(trusted_dir, ".", "tool"))
    assert subprocess.run([good]).returncode == 0


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o644, 0o777])
def test_trusted_file_rejects_bad_modes(trusted_dir, mode):
    assert not _trusted_file(plant(trusted_dir, "tool", mode))


def test_trusted_file_rejects_other_owner(trusted_dir):
    path = plant(trusted_dir, "tool")
    os.chown(path, NOBODY, NOBODY)
    assert not _trusted_file(path)


def test_trusted_file_rejects_writable_directory(trusted_dir):
    path = plant(trusted_dir, "tool")
    assert _trusted_file(path)
    os.chmod(trusted_dir, 0o775)
    assert not _trusted_file(path)
    os.chmod(trusted_dir, 0o700)
    os.chown(trusted_dir, NOBODY, 0)
    assert not _trusted_file(path)


def test_trusted_file_rejects_non_files(trusted_dir):
    assert not _trusted_file(trusted_dir)
    assert not _trusted_file(os.path.join(trusted_dir, "missing"))
    assert not _trusted_file("bin/true")                       # relative
    os.mkfifo(os.path.join(trusted_dir, "fifo"), 0o755)
    assert not _trusted_file(os.path.join(trusted_dir, "fifo"))


def test_trusted_file_follows_symlinks_through_trusted_dirs_only(trusted_dir):
    good = plant(trusted_dir, "tool")
    os.symlink("tool", os.path.join(trusted_dir, "relative"))
    os.symlink(good, os.path.join(trusted_dir, "absolute"))
    assert _trusted_file(os.path.join(trusted_dir, "relative"))
    assert _trusted_file(os.path.join(trusted_dir, "absolute"))

    untrusted = tempfile.mkdtemp(prefix="ipserve-untrusted-", dir="/tmp")   # /tmp: 1777
    try:
        # A link in a trusted directory to a good-looking file in /tmp...
        elsewhere = plant(untrusted, "tool")
        os.symlink(elsewhere, os.path.join(trusted_dir, "to-tmp"))
        assert not _trusted_file(os.path.join(trusted_dir, "to-tmp"))
        # ...and a link sitting in /tmp to the good file: both replaceable.
        os.symlink(good, os.path.join(untrusted, "link"))
        assert not _trusted_file(os.path.join(untrusted, "link"))
    finally:
        shutil.rmtree(untrusted)

    os.symlink("loop", os.path.join(trusted_dir, "loop"))
    assert not _trusted_file(os.path.join(trusted_dir, "loop"))


def test_system_tool_skips_untrusted_candidates(trusted_dir, monkeypatch):
    first = os.path.join(trusted_dir, "first")
    second = os.path.join(trusted_dir, "second")
    os.mkdir(first, 0o755)
    os.mkdir(second, 0o755)
    monkeypatch.setattr(privileges, "SYSTEM_DIRS", (first, second))

    assert system_tool("tool") is None
    writable = plant(first, "tool", 0o775)                  # root-owned, group-writable
    assert system_tool("tool") is None
    good = plant(second, "tool")
    assert system_tool("tool") == good                      # falls through to the next dir
    os.chmod(writable, 0o755)
    assert system_tool("tool") == writable                  # first dir wins once trusted
