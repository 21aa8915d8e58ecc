"""Instance names: the one check, and the kernel object names made from them.

The name (-n/--name) becomes file names in the runtime directory
(<name>.sock, .pid, .lock, .state), the nft table ipserve_<name> and the
iptables chain IPS-<name> (at most 28 characters, of which "IPS-" takes 4).
So: 1 to 24 ASCII letters, digits, '-', '_' or '.', starting with a letter or
a digit; no '/', no "..", nothing nft or a shell would read as syntax.

The kernel names are the name itself behind a prefix, so two names never
share a table or a chain. This module imports nothing from ipserve.
"""

from __future__ import annotations

import re

MAX_LENGTH = 24
_ALLOWED = re.compile(r"[A-Za-z0-9_.-]*")
_FIRST = re.compile(r"[A-Za-z0-9]")
_BAD = re.compile(r"[^A-Za-z0-9_.-]")


def validate(name: object) -> str:
    """`name` if it is a valid instance name; else ValueError with a one-line reason."""
    if not isinstance(name, str):
        raise ValueError(f"an instance name must be a string, not {type(name).__name__}")
    if not name:
        raise ValueError("an instance name must not be empty")
    if not _ALLOWED.fullmatch(name):
        bad = _BAD.search(name).group()  # type: ignore[union-attr]
        raise ValueError(f"{bad!r} is not allowed in an instance name: use letters, digits, "
                         "'-', '_' or '.'")
    if not _FIRST.match(name):
        raise ValueError("an instance name must start with a letter or a digit")
    if len(name) > MAX_LENGTH:
        raise ValueError(f"an instance name has at most {MAX_LENGTH} characters ({len(name)} given)")
    return name


def nft_table(name: str) -> str:
    """The nft table of instance `name` (one per name: no characters are folded)."""
    return "ipserve_" + validate(name)


def iptables_chain(name: str) -> str:
    """The iptables chain of instance `name` (at most 28 characters)."""
    return "IPS-" + validate(name)
