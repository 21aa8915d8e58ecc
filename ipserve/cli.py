"""`ipserve` entry point: parse settings, check everything, then run the master.

Every usage error (bad setting, bad APP, missing privilege, unsafe path, a
worker count the machine cannot hold, an address in use) exits with status 2
and one line, before any worker is started or any rule is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import ipserve
from ipserve import config, users
from ipserve.app import CHECK_REPORT
from ipserve.errors import USAGE_ERROR, ArgumentParser, UsageError

# What each signal tells the master (ipserve/master/loop.py acts on them):
# the epilog of --help, and the README's Signals table says the same.
SIGNALS: tuple[tuple[str, str], ...] = (
    ("TERM", ("graceful stop: rules removed, workers finish what they hold for up to "
              "graceful_timeout, WebSockets still open then get a 1001 close; exit 0")),
    ("INT", "quick stop"),
    ("QUIT", "quick stop"),
    ("HUP", ("reload: config re-read; a new generation takes every slot at once when all "
             "its workers are ready, or none if any fails")),
    ("USR1", "retiring workers close their connections (WebSockets with code 1001) and exit"),
    ("USR2", "reopen log files"),
    ("TTIN", "double the workers, through a new generation"),
    ("TTOU", "halve the workers, through a new generation"),
)


def signals_epilog() -> str:
    lines = ["signals to the master:"]
    for name, does in SIGNALS:
        lines += textwrap.wrap(does, 79, initial_indent=f"  {name:<6}",
                               subsequent_indent=" " * 8)
    return "\n".join(lines)


def default_text(s: config.Setting) -> str:
    """A setting's default as --help shows it, in the form the option takes."""
    value = s.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return " ".join(value)
    if isinstance(value, float):
        return f"{value:g}s"
    if isinstance(value, int) and s.metavar == "SIZE" and value and value % 1024**2 == 0:
        return f"{value // 1024**2}MiB"
    return str(value)


def help_with_default(help_text: str, s: config.Setting) -> str:
    """The option's help with "Default: ..." before its [IPSERVE_X], unless
    the setting's doc already says what its default is."""
    if "default" in s.doc.lower():
        return help_text
    default = f"Default: {default_text(s)}.".replace("%", "%%")
    env = f" [{s.env}]"
    if help_text.endswith(env):
        return f"{help_text[:-len(env)]} {default}{env}"
    return f"{help_text} {default}"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ipserve",
        # Raw, so that the epilog keeps one line per signal.
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pre-fork gevent WSGI server that pins every client to one worker\n"
                    "by the low bits of its IP address.",
        epilog=signals_epilog())
    parser.add_argument("--version", action="version", version=f"ipserve {ipserve.version()}")
    parser.add_argument("--check-config", action="store_true",
                        help="Validate the settings (and import APP if given), then exit.")
    config.add_arguments(parser)
    for action in parser._actions:
        setting = config.BY_NAME.get(action.dest)
        if setting is not None and setting.name != "app" and action.help:
            action.help = help_with_default(action.help, setting)
    return parser


def parse(argv: list[str]) -> tuple[config.Config, bool]:
    args = vars(build_parser().parse_args(argv))
    check_only = args.pop("check_config")
    if check_only and "app" not in args:
        args["app"] = "-"   # --check-config may validate a file without APP
    try:
        return config.resolve(args), check_only
    except config.ConfigError as exc:
        raise UsageError(str(exc)) from None


def check_app(cfg: config.Config) -> int | None:
    """Import APP in a throwaway interpreter exactly as a worker would: as the
    worker user, with no capabilities, in `chdir`. The master never imports
    (or monkey-patches) application code. Returns the RSS it took."""
    argv = [sys.executable, "-m", "ipserve.worker", "--check", cfg.app]
    if cfg.chdir:
        argv.append(cfg.chdir)
    identity = {}
    if cfg.user is not None:
        identity = {"user": cfg.user, "group": cfg.group or users.primary_group(cfg.user),
                    "extra_groups": []}
    try:
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=cfg.boot_timeout,
                                stdin=subprocess.DEVNULL, **identity)
    except subprocess.TimeoutExpired:
        raise UsageError(f"importing APP {cfg.app!r} took longer than boot_timeout "
                         f"({cfg.boot_timeout:g}s)") from None
    except OSError as exc:
        raise UsageError(f"cannot run {sys.executable} to check APP: {exc.strerror}") from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"checking APP exited with status {result.returncode}"
        raise UsageError(message.removeprefix("ipserve: error: "))
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(CHECK_REPORT):
            try:
                return int(json.loads(line[len(CHECK_REPORT):])["rss"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


def run(argv: list[str]) -> int:
    cfg, check_only = parse(argv)
    if cfg.chdir and not os.path.isdir(cfg.chdir):
        raise UsageError(f"chdir = {cfg.chdir!r} ({cfg.sources['chdir']}): no such directory")
    try:
        users.check(cfg.user, cfg.group)
    except users.UserError as exc:
        raise UsageError(str(exc)) from None
    worker_rss = check_app(cfg) if cfg.app != "-" else None
    if check_only:
        print(f"ipserve: configuration OK ({cfg.config or 'no config file'})")
        return 0
    from ipserve.master.main import serve
    return serve(cfg, worker_rss)


def main(argv: list[str] | None = None) -> None:
    try:
        sys.exit(run(sys.argv[1:] if argv is None else argv))
    except UsageError as exc:
        print(f"ipserve: error: {exc}", file=sys.stderr)
        sys.exit(USAGE_ERROR)
    except KeyboardInterrupt:   # Ctrl-C before the master's own handlers are in place
        print("ipserve: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
