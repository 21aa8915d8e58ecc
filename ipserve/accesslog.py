"""The access log line: gunicorn's atoms, computed only when a format asks
for them, and escaped so that a client cannot forge log lines.

Atoms (as gunicorn's; `%(name)s` in access_log_format):

  h remote address     l -                      u Basic auth user, else -
  t [10/Oct/2000:13:55:36 -0700]                r "GET /p?q HTTP/1.1" (as sent)
  m method             U path (as sent)         q query (as sent)
  H protocol           s status                 B body bytes    b body bytes, - for 0
  f referer            a user agent             T seconds (int) D microseconds (int)
  M milliseconds (int) L seconds ("0.000123")   p "<pid>"
  {name}i request header, {name}o response header, {key}e WSGI environ key
  (names case-insensitive; "-" when absent)

Unlike gunicorn, U and q are the target as the client sent it (not
percent-decoded), and every value a format prints goes through escape():
control characters, non-ASCII bytes, quotes and backslashes come out as
\\xHH, \\n, \\", \\\\ ..., so a line is always one line and a quoted field
always ends where it seems to.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from urllib.parse import urlsplit

DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s'

_HEADER_ATOM = re.compile(r"\{([^}]*)\}([ioe])")

# Everything but printable ASCII, plus the quote and the backslash.
_UNSAFE = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
_NAMED = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"       # a byte as sent (request strings are latin-1)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """`text` with nothing a terminal or a log parser could misread."""
    return _UNSAFE.sub(_escape_one, text)


# ------------------------------------------------------------------ time

_clf_cache: tuple[int, str] = (-1, "")


def clf_time(when: float) -> str:
    """[10/Oct/2000:13:55:36 -0700] in local time (one strftime per second)."""
    global _clf_cache
    second = int(when)
    cached = _clf_cache         # one read: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _clf_cache = (second, time.strftime("[%d/%b/%Y:%H:%M:%S %z]",
                                                     time.localtime(second)))
    return cached[1]


def basic_user(authorization: str | None) -> str | None:
    """The user name of a Basic Authorization header (bytes read as latin-1)."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(b":")[0].decode("latin-1")


# ------------------------------------------------------------------ atoms

class Atoms:
    """One request as the access log sees it; `atoms[name]` computes an atom
    on demand, so a format pays only for what it prints. Values are raw
    (escape() is format_line's job; JSON output escapes for itself)."""

    __slots__ = ("_split", "duration", "environ", "method", "pid", "remote", "response_headers",
                 "sent", "started", "status", "target", "version")

    def __init__(self, remote, method, target, version, status, sent, response_headers,
                 environ, started, duration, pid):
        self.remote = remote
        self.method = method
        self.target = target
        self.version = version
        self.status = status
        self.sent = sent
        self.response_headers = response_headers
        self.environ = environ
        self.started = started
        self.duration = duration
        self.pid = pid
        self._split: tuple[str, str] | None = None

    def __getitem__(self, key: str):
        compute = _COMPUTE.get(key)
        if compute is not None:
            return compute(self)
        match = _HEADER_ATOM.fullmatch(key)
        if match is None:
            raise KeyError(key)
        name, kind = match.groups()
        if kind == "i":
            value = self.request_header(name)
        elif kind == "o":
            value = self.response_header(name)
        else:
            value = self.environ_value(name)
        return "-" if value is None else value

    # -- pieces
    def split(self) -> tuple[str, str]:
        """(path, query) of the target as sent."""
        if self._split is None:
            target = self.target
            if target[:1] == "/" or target == "*":
                path, _, query = target.partition("#")[0].partition("?")
            else:                           # absolute-form: http://host/path?query
                url = urlsplit(target)
                path, query = url.path or "/", url.query
            self._split = (path, query)
        return self._split

    def request_header(self, name: str) -> str | None:
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = self.environ.get(key)
        return value if isinstance(value, str) else None

    def response_header(self, name: str) -> str | None:
        name = name.lower()
        found = [value for key, value in self.response_headers or () if key.lower() == name]
        return ", ".join(found) if found else None

    def environ_value(self, name: str) -> str | None:
        environ = self.environ
        value = environ.get(name, environ.get(name.upper()))
        if value is None:
            lowered = name.lower()
            value = next((v for k, v in environ.items() if k.lower() == lowered), None)
        return None if value is None else str(value)

    @property
    def status_code(self) -> str:
        return (self.status or "-")[:3]

    @property
    def protocol(self) -> str:
        return "HTTP/" + self.version


_COMPUTE = {
    "h": lambda a: a.remote or "-",
    "l": lambda a: "-",
    "u": lambda a: basic_user(a.environ.get("HTTP_AUTHORIZATION")) or "-",
    "t": lambda a: clf_time(a.started),
    "r": lambda a: f"{a.method} {a.target} {a.protocol}",
    "m": lambda a: a.method,
    "U": lambda a: a.split()[0],
    "q": lambda a: a.split()[1],
    "H": lambda a: a.protocol,
    "s": lambda a: a.status_code,
    "B": lambda a: a.sent,
    "b": lambda a: str(a.sent) if a.sent else "-",
    "f": lambda a: a.request_header("referer") or "-",
    "a": lambda a: a.request_header("user-agent") or "-",
    "T": lambda a: int(a.duration),
    "D": lambda a: int(a.duration * 1_000_000),
    "M": lambda a: int(a.duration * 1000),
    "L": lambda a: f"{a.duration:.6f}",
    "p": lambda a: f"<{a.pid}>",
}
ATOM_NAMES = tuple(_COMPUTE)


def atoms(*, remote: str, method: str, target: str, version: str, status: str | None, sent: int,
          response_headers: list | None, environ: dict, started: float, duration: float,
          pid: int) -> Atoms:
    """The atoms of one request. `target` is as sent, read as latin-1;
    `version` "1.0" or "1.1"; `status` the status line ("200 OK") or None if
    no response went out; `started` unix time; `duration` seconds."""
    return Atoms(remote, method, target, version, status, sent, response_headers, environ,
                 started, duration, pid)


# Atoms made only by us (or, for m, a token the parser checked): never escaped.
_SAFE = frozenset("hltmHsbLp")


class _Escaped:
    """What `%` formatting reads: the atoms, every string from the client or
    the application escaped."""

    __slots__ = ("atoms",)

    def __init__(self, atoms: Atoms):
        self.atoms = atoms

    def __getitem__(self, key: str):
        value = self.atoms[key]
        return escape(value) if type(value) is str and key not in _SAFE else value


def format_line(fmt: str, atoms: Atoms) -> str:
    """One access log line (fmt is access_log_format, checked by validate_format)."""
    return fmt % _Escaped(atoms)


def json_record(atoms: Atoms, message: str) -> dict:
    """The access log's JSON object (log_format = "json"); README, "Logs"."""
    path, query = atoms.split()
    status = atoms.status_code
    return {
        "time": iso_time(atoms.started),
        "remote_addr": atoms.remote or None,
        "method": atoms.method,
        "path": path,
        "query": query,
        "protocol": atoms.protocol,
        "status": int(status) if status.isdigit() else None,
        "bytes": atoms.sent,
        "duration_s": round(atoms.duration, 6),
        "referer": atoms.request_header("referer"),
        "user_agent": atoms.request_header("user-agent"),
        "pid": atoms.pid,
        "message": message,
    }


_iso_cache: tuple[int, str, str] = (-1, "", "")


def iso_time(when: float) -> str:
    """2026-12-04T10:11:12.345+01:00: local time with its offset, to the
    millisecond (one strftime per second)."""
    global _iso_cache
    second = int(when)
    cached = _iso_cache         # one read: another thread may replace it meanwhile
    if cached[0] != second:
        local = time.localtime(second)
        offset = time.strftime("%z", local)
        cached = _iso_cache = (second, time.strftime("%Y-%m-%dT%H:%M:%S", local),
                               offset[:3] + ":" + offset[3:])
    return f"{cached[1]}.{int((when - second) * 1000):03d}{cached[2]}"


# ------------------------------------------------------------------ checking a format

_SAMPLE_VALUES = {name: 0 if name in ("B", "T", "D", "M") else "-" for name in ATOM_NAMES}


class _Sample:
    """Stands for Atoms when a format is checked: every known atom has a value
    of its real type; an unknown name raises KeyError."""

    def __getitem__(self, key: str):
        value = _SAMPLE_VALUES.get(key)
        if value is None:
            if _HEADER_ATOM.fullmatch(key) is None:
                raise KeyError(key)
            value = "-"
        return value

    # A lone positional %s/%r would print the whole mapping.
    def __str__(self) -> str:
        raise _Positional

    __repr__ = __str__


class _Positional(Exception):
    pass


_POSITIONAL = "every % needs an atom name, as in %(h)s (write %% for a percent sign)"


def validate_format(value) -> str:
    """access_log_format's parser (config): the format, or ValueError in one line."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    try:
        value % _Sample()
    except KeyError as exc:
        raise ValueError(f"unknown atom %({exc.args[0]})s (see ipserve --help for the atoms)") from None
    except _Positional:
        raise ValueError(_POSITIONAL) from None
    except (TypeError, ValueError) as exc:
        if "not enough arguments" in str(exc):
            raise ValueError(_POSITIONAL) from None
        raise ValueError(f"bad % pattern: {exc} (write %% for a percent sign)") from None
    return value
