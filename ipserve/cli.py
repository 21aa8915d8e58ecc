"""`ipserve` entry point: parse settings, check everything, then run the master.

Every usage error (bad setting, bad APP, missing privilege) exits with status
2 and one line, before any worker is started or any rule is touched.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import NoReturn

import ipserve
from ipserve import config, users

USAGE_ERROR = 2


def fail(message: str) -> NoReturn:
    print(f"ipserve: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipserve",
        description="Pre-fork gevent WSGI server that pins every client to one worker "
                    "by the low bits of its IP address.",
        epilog="Signals to the master: TERM graceful stop, INT/QUIT quick stop.")
    parser.add_argument("--version", action="version", version=f"ipserve {ipserve.__version__}")
    parser.add_argument("--check-config", action="store_true",
                        help="Validate the settings (and import APP if given), then exit.")
    config.add_arguments(parser)
    return parser


def parse(argv: list[str]) -> tuple[config.Config, bool]:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    check_only = args.pop("check_config")
    if check_only and "app" not in args:
        args["app"] = "-"   # --check-config may validate a file without APP
    try:
        return config.resolve(args), check_only
    except config.ConfigError as exc:
        fail(str(exc))


def check_app(cfg: config.Config) -> None:
    """Import APP in a throwaway interpreter, as a worker would, so the master
    itself never imports (or monkey-patches) application code."""
    argv = [sys.executable, "-m", "ipserve.worker", "--check", cfg.app]
    if cfg.chdir:
        argv.append(cfg.chdir)
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        message = lines[-1] if lines else f"checking APP exited with status {result.returncode}"
        print(message if message.startswith("ipserve: error:") else f"ipserve: error: {message}",
              file=sys.stderr)
        sys.exit(USAGE_ERROR)


def main(argv: list[str] | None = None) -> None:
    cfg, check_only = parse(sys.argv[1:] if argv is None else argv)
    if cfg.chdir and not os.path.isdir(cfg.chdir):
        fail(f"chdir = {cfg.chdir!r} ({cfg.sources['chdir']}): no such directory")
    try:
        users.check(cfg.user, cfg.group)
    except users.UserError as exc:
        fail(str(exc))
    if cfg.app != "-":
        check_app(cfg)
    if check_only:
        print(f"ipserve: configuration OK ({cfg.config or 'no config file'})")
        return
    from ipserve.master.main import serve
    sys.exit(serve(cfg))


if __name__ == "__main__":
    main()
