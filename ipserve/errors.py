"""Errors that reach the person running ipserve or ipservectl.

Library code raises them; only the entry points (cli.main, ctl.main) print
them, as one line, and choose the exit status.
"""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2   # bad setting, bad APP, missing privilege, unsafe path: nothing was started


class UsageError(Exception):
    """The command cannot run as asked; the message is one line for the user.
    The entry point prints it and exits with USAGE_ERROR."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the whole
    usage first), still exit status 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)",
              file=sys.stderr)
        sys.exit(USAGE_ERROR)
