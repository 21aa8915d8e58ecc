"""Capabilities and trusted system tools.

The master runs as root or holds CAP_NET_ADMIN (possibly only as an *ambient*
capability granted by a systemd unit to an unprivileged user). It must run
the firewall tools from fixed system directories, not from $PATH, and its
workers, which run untrusted application code, must hold no capability at all.
"""

import ctypes
import errno
import functools
import os
import stat

# Looked up in this order; $PATH is never consulted: whoever controls the
# master's environment must not be able to choose what runs with CAP_NET_ADMIN.
SYSTEM_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

CAP_SETPCAP = 8
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# SYS_capset per `os.uname().machine`; only used when libc has no capset().
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}

_SET_NAMES = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

# linux/capability.h, 0..40 (CAP_LAST_CAP of Linux 5.9 to 6.x).
CAP_NAMES = (
    "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill",
    "setgid", "setuid", "setpcap", "linux_immutable", "net_bind_service",
    "net_broadcast", "net_admin", "net_raw", "ipc_lock", "ipc_owner",
    "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
    "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time",
    "sys_tty_config", "mknod", "lease", "audit_write", "audit_control",
    "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
    "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
)

_MAX_SYMLINKS = 40   # the kernel's own limit (ELOOP)


# ------------------------------------------------------------- system tools

def system_tool(name: str) -> str | None:
    """Absolute path of system binary `name` in SYSTEM_DIRS, or None.

    Returns the path inside the fixed directory (e.g. /usr/sbin/iptables),
    not the symlink's target: multi-call binaries such as xtables-nft-multi
    choose what to be from argv[0]. That is safe because _trusted_file()
    checked that every link and directory on the way is root's alone.
    """
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"not a plain program name: {name!r}")
    for directory in SYSTEM_DIRS:
        path = os.path.join(directory, name)
        if _trusted_file(path):
            return path
    return None


def _root_only(st: os.stat_result) -> bool:
    # Owned by root and writable by nobody else: only root could have
    # written it (or, for a directory, renamed or replaced its entries).
    return st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted_file(path: str) -> bool:
    """True if `path` leads to an executable regular file only root could plant.

    Resolves `path` one component at a time, following symlinks as the kernel
    would, and requires every directory looked in (including those holding
    the symlinks of an alternatives chain) to be root-owned and not writable
    by group or others, and the final file to be a root-owned, executable
    regular file not writable by group or others.
    """
    if not os.path.isabs(path):
        return False
    pending = path.split("/")[1:]
    current = "/"
    links = 0
    try:
        if not _root_only(os.stat(current)):
            return False
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                current = os.path.dirname(current)   # already checked
                continue
            entry = os.path.join(current, part)
            st = os.lstat(entry)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > _MAX_SYMLINKS:
                    return False
                target = os.readlink(entry)
                if target.startswith("/"):
                    current = "/"
                pending = target.split("/") + pending
                continue
            if any(p not in ("", ".") for p in pending):
                # A directory we are about to look in.
                if not stat.S_ISDIR(st.st_mode) or not _root_only(st):
                    return False
                current = entry
                continue
            return (stat.S_ISREG(st.st_mode) and _root_only(st)
                    and bool(st.st_mode & 0o111) and os.access(entry, os.X_OK))
    except OSError:
        return False
    return False   # the path named a directory


# ------------------------------------------------------------- capabilities

def capability_sets(pid: int | str = "self") -> dict[str, int]:
    """CapInh, CapPrm, CapEff, CapBnd and CapAmb of /proc/<pid>/status as ints."""
    sets = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in _SET_NAMES:
                sets[key] = int(value.strip(), 16)
    sets.setdefault("CapAmb", 0)   # kernels before 4.3 have no ambient set
    missing = [name for name in _SET_NAMES if name not in sets]
    if missing:
        raise OSError(errno.EINVAL, f"/proc/{pid}/status has no {', '.join(missing)}")
    return {name: sets[name] for name in _SET_NAMES}


def describe_capabilities(sets: dict[str, int]) -> str:
    """Short text for log lines: "none" or "CapEff=0x1000 (cap_net_admin) ..."."""
    parts = []
    for name in _SET_NAMES:
        value = sets.get(name, 0)
        if value:
            caps = ",".join(_cap_name(bit) for bit in range(value.bit_length())
                            if value >> bit & 1)
            parts.append(f"{name}={value:#x} ({caps})")
    return " ".join(parts) or "none"


def _cap_name(bit: int) -> str:
    return "cap_" + (CAP_NAMES[bit] if bit < len(CAP_NAMES) else str(bit))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@functools.cache
def _libc():
    # Our own handle: argument types set here stay out of other modules' way.
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, arg2: int = 0) -> int:
    """prctl(option, arg2, 0, 0, 0); returns 0 or the errno it failed with."""
    ul = ctypes.c_ulong
    if _libc().prctl(ctypes.c_int(option), ul(arg2), ul(0), ul(0), ul(0)) == 0:
        return 0
    return ctypes.get_errno()


def _sys_capset_number(machine: str | None = None) -> int:
    machine = machine or os.uname().machine
    try:
        return _SYS_CAPSET[machine]
    except KeyError:
        raise OSError(errno.ENOSYS, f"capset: no syscall number known for "
                      f"architecture {machine!r} and libc has no capset()") from None


def _capset(header: _CapHeader, data) -> int:
    libc = _libc()
    capset = getattr(libc, "capset", None)   # glibc exports it; musl too
    if capset is not None:
        return capset(ctypes.byref(header), data)
    return libc.syscall(ctypes.c_long(_sys_capset_number()), ctypes.byref(header), data)


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63   # PR_CAPBSET_DROP says EINVAL past the last one; ignored


def drop_capabilities() -> None:
    """Leave the calling thread with no capability, now or after any exec.

    Capabilities are per thread: call this before any other thread starts
    (workers call it first thing, before importing application code), or
    those threads keep theirs. Raises OSError if the kernel refuses.
    """
    before = capability_sets("thread-self")
    had_setpcap = bool(before["CapEff"] >> CAP_SETPCAP & 1)
    if had_setpcap:
        # Permitted = 0 alone is not enough for uid 0: exec gives root every
        # capability of the bounding set back. Emptying it needs CAP_SETPCAP,
        # so it comes before capset() below.
        for cap in range(_last_cap() + 1):
            err = _prctl(PR_CAPBSET_DROP, cap)
            if err and err != errno.EINVAL:
                raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}) failed: {os.strerror(err)}")
    # Ambient capabilities (systemd's AmbientCapabilities=) survive exec of
    # any unprivileged program; capset() clears them only as a side effect of
    # clearing permitted, so clear them explicitly. EINVAL: kernel < 4.3.
    err = _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    if err and err != errno.EINVAL:
        raise OSError(err, f"prctl(PR_CAP_AMBIENT_CLEAR_ALL) failed: {os.strerror(err)}")

    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)   # pid 0: this thread
    data = (_CapData * 2)()                               # all zero
    if _capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(permitted=effective=inheritable=0) failed: "
                      f"{os.strerror(err)}")

    # A worker must never run with a capability left by mistake: check.
    after = capability_sets("thread-self")
    left = {k: v for k, v in after.items() if v and (k != "CapBnd" or had_setpcap)}
    if left:
        raise OSError(errno.EPERM, "capabilities left after dropping them: "
                      + describe_capabilities(left))
