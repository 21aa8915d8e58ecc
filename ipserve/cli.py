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

import ipserve
from ipserve import config, users
from ipserve.errors import USAGE_ERROR, ArgumentParser, UsageError

from ipserve.app import CHECK_REPORT


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="ipserve",
        description="Pre-fork gevent WSGI server that pins every client to one worker "
                    "by the low bits of its IP address.",
        epilog="Signals to the master: TERM graceful stop, INT/QUIT quick stop, HUP reload, "
               "USR1 close retiring workers, USR2 reopen logs, TTIN/TTOU double/halve workers.")
    parser.add_argument("--version", action="version", version=f"ipserve {ipserve.__version__}")
    parser.add_argument("--check-config", action="store_true",
                        help="Validate the settings (and import APP if given), then exit.")
    config.add_arguments(parser)
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
        result = subprocess.run(argv, capture_output=True, text=True, timeout=cfg.boot_timeout,
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
