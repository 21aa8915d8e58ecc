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
    usage first), still exit status 2, and a near-miss option or choice gets
    a "did you mean".

    Abbreviations are refused: the config file and the environment take whole
    names only, and a prefix that works today (`--time` for --timeout) would
    turn ambiguous, or silently mean another option, when one is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        self._argv = sys.argv[1:] if args is None else list(args)
        namespace, extras = self.parse_known_args(self._argv, namespace)
        if extras:
            self.error(unrecognized_message(extras, self._known_options(namespace)))
        return namespace

    def _known_options(self, namespace) -> list[str]:
        """The options that could have been meant: this parser's, and those of
        the subcommand that was given (`ipservectl status --jsn`)."""
        known = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None))
                if chosen is not None:
                    known += chosen._option_string_actions
        return known

    def _every_option(self) -> list[str]:
        known = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    known += parser._option_string_actions
        return known

    def _check_value(self, action, value):
        # `--router nf`, `ipservectl stat`: argparse's message, plus the near miss.
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(repr, action.choices))
            hint = did_you_mean(str(value), [str(c) for c in action.choices], quote=True)
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}{hint} (choose from {choices})")

    def error(self, message: str):
        # An unknown option is the likely cause of whatever argparse says next
        # (`ipservectl --time 3 status`: "invalid choice: '3'"), so say it first.
        unknown = first_unknown_option(getattr(self, "_argv", []), self._every_option())
        if unknown is not None:
            message = f"unknown option {unknown}{did_you_mean(unknown, self._every_option())}"
        print(f"{self.prog}: error: {message} (see {self.prog.split()[0]} --help)",
              file=sys.stderr)
        sys.exit(USAGE_ERROR)


def did_you_mean(word: str, candidates: list[str], quote: bool = False) -> str:
    """"; did you mean X?" for the candidate closest to `word`, or ""."""
    from ipserve.config import suggest  # config imports more than an error needs

    close = suggest(word, candidates)
    if close is None:
        return ""
    return f"; did you mean {close!r}?" if quote else f"; did you mean {close}?"


def first_unknown_option(argv: list[str], known_options: list[str]) -> str | None:
    """The first `--name` or `--name=value` in argv that is no known option.
    Stops at `--` (what follows is positional); a word with a space is a value."""
    for arg in argv:
        if arg == "--":
            return None
        if arg.startswith("--") and " " not in arg:
            option = arg.split("=", 1)[0]
            if option not in known_options:
                return option
    return None


def unrecognized_message(extras: list[str], known_options: list[str]) -> str:
    """What argparse calls "unrecognized arguments", said of the first unknown
    option (the one a typo most likely produced), or of the stray arguments."""
    for arg in extras:
        if arg == "--":
            break
        if arg.startswith("-") and len(arg) > 1:
            option = arg.split("=", 1)[0]
            return f"unknown option {option}{did_you_mean(option, known_options)}"
    return "unexpected argument(s): " + " ".join(extras)
