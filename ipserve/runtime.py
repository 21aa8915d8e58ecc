"""Files the master keeps as root: runtime directory, logs, pid, state, lock.

The master runs as root and its workers (or any local user) may be hostile:
nothing here may let them make root follow a symlink, truncate or chown a
file that is not ours, or plant files in a directory root trusts. So files
are opened with O_NOFOLLOW and checked with fstat on the descriptor actually
opened, ownership is changed with fchown (never by path), and files are
replaced by rename (which replaces a symlink itself, never its target).

Every refusal raises UsageError with one line naming the path, what is wrong
and what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
import weakref

from ipserve.errors import UsageError

_PID_RE = re.compile(rb"\s*([0-9]{1,10})\s*")


def _show(path: str) -> str:
    # Messages are one line: a path with a newline or escape in it is shown quoted.
    return path if path.isprintable() else repr(path)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):o}"


def _kind(st: os.stat_result) -> str:
    m = st.st_mode
    for test, name in ((stat.S_ISREG, "a regular file"),
                       (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(m):
            return name
    return "of an unknown type"


_MAX_SYMLINKS = 40


def _lookup_dir(d: str, subject: str, other: str, euid: int) -> os.stat_result:
    """Check directory `d` before looking a name up in it; return its lstat.

    Whoever can rename entries in `d` can swap what we find there for a symlink
    or a directory of theirs. Root's and our own directories are fine; a group-
    or world-writable one only if sticky (like /tmp), where the caller then
    requires the entry itself to be root's or ours.
    """
    try:
        st = os.lstat(d)
    except OSError as exc:
        raise UsageError(f"{subject}: directory {_show(d)} on its path cannot be examined: "
                         f"{exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{subject}: {_show(d)} on its path is {_kind(st)} (changed while "
                         f"checking); try again or {other}")
    if st.st_uid not in (0, euid):
        raise UsageError(f"{subject}: directory {_show(d)} on its path is owned by uid {st.st_uid} "
                         f"(neither root nor uid {euid}, this process), who could replace what is "
                         f"below; {other} under directories owned by root or by you")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise UsageError(f"{subject}: directory {_show(d)} on its path is writable by group or "
                         f"others and not sticky (mode {_mode(st)}), so anyone could replace what "
                         f"is below; chmod go-w it or {other}")
    return st


def _resolve(path: str, subject: str, other: str) -> str:
    """Like os.path.realpath(path, strict=True), but refuses a path that another
    user could redirect, now or later.

    Every directory a name is looked up in must pass _lookup_dir, and in a sticky
    one every entry passed through (symlinks included) must be root's or ours:
    its owner could replace it. The last component, if not a symlink, is left to
    the caller. Because we check each directory as we walk (lstat, never
    following), there is no window between resolving and checking; and as no one
    else can change the directories checked, the returned path keeps meaning the
    same directory afterwards.
    """
    euid = os.geteuid()
    # Not abspath(): it would fold "link/.." lexically, unlike the kernel.
    full = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    pending = full.split("/")[::-1]                      # next component last
    real, hops = "/", 0
    while pending:
        name = pending.pop()
        if name in ("", "."):
            continue
        if name == "..":                                 # `real` has no symlinks
            real = os.path.dirname(real)
            continue
        dst = _lookup_dir(real, subject, other, euid)
        entry = os.path.join(real, name)
        try:
            st = os.lstat(entry)
        except FileNotFoundError:
            raise UsageError(f"{subject} does not exist ({_show(entry)} is missing): "
                             f"create it or {other}") from None
        except OSError as exc:
            raise UsageError(f"{subject}: {_show(entry)} cannot be examined: {exc.strerror}") from None
        last = all(c in ("", ".") for c in pending)
        link = stat.S_ISLNK(st.st_mode)
        if (link or not last) and dst.st_mode & stat.S_ISVTX and st.st_uid not in (0, euid):
            raise UsageError(f"{subject}: {_show(entry)} is owned by uid {st.st_uid} in sticky "
                             f"directory {_show(real)}, so that user could replace it; "
                             f"remove it or {other}")
        if link:
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise UsageError(f"{subject}: too many levels of symbolic links; {other}")
            try:
                target = os.readlink(entry)
            except OSError as exc:
                raise UsageError(f"{subject}: {_show(entry)} cannot be read: {exc.strerror}") from None
            if target.startswith("/"):
                real = "/"
            pending.extend(target.split("/")[::-1])
            continue
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{subject}: {_show(entry)} on its path is {_kind(st)}, "
                             f"not a directory; {other}")
        real = entry
    return real


# -- runtime directory -------------------------------------------------------

def _make_missing(path: str, mode: int, what: str) -> None:
    """mkdir the trailing components of `path` that do not exist, each with `mode`."""
    subject, other = f"{what} {_show(path)}", f"choose another {what}"
    missing = []
    p = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    # lexists: a dangling symlink counts as present, so we never mkdir through it.
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for missing_dir in reversed(missing):
        # Create only in a directory no one else can redirect: otherwise a symlink
        # on the way would have root make directories wherever its owner likes.
        parent = _resolve(os.path.dirname(missing_dir), subject, other)
        _lookup_dir(parent, subject, other, os.geteuid())
        d = os.path.join(parent, os.path.basename(missing_dir))
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue            # someone else made it meanwhile: the checks below judge it
        except OSError as exc:
            raise UsageError(f"{what} {_show(d)} cannot be created: {exc.strerror}; "
                             f"create it yourself or choose another {what}") from None
        # The umask may have removed bits the caller needs (e.g. o+x so workers
        # reach the socket). Fix them on the directory we just made, by fd, so a
        # swap for a symlink between mkdir and here changes nothing of anyone else's.
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue            # gone or replaced: the checks below refuse it
        try:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != mode:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)


def secure_dir(path: str, *, create: bool = True, mode: int = 0o755,
               what: str = "runtime_dir") -> str:
    """Return the real path of directory `path`, which only this euid (or root) can change.

    Missing trailing components are created with `mode` when `create`. An existing
    directory is only checked, never chmod'ed. Callers must use the returned path:
    `path` itself may go through a symlink that someone else controls.
    """
    if create:
        _make_missing(path, mode, what)
    real = _resolve(path, f"{what} {_show(path)}", f"choose another {what}")
    euid = os.geteuid()
    name = _show(real) if real == os.path.abspath(path) else f"{_show(path)} (= {_show(real)})"

    # The last component, which _resolve leaves to us: it must be our own.
    try:
        st = os.lstat(real)
    except OSError as exc:
        raise UsageError(f"{what} {name} cannot be examined: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {name} is {_kind(st)}, not a directory; "
                         f"remove it or choose another {what}")
    if st.st_uid != euid:
        raise UsageError(f"{what} {name} is owned by uid {st.st_uid}, not by uid {euid} "
                         f"(this process): another user created it; remove it or choose another {what}")
    if st.st_mode & 0o022:
        raise UsageError(f"{what} {name} is writable by group or others (mode {_mode(st)}): "
                         f"chmod go-w it or choose another {what}")

    return real


def _read_at_most(fd: int, limit: int) -> bytes | None:
    """All of `fd` if it holds at most `limit` bytes, else None (a file may
    grow after the fstat that sized it)."""
    chunks, total = [], 0
    while total <= limit:
        chunk = os.read(fd, limit + 1 - total)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    return None


# -- files root reads for others ------------------------------------------------

MAX_TRUSTED_FILE = 1 << 20      # a certificate chain or a key is a few KiB


def read_trusted_file(path: str, what: str) -> bytes:
    """The content of `path`, read by the master (root) to hand to a worker
    (TLS certificates and keys): only root or this euid may have chosen what
    is read. Symbolic links are followed (certbot's live/ names are links),
    but every directory on the way must pass _lookup_dir, and the file must
    be a regular file owned by root or us, not writable by group or others.
    Otherwise whoever could change a directory on the path, the workers'
    user included, could point it at /etc/shadow and read it in a worker."""
    subject, other = f"{what} {_show(path)}", "check the path (the file and the directories to it must be root's)"
    real = _resolve(path, subject, other)
    try:
        fd, st = _open_regular(real, os.O_RDONLY, 0, subject, other)
    except FileNotFoundError:
        raise UsageError(f"{subject} does not exist") from None
    try:
        if st.st_uid not in (0, os.geteuid()):
            raise UsageError(f"{subject} is owned by uid {st.st_uid}, neither root nor uid "
                             f"{os.geteuid()} (this process): refusing to read it for the workers")
        if st.st_mode & 0o022:
            raise UsageError(f"{subject} is writable by group or others (mode {_mode(st)}): "
                             f"chmod go-w it")
        data = _read_at_most(fd, MAX_TRUSTED_FILE) if st.st_size <= MAX_TRUSTED_FILE else None
        if data is None:
            raise UsageError(f"{subject} is more than {MAX_TRUSTED_FILE} bytes: not a "
                             f"certificate or key")
        return data
    except OSError as exc:
        raise UsageError(f"{subject} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


# -- log files ---------------------------------------------------------------

def open_log(path: str, owner: tuple[int, int] | None = None) -> int:
    """An fd appending to log file `path`, created 0640 if missing.

    With `owner` (the workers' uid, gid) the file is handed to them with fchown:
    the file opened is the one checked and the one chowned, whatever happens to
    the path meanwhile.
    """
    # O_NOFOLLOW covers only the last component. A directory on the way that
    # another user can rewrite would let them point the path at /etc/whatever,
    # and root would create (and chown) the file there. The log's own directory
    # may be theirs: O_NOFOLLOW and the fstat checks below make whatever they
    # put in it harmless, and opening relative to a descriptor of it means they
    # cannot swap the directory itself under us either.
    subject = f"log file {_show(path)}"
    head, name = os.path.split(path)
    if name in ("", ".", ".."):
        raise UsageError(f"{subject} names a directory, not a file; give a file name")
    real_dir = _resolve(head or ".", subject, "choose another path")
    try:
        # O_PATH: needs only search permission, like opening the file by path would.
        dfd = os.open(real_dir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"{subject}: directory {_show(real_dir)} cannot be opened: "
                         f"{exc.strerror}") from None
    try:
        fd, st = _open_regular(name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640, subject,
                               "remove it or choose another path", dir_fd=dfd)
    except FileNotFoundError as exc:   # the directory went away under O_PATH
        raise UsageError(f"{subject} cannot be opened: {exc.strerror}") from None
    finally:
        os.close(dfd)
    try:
        euid = os.geteuid()
        if st.st_nlink != 1:
            # A hard link to someone else's file would have us append to, and
            # chown, that file.
            raise UsageError(f"log file {_show(path)} has {st.st_nlink} hard links; refusing to "
                             f"write or chown it: remove it or choose another path")
        allowed = {euid} if owner is None else {euid, owner[0]}
        if st.st_uid not in allowed:
            whose = f"uid {euid} (this process)"
            if owner is not None:
                whose += f" or uid {owner[0]} (the workers)"
            raise UsageError(f"log file {_show(path)} is owned by uid {st.st_uid}, not by {whose}: "
                             f"another user created it; remove it or choose another path")
        if owner is not None and (st.st_uid, st.st_gid) != tuple(owner):
            os.fchown(fd, owner[0], owner[1])
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd
    except UsageError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"log file {_show(path)} cannot be prepared: {exc.strerror}") from None


def open_log_stream(path: str, owner: tuple[int, int] | None = None):
    """open_log() as a line-buffered text stream, for logging.StreamHandler."""
    fd = open_log(path, owner)
    try:
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise


# -- atomic replacement ------------------------------------------------------

def _replace_atomically(path: str, content: bytes, mode: int, what: str, sync: bool) -> None:
    """Write `content` to a fresh temp file beside `path`, then rename it over `path`."""
    directory, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    try:
        # O_EXCL|O_NOFOLLOW: the temp name is new and unguessable; nothing planted
        # there (file or symlink) is ever opened.
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_WRONLY | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise UsageError(f"{what} {_show(path)} cannot be written: {exc.strerror} "
                         f"(creating a temporary file in {_show(directory)})") from None
    try:
        try:
            os.fchmod(fd, mode)          # exactly `mode`, whatever the umask
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        # rename() replaces a symlink at `path` itself, never what it points to.
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"{what} {_show(path)} cannot be written: {exc.strerror}") from None


def _open_regular(path: str, flags: int, mode: int, subject: str, advice: str, *,
                  dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open `path` without following a final symbolic link and make sure it is
    a regular file; the fd and its stat. O_NONBLOCK: a FIFO planted at the path
    fails now (ENXIO for a writer) rather than hang us until someone opens the
    other end; callers that write clear it. FileNotFoundError passes through;
    anything else is a UsageError naming `subject`, ending with `advice`."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(f"{subject} is a symbolic link; refusing to follow it: "
                             f"{advice}") from None
        if exc.errno == errno.ENXIO:
            raise UsageError(f"{subject} is a FIFO or socket, not a regular file; "
                             f"{advice}") from None
        raise UsageError(f"{subject} cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise UsageError(f"{subject} cannot be examined: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"{subject} is {_kind(st)}, not a regular file; {advice}")
    return fd, st


def _open_nofollow(path: str, what: str) -> int | None:
    """fd open for reading on the regular file `path`, None if it is missing."""
    try:
        return _open_regular(path, os.O_RDONLY, 0, f"{what} {_show(path)}", "remove it")[0]
    except FileNotFoundError:
        return None


def _parse_pid(data: bytes) -> int | None:
    m = _PID_RE.fullmatch(data)
    pid = int(m.group(1)) if m else 0
    # 0 and negatives would make kill() signal whole process groups: never a pid.
    return pid if 0 < pid < 1 << 31 else None


# -- pid file ----------------------------------------------------------------

def write_pid_file(path: str, pid: int) -> None:
    """Atomically make `path` a 0644 file holding `pid` (replacing any symlink there)."""
    _replace_atomically(path, f"{pid}\n".encode(), 0o644, "pid file", sync=False)


def read_pid_file(path: str) -> int | None:
    """The pid in `path`; None if it is missing, a symlink, not a regular file, or garbage."""
    try:
        fd = _open_nofollow(path, "pid file")
    except UsageError:
        return None
    if fd is None:
        return None
    try:
        return _parse_pid(os.read(fd, 64))
    except OSError:
        return None
    finally:
        os.close(fd)


def remove_pid_file(path: str, pid: int) -> None:
    """Unlink `path` only if it still names `pid` (a newer master may have replaced it)."""
    if read_pid_file(path) == pid:
        remove_quietly(path)


# -- private JSON (the state file) -------------------------------------------

def write_private_json(path: str, data: dict) -> None:
    """Atomically replace `path` with `data` as JSON, mode 0600, synced to disk."""
    # Serialise first: a value json cannot encode (a bug) leaves no temp file behind.
    content = json.dumps(data, separators=(",", ":")).encode()
    _replace_atomically(path, content, 0o600, "state file", sync=True)


def read_private_json(path: str, max_bytes: int = 16 << 20) -> dict | None:
    """The JSON object in `path`, None if missing; refuses anything not ours and private."""
    fd = _open_nofollow(path, "state file")
    if fd is None:
        return None
    try:
        st = os.fstat(fd)
        euid = os.geteuid()
        if st.st_uid != euid:
            raise UsageError(f"state file {_show(path)} is owned by uid {st.st_uid}, not by uid {euid} "
                             f"(this process): another user created it; remove it")
        if st.st_mode & 0o077:
            raise UsageError(f"state file {_show(path)} is accessible by group or others "
                             f"(mode {_mode(st)}): someone else may have written it; remove it")
        if st.st_size > max_bytes:
            raise UsageError(f"state file {_show(path)} is {st.st_size} bytes, more than the "
                             f"{max_bytes} allowed; remove it")
        content = _read_at_most(fd, max_bytes)
        if content is None:
            raise UsageError(f"state file {_show(path)} is more than the {max_bytes} bytes "
                             f"allowed; remove it")
    except OSError as exc:
        raise UsageError(f"state file {_show(path)} cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        data = json.loads(content.decode("utf-8"))
    except (ValueError, RecursionError) as exc:   # bad UTF-8, bad JSON, absurd nesting
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"state file {_show(path)} is not valid JSON ({reason}); remove it") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", int: "a number", float: "a number",
                bool: "a boolean"}.get(type(data), "null")
        raise UsageError(f"state file {_show(path)} holds {kind}, not a JSON object; remove it")
    return data


# -- one master per name -----------------------------------------------------

# Locks held by this process. A forked child (a worker) closes its inherited
# copy at once: flock locks belong to the open file description, so a worker
# keeping it would keep the lock alive after the master dies. Exec'd children
# never get it (O_CLOEXEC).
_held: "weakref.WeakSet[InstanceLock]" = weakref.WeakSet()


def _forget_locks_in_child() -> None:
    for lock in list(_held):
        lock._forget()


os.register_at_fork(after_in_child=_forget_locks_in_child)


class InstanceLock:
    """An flock on `<dir>/<name>.lock`, held for the master's whole life.

    The file is never unlinked: removing a locked file would let a second
    master lock a new file of the same name while the first still runs.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._owner_pid: int | None = None

    def try_acquire(self) -> bool:
        """Take the lock without waiting; False if another process holds it."""
        if self._fd is not None:
            return True
        subject = f"lock file {_show(self.path)}"
        try:
            fd, st = _open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o600, subject, "remove it")
        except FileNotFoundError as exc:     # its directory is gone
            raise UsageError(f"{subject} cannot be opened: {exc.strerror}") from None
        try:
            if st.st_uid != os.geteuid():
                # Its owner could hold the flock forever and keep us from starting.
                raise UsageError(f"lock file {_show(self.path)} is owned by uid {st.st_uid}, not by "
                                 f"uid {os.geteuid()} (this process); remove it")
            if st.st_mode & 0o077:
                # flock needs only a read-only descriptor: keep others from taking it.
                os.fchmod(fd, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # Only the holder writes, so a loser never clobbers the holder's pid.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except UsageError:
            os.close(fd)
            raise
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"lock file {_show(self.path)} cannot be locked: {exc.strerror}") from None
        self._fd, self._owner_pid = fd, os.getpid()
        _held.add(self)
        return True

    def acquire(self, timeout: float) -> bool:
        """try_acquire() every 50 ms until it succeeds or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if self.try_acquire():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.05, remaining))

    def holder(self) -> int | None:
        """The pid the holder wrote; None if unknown. Takes no lock; only meaningful
        while someone holds it (a stale pid stays in the file after its holder exits)."""
        try:
            fd = _open_nofollow(self.path, "lock file")
        except UsageError:
            return None
        if fd is None:
            return None
        try:
            return _parse_pid(os.pread(fd, 64, 0))
        except OSError:
            return None
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock and close; does nothing if not held."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is None:
            return
        try:
            if self._owner_pid == os.getpid():
                # Never unlock from a copy inherited by fork: that would unlock it
                # for the holder too (same open file description).
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _forget(self) -> None:
        """In a forked child: drop the inherited descriptor without unlocking."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> InstanceLock:
        if not self.try_acquire():
            holder = self.holder()
            who = f"pid {holder}" if holder else "another process"
            raise UsageError(f"lock file {_show(self.path)} is held by {who}: another master with "
                             f"this name is running; stop it or choose another name")
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def remove_quietly(path: str) -> None:
    """Unlink `path`; already gone is fine (the socket file at exit)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise UsageError(f"{_show(path)} cannot be removed: {exc.strerror}") from None
