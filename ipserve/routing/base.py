"""What every routing backend offers the master."""

from __future__ import annotations

import os
import subprocess
from typing import Callable, Sequence

from ipserve import children
from ipserve.config import Bind
from ipserve.privileges import SYSTEM_DIRS, system_tool

TOOL_TIMEOUT = 10.0      # a rule write that takes longer fails (and is retried)
XTABLES_WAIT = "5"       # seconds iptables may wait for the xtables lock


class RouterUnavailable(Exception):
    """This backend cannot run here; the message says what is missing."""


class RouteError(Exception):
    """A rule write failed; the kernel still holds the previous routes."""


# Injected so rule logic can be exercised without root; production passes
# run_command.
Runner = Callable[..., subprocess.CompletedProcess]


def run_command(argv: Sequence[str], input: str | None = None) -> subprocess.CompletedProcess:
    # Bounded, so a tool stuck on a lock fails the write (kept routes, retried)
    # instead of holding the route writer for ever; registered, so the master
    # reaping orphans as PID 1 never steals its exit status.
    return children.run(list(argv), input=input, timeout=TOOL_TIMEOUT)


def has_net_admin() -> bool:
    """True if this process holds CAP_NET_ADMIN (bit 12) in its effective set."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 12))
    except OSError:
        pass
    return os.geteuid() == 0


NET_ADMIN_HINT = (
    "NAT routing needs CAP_NET_ADMIN: run ipserve as root, or grant the capability "
    "(e.g. systemd AmbientCapabilities=CAP_NET_ADMIN, or docker --cap-add NET_ADMIN)"
)


def need_tool(tool: str, package: str) -> str:
    """The tool from a root-owned system directory, never from $PATH: whoever
    sets the master's environment must not choose what runs as root."""
    path = system_tool(tool)
    if path is None:
        raise RouterUnavailable(f"{tool} is not installed in {', '.join(SYSTEM_DIRS)} "
                                f"(Debian/Ubuntu: apt-get install {package})")
    return path


class Router:
    """A backend that pins every client to a slot's worker.

    `apply(table)` makes the kernel route slot -> port for every slot in
    `table` (whose length is the slot count), atomically: on failure it raises
    RouteError and the previous routes stay in force. `remove()` deletes the
    backend's own table or chain and nothing else; it is idempotent.
    """

    name = "?"

    def __init__(self, instance: str, binds: Sequence[Bind], runner: Runner = run_command):
        self.instance = instance
        self.binds = tuple(binds)
        self.run = runner

    def check(self) -> None:
        """Raise RouterUnavailable if this backend cannot work here."""

    def apply(self, table: dict[int, int]) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Route no new connection, but keep established ones translated (a
        graceful stop: the workers finish what they hold). Atomic like apply."""

    def remove(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the backend holds, at master exit."""

    def describe(self) -> dict:
        return {"router": self.name}

    def families(self) -> list[int]:
        return sorted({b.family for b in self.binds})
