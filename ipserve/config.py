"""Every setting, declared once, and the layering that resolves them.

Precedence: defaults < TOML file < IPSERVE_<KEY> environment < command line.
The same table builds the argparse options, validates the config file and
documents conf/ipserve.toml, so a setting cannot exist in one place only.
Every error names the key, the bad value and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import tomllib
from typing import Any, Callable, Iterable

from ipserve import accesslog, names

ENV_PREFIX = "IPSERVE_"


class ConfigError(Exception):
    """A setting that cannot be used; the message is one line for the user."""


# ---------------------------------------------------------------- value types

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_duration(value: Any) -> float:
    """Seconds from 30, 2.5, "30s", "500ms", "2m", "1h"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 500ms")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("expected a finite duration such as 30s or 500ms")
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?)\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", value)
        if m and m.group(1):
            raise ValueError("must not be negative")
        if m:
            return float(m.group(2)) * _DURATION_UNITS[m.group(3) or "s"]
    raise ValueError("expected a duration such as 30s or 500ms")


def parse_size(value: Any) -> int:
    """Bytes from 1048576, "448MiB", "2GiB", "512k"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 448MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?)\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(3).lower() in _SIZE_UNITS:
            if m.group(1):
                raise ValueError("must not be negative")
            return int(float(m.group(2)) * _SIZE_UNITS[m.group(3).lower()])
    raise ValueError("expected a size such as 448MiB")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    raise ValueError("expected a whole number")


def integer(minimum: int | None = 0, maximum: int | None = None) -> Callable[[Any], int]:
    """parse_int within [minimum, maximum] (None: unbounded on that side)."""
    def parse_bounded(value: Any) -> int:
        n = parse_int(value)
        if minimum is not None and maximum is not None:
            if not minimum <= n <= maximum:
                raise ValueError(f"must be between {minimum} and {maximum}")
        elif minimum is not None and n < minimum:
            raise ValueError(f"must be at least {minimum}")
        elif maximum is not None and n > maximum:
            raise ValueError(f"must be at most {maximum}")
        return n
    return parse_bounded


MAX_WORKERS = 1024


def parse_power_of_two(value: Any) -> int:
    n = parse_int(value)
    if n < 1 or n & (n - 1):
        raise ValueError("must be a power of two (1, 2, 4, 8, ...)")
    if n > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}")
    return n


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def parse_name(value: Any) -> str:
    # The one rule, shared with ipservectl: see ipserve.names.
    return names.validate(value)


def choice(*allowed: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return value
    parse.choices = allowed  # type: ignore[attr-defined]
    return parse


@dataclasses.dataclass(frozen=True)
class Bind:
    host: str   # as given, without brackets
    port: int
    family: int  # socket.AF_INET or socket.AF_INET6

    @property
    def wildcard(self) -> str:
        return "::" if self.family == 10 else "0.0.0.0"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("0.0.0.0", "::")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == 10 else f"{self.host}:{self.port}"


def parse_bind(text: str) -> Bind:
    import ipaddress
    import socket

    if not isinstance(text, str):
        raise ValueError("expected HOST:PORT")
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)|(\d+)", text.strip())
    if not m:
        raise ValueError("expected HOST:PORT, [IPv6]:PORT or PORT")
    if m.group(1) is not None:
        host, port = m.group(1), m.group(2)
    elif m.group(3) is not None:
        host, port = m.group(3) or "0.0.0.0", m.group(4)
    else:
        host, port = "0.0.0.0", m.group(5)
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    port_n = int(port)
    if not 1 <= port_n <= 65535:
        raise ValueError("port must be between 1 and 65535")
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    return Bind(str(addr), port_n, family)


@dataclasses.dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


def parse_admin_bind(value: Any) -> Bind | UnixAddress:
    """HOST:PORT, [IPv6]:PORT or unix:/absolute/path."""
    if isinstance(value, str) and value.startswith("unix:"):
        path = value[len("unix:"):]
        if not path.startswith("/") or "\0" in path or len(path.encode()) > 107:
            raise ValueError("expected unix:/absolute/path (at most 107 bytes)")
        return UnixAddress(path)
    return parse_bind(value)


def is_loopback(address: Bind | UnixAddress) -> bool:
    import ipaddress
    if isinstance(address, UnixAddress):
        return True    # reachable only on this host, through file permissions
    return ipaddress.ip_address(address.host).is_loopback


def parse_token(value: Any) -> str:
    # It travels in an Authorization header: visible ASCII, no spaces.
    if not isinstance(value, str) or not re.fullmatch(r"[\x21-\x7e]{16,512}", value):
        raise ValueError("expected 16 to 512 visible ASCII characters, no spaces")
    return value


def parse_binds(value: Any) -> tuple[Bind, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError("expected HOST:PORT or a list of them")
    binds = tuple(parse_bind(item) for item in items)
    if len({b.port for b in binds}) > 1:
        raise ValueError("every bind must use the same port")
    return binds


def optional(parse: Callable[[Any], Any], zero_is_none: bool = False) -> Callable[[Any], Any]:
    """`parse`, but "", "none" (and 0 if `zero_is_none`: "no limit") give None."""
    def parse_optional(value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        parsed = parse(value)
        return None if zero_is_none and parsed == 0 else parsed
    return parse_optional


def no_limit(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A limit or threshold where 0 (or "none") means there is none: None in the config.

    Code reads None as "disabled"; a number it sees is never 0. Settings where 0
    is a real amount (graceful_timeout, spawn_interval, keepalive, ...) keep 0.
    """
    return optional(parse, zero_is_none=True)


# ---------------------------------------------------------------- the table

@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    short: str | None = None
    metavar: str | None = None
    repeatable: bool = False   # the CLI flag may be given more than once

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def default_workers() -> int:
    n = os.cpu_count() or 1
    return 1 << (n.bit_length() - 1)


def default_runtime_dir() -> str:
    if os.geteuid() == 0:
        return "/run/ipserve"
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base):
        return os.path.join(base, "ipserve")
    return f"/tmp/ipserve-{os.geteuid()}"


DEFAULT_ACCESS_LOG_FORMAT = accesslog.DEFAULT_FORMAT
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ROUTERS = ("auto", "nft", "iptables", "iptc", "reuseport")

SETTINGS: tuple[Setting, ...] = (
    Setting("app", parse_str, None,
            "The WSGI application: module:callable or path/to/file.py:callable.",
            metavar="APP"),
    Setting("workers", parse_power_of_two, None,
            "Number of worker processes, a power of two. Default: the largest "
            "power of two not above the CPU count.", short="-w", metavar="N"),
    Setting("bind", parse_binds, ("0.0.0.0:8000",),
            "Public address HOST:PORT (or [IPv6]:PORT) clients connect to.",
            short="-b", metavar="ADDRESS", repeatable=True),
    Setting("name", parse_name, None,
            "Instance name; scopes the control socket, the firewall table or "
            "chain and the pid file. Default: ipserve-<port>.", short="-n"),
    Setting("router", choice(*ROUTERS), "auto",
            "How clients are pinned to workers: nft, iptables (iptables-restore), "
            "iptc (python-iptables, legacy hosts) or auto."),
    Setting("pid", optional(parse_str), None,
            "Pid file of the master. Default: <runtime_dir>/<name>.pid.", metavar="FILE"),
    Setting("runtime_dir", parse_str, None,
            "Directory of the control socket and pid file. Default: /run/ipserve as "
            "root, else $XDG_RUNTIME_DIR/ipserve or /tmp/ipserve-<uid>.", metavar="DIR"),
    Setting("chdir", optional(parse_str), None,
            "Directory to change to before loading the app; it goes on sys.path.",
            metavar="DIR"),
    Setting("graceful_timeout", parse_duration, 30.0,
            "On TERM, how long workers may finish what they hold before they are killed. "
            "0: they are stopped at once.", metavar="DURATION"),
    Setting("boot_timeout", no_limit(parse_duration), 30.0,
            "How long a new worker may take to say ready before it is killed and replaced. "
            "0: no limit.", metavar="DURATION"),
    Setting("retired_nice", integer(-20, 19), 10,
            "Nice value (-20 to 19) a retiring worker is given while it drains its connections.",
            metavar="N"),
    Setting("retired_timeout", no_limit(parse_duration), None,
            "How long a retiring worker may keep its connections before they are "
            "closed (WebSockets with code 1001). Default (or 0): no limit.", metavar="DURATION"),
    Setting("spawn_interval", parse_duration, 0.1,
            "Pause between starting two workers of a new generation, so a reload "
            "is not a boot storm. 0: no pause.", metavar="DURATION"),
    # -- limits and health
    Setting("worker_memory", no_limit(parse_size), None,
            "RSS above which a worker is replaced (a fresh worker takes its slot, it "
            "drains). Measured by the master. Default (or 0): no limit.", metavar="SIZE"),
    Setting("cluster_memory", no_limit(parse_size), None,
            "RSS of all workers together. Above 80% retiring workers are asked to exit "
            "(fewest connections, then largest, then oldest first), above 95% they are "
            "killed; with none left the largest active worker is replaced. "
            "Default (or 0): no limit.", metavar="SIZE"),
    Setting("health_retire_interval", parse_duration, 10.0,
            "At most one retirement for memory or load per this interval, so a leak "
            "cannot start a spawn storm. Reloads are not limited. 0: no rate limit.",
            metavar="DURATION"),
    Setting("max_requests", no_limit(integer(0)), 0,
            "Replace a worker after this many requests (a WebSocket counts as one). 0: never.",
            metavar="N"),
    Setting("max_requests_jitter", integer(0), 0,
            "Add up to this many requests, at random per worker, to max_requests. 0: none.",
            metavar="N"),
    Setting("busy_lag", no_limit(parse_duration), 0.15,
            "Hub lag (smoothed) above which a worker is too busy: ipserve.too_busy() and "
            'environ["ipserve.too_busy"] say so. 0: busy detection off (never too busy).',
            metavar="DURATION"),
    Setting("shed_load", parse_bool, False,
            "Answer new plain HTTP requests with 503 and Retry-After while the worker is too "
            "busy, with probability (lag - busy_lag) / busy_lag. Open WebSockets are kept."),
    Setting("busy_retire_after", no_limit(parse_duration), 45.0,
            "Replace a worker that stays too busy this long. 0: never.", metavar="DURATION"),
    Setting("block_report", no_limit(parse_duration), 1.0,
            "Log the stack of code that blocks the hub longer than this. 0: no reports.",
            metavar="DURATION"),
    Setting("timeout", no_limit(parse_duration), 30.0,
            "A worker silent this long (no heartbeat) gets SIGABRT (it dumps its stacks), "
            "then SIGKILL, and is replaced. 0: no hung-worker detection.", metavar="DURATION"),
    Setting("limit_request_line", no_limit(integer(0)), 4094,
            "Longest request line accepted (method, target and version, CRLF not counted; "
            "longer: 414, connection closed). 0: no limit.", metavar="BYTES"),
    Setting("limit_request_fields", no_limit(integer(0)), 100,
            "Most header fields in a request (more: 431, connection closed). 0: no limit.",
            metavar="N"),
    Setting("limit_request_field_size", no_limit(integer(0)), 8190,
            "Longest header field line, `Name: value` as sent, CRLF not counted (longer: "
            "431, connection closed). 0: no limit.", metavar="BYTES"),
    Setting("limit_request_body", no_limit(parse_size), 100 * 1024 * 1024,
            "Largest request body. A Content-Length above it is answered 413 before the "
            "application runs; a chunked body that grows past it fails the application's "
            "read, then 413 (or a closed connection) follows. 0: no limit.", metavar="SIZE"),
    Setting("header_timeout", no_limit(parse_duration), 10.0,
            "Time a client has to send a request's line and headers (slowloris guard; "
            "408 and close). 0: no limit.", metavar="DURATION"),
    Setting("body_timeout", no_limit(parse_duration), 30.0,
            "A request body that makes no progress for this long, or a response the client "
            "stops reading for this long, ends the connection (408 if no response has "
            "started). 0: no limit.", metavar="DURATION"),
    Setting("keepalive", parse_duration, 5.0,
            "How long an idle keep-alive connection waits for its next request. "
            "0: keep-alive off (every response closes its connection).", metavar="DURATION"),
    Setting("worker_connections", integer(1), 10000,
            "Most connections one worker holds. At the limit it stops accepting until one "
            "closes: new clients of its slot wait in the kernel's queue, none is refused.",
            metavar="N"),
    Setting("ws_send_timeout", no_limit(parse_duration), 30.0,
            "A WebSocket whose peer reads nothing for this long while we send is closed, so "
            "a stalled peer cannot pin a greenlet and its buffers. 0: no limit.",
            metavar="DURATION"),
    Setting("ws_max_message", no_limit(parse_size), 16 * 1024 * 1024,
            "Largest WebSocket message a client may send, all its fragments together "
            "(larger: close 1009, read no further). 0: no limit.", metavar="SIZE"),
    Setting("user", optional(parse_str), None,
            "When started as root, run workers as this user (name or uid). The master stays "
            "root: it writes the routing rules and never runs application code.", metavar="USER"),
    Setting("group", optional(parse_str), None,
            "Group for the workers (default: the user's primary group).", metavar="GROUP"),
    Setting("backlog", integer(1, 65535), 2048,
            "Listen backlog of each worker's socket (1 to 65535).", metavar="N"),
    Setting("log_level", choice(*LOG_LEVELS), "info",
            "Error log verbosity: " + ", ".join(LOG_LEVELS) + "."),
    Setting("access_log", optional(parse_str), None,
            "Access log file, or - for standard output. Default: none.", metavar="FILE"),
    Setting("error_log", parse_str, "-",
            "Error log file, or - for standard error.", metavar="FILE"),
    Setting("access_log_format", accesslog.validate_format, DEFAULT_ACCESS_LOG_FORMAT,
            "Access log line, with gunicorn's atoms: %(h)s client address, %(l)s -, %(u)s "
            "user, %(t)s time, %(r)s request line, %(m)s method, %(U)s path, %(q)s query, "
            "%(H)s protocol, %(s)s status, %(b)s body bytes (- for none), %(B)s body bytes, "
            "%(f)s referer, %(a)s user agent, %(T)s seconds, %(D)s microseconds, %(M)s "
            "milliseconds, %(L)s decimal seconds, %(p)s pid, %({header}i)s request header, "
            "%({header}o)s response header, %({key}e)s WSGI environ key. Path and query are "
            "as sent; every value is escaped (\\xHH, \\\", \\\\). Default: the common log format.",
            metavar="FORMAT"),
    Setting("log_format", choice("text", "json"), "text",
            "text, or json: one JSON object per line in the error and access logs, for log "
            "shippers."),
    # -- TLS
    Setting("certfile", optional(parse_str), None,
            "PEM certificate (chain) the workers present: with it they speak HTTPS and wss "
            "(HTTP/1.1, ALPN http/1.1). Read by each new generation, so a HUP loads a renewed "
            "certificate. Default: plain HTTP.", metavar="FILE"),
    Setting("keyfile", optional(parse_str), None,
            "PEM private key of certfile (default: in certfile itself).", metavar="FILE"),
    Setting("ca_certs", optional(parse_str), None,
            "PEM CA certificates that client certificates must chain to (ssl_client_verify).",
            metavar="FILE"),
    Setting("ssl_client_verify", choice("none", "optional", "required"), "none",
            "Ask clients for a certificate: none, optional (checked if sent) or required; "
            "needs ca_certs."),
    Setting("ssl_minimum_version", choice("TLSv1.2", "TLSv1.3"), "TLSv1.2",
            "Oldest TLS version accepted."),
    Setting("ssl_ciphers", optional(parse_str), None,
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3's suites are OpenSSL's). Default: "
            "Python's.", metavar="CIPHERS"),
    # -- observability
    Setting("admin_bind", optional(parse_admin_bind), None,
            "Where the master serves its read-only admin endpoint: the dashboard (/), "
            "Prometheus metrics (/metrics) and /status.json. HOST:PORT or unix:/path. An "
            "address other than loopback needs admin_token. Default: off.", metavar="ADDRESS"),
    Setting("admin_token", optional(parse_token), None,
            "When set, every admin request but the dashboard page itself (which holds no data) "
            "needs `Authorization: Bearer <token>`; open the dashboard as /?token=<token>. Prefer "
            "the config file or IPSERVE_ADMIN_TOKEN to the command line, which other users can "
            "read in ps.", metavar="TOKEN"),
    Setting("leak_report", choice("types", "tracemalloc", "off"), "types",
            "When a retired worker has drained, report what grew in it since it became ready: "
            "types (a census of live objects by type), tracemalloc (allocation sites; traces "
            "every allocation from boot, slower), or off."),
)

BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass
class Config:
    values: dict[str, Any]
    sources: dict[str, str]
    cli: dict[str, Any] = dataclasses.field(default_factory=dict)  # to resolve again on reload

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_json(self) -> dict[str, Any]:
        out = dict(self.values)
        out["bind"] = [str(b) for b in self.values["bind"]]
        if out.get("admin_bind") is not None:
            out["admin_bind"] = str(out["admin_bind"])
        out.pop("admin_token", None)    # a secret: never in a spec, state or status
        return out


# ---------------------------------------------------------------- layering

def suggest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate `word` was most likely meant to be (a typo, a missing
    letter, the only name it begins), or None when none is close: every place
    a setting is named (option, file key, environment variable) offers it the
    same way."""
    names = list(candidates)
    extending = [name for name in names if name.startswith(word)]
    if len(word) >= 4 and len(extending) == 1:   # `--graceful`: an abbreviation
        return extending[0]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.75)
    return close[0] if close else None


def _apply(values: dict, sources: dict, key: str, raw: Any, source: str) -> None:
    setting = BY_NAME.get(key)
    if setting is None:
        close = suggest(key, BY_NAME)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ConfigError(f"unknown setting {key!r} ({source}){hint}")
    try:
        values[key] = setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{key} = {raw!r} ({source}): {exc}") from None
    sources[key] = source


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{key} ({path}): tables are not used; keys are flat")
    return data


def resolve(cli: dict[str, Any], environ: dict[str, str] | None = None) -> Config:
    """Merge defaults, the config file, the environment and the command line.

    `cli` holds only what was given on the command line (plus "config").
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        values[s.name] = None if s.default is None else s.parse(s.default)
        sources[s.name] = "default"

    config_path = cli.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        for key, raw in read_toml(config_path).items():
            _apply(values, sources, key, raw, f"in {config_path}")

    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX):].lower()
        if key not in BY_NAME:
            close = suggest(key, [*BY_NAME, "config"])
            hint = f"; did you mean {ENV_PREFIX}{close.upper()}?" if close else ""
            raise ConfigError(f"unknown setting in environment variable {var}{hint}")
        _apply(values, sources, key, raw, f"from environment {var}")

    for key, raw in cli.items():
        if key == "config":
            continue
        _apply(values, sources, key, raw, f"from command line {BY_NAME[key].flag}")

    # Derived defaults.
    if values["workers"] is None:
        values["workers"] = default_workers()
    if values["name"] is None:
        values["name"] = f"ipserve-{values['bind'][0].port}"
    if values["runtime_dir"] is None:
        values["runtime_dir"] = default_runtime_dir()
    if values["pid"] is None:
        values["pid"] = os.path.join(values["runtime_dir"], values["name"] + ".pid")
    if values["keyfile"] is not None and values["certfile"] is None:
        raise ConfigError(f"keyfile ({sources['keyfile']}) needs certfile")
    if values["ssl_client_verify"] != "none" and values["ca_certs"] is None:
        raise ConfigError(f"ssl_client_verify = {values['ssl_client_verify']!r} "
                          f"({sources['ssl_client_verify']}) needs ca_certs")
    admin = values["admin_bind"]
    if admin is not None and not is_loopback(admin) and values["admin_token"] is None:
        raise ConfigError(f"admin_bind = {str(admin)!r} ({sources['admin_bind']}) is not a loopback "
                          f"address: set admin_token too, or bind 127.0.0.1")
    if values["app"] is None:
        raise ConfigError("no APP given: ipserve module:callable (see ipserve --help)")
    values["config"] = config_path
    return Config(values, sources, dict(cli))


# ---------------------------------------------------------------- CLI + docs

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting; unset options stay absent (SUPPRESS)."""
    parser.add_argument("app", nargs="?", default=argparse.SUPPRESS,
                        help=BY_NAME["app"].doc, metavar="APP")
    parser.add_argument("-c", "--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="TOML config file; every option below can be set there "
                             "(flat keys, '_' for '-').")
    for s in SETTINGS:
        if s.name == "app":
            continue
        flags = [s.short, s.flag] if s.short else [s.flag]
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, dest=s.name,
                                      metavar=s.metavar or s.name.upper(),
                                      help=f"{s.doc} [{s.env}]".replace("%", "%%"))
        if s.repeatable:
            kwargs["action"] = "append"
        choices = getattr(s.parse, "choices", None)
        if choices:
            kwargs["choices"] = choices
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        parser.add_argument(*flags, **kwargs)


def render_default(s: Setting) -> str:
    if s.default is None:
        return "(see above)"
    if isinstance(s.default, tuple):
        return "[" + ", ".join(f'"{v}"' for v in s.default) + "]"
    if isinstance(s.default, bool):
        return "true" if s.default else "false"
    if isinstance(s.default, float):
        return f'"{s.default:g}s"'
    if isinstance(s.default, str):
        # A TOML literal string when the value has quotes (access_log_format's does).
        return f"'{s.default}'" if '"' in s.default else f'"{s.default}"'
    return str(s.default)


def render_toml_docs() -> str:
    """The text of conf/ipserve.toml: every key, its default, its doc."""
    import textwrap

    lines = [
        "# ipserve configuration. Every key is optional; shown with its default.",
        "# Precedence: defaults < this file < IPSERVE_<KEY> environment < command line.",
        "# Durations: 30, \"30s\", \"500ms\", \"2m\". Sizes: 1048576, \"448MiB\", \"2GiB\".",
        "",
    ]
    for s in SETTINGS:
        for line in textwrap.wrap(s.doc, 76):
            lines.append("# " + line)
        lines.append(f"# {s.name} = {render_default(s)}")
        lines.append("")
    return "\n".join(lines)
