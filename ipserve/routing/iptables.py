"""iptables backend: a chain of our own in the nat table.

The chain is rewritten whole by one `iptables-restore --noflush` call (its
declaration flushes it), which is one atomic commit on legacy and nf_tables
iptables alike. Jumps to it from PREROUTING and OUTPUT are found by reading
`-S` output, never `-L`, whose format changes between versions.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Sequence

from ipserve.config import Bind
from ipserve.routing.base import (NET_ADMIN_HINT, RouteError, Router, RouterUnavailable,
                                  XTABLES_WAIT, has_net_admin, need_tool)
from ipserve.routing.slots import mask

TOOLS = {socket.AF_INET: ("iptables", ipaddress.IPv4Address),
         socket.AF_INET6: ("ip6tables", ipaddress.IPv6Address)}
HOOKS = ("PREROUTING", "OUTPUT")


def chain_name(instance: str) -> str:
    from ipserve.names import iptables_chain
    return iptables_chain(instance)


def jump_rule(hook: str, chain: str) -> str:
    return f"-A {hook} -m addrtype --dst-type LOCAL -j {chain}"


# Draining (a graceful stop): nothing new is redirected, and a rule that uses
# conntrack keeps established redirected connections translated (without any,
# the kernel stops tracking them and they are cut; see routing/nft.py).
DRAIN_RULE = "-m conntrack --ctstate ESTABLISHED -j RETURN"


def render_chain(instance: str, binds: Sequence[Bind], family: int, table: dict[int, int] | None,
                 existing_jumps: Sequence[str]) -> str:
    """iptables-restore input that rewrites our chain (table None: draining)
    and adds missing jumps."""
    chain = chain_name(instance)
    _, addr = TOOLS[family]
    lines = ["*nat", f":{chain} - [0:0]"]
    if table is None:
        lines.append(f"-A {chain} {DRAIN_RULE}")
    for b in binds if table is not None else ():
        if b.family != family:
            continue
        dst = "" if b.is_wildcard else f" -d {b.host}"
        slot_mask = addr(mask(len(table)))
        for slot, port in sorted(table.items()):
            lines.append(f"-A {chain} -p tcp -m tcp --dport {b.port}{dst} "
                         f"-s {addr(slot)}/{slot_mask} -j REDIRECT --to-ports {port}")
    for hook in HOOKS:
        if jump_rule(hook, chain) not in existing_jumps:
            lines.append(jump_rule(hook, chain))
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def jumps_in(listing: str, chain: str) -> list[str]:
    """Rules of `iptables -S` output that jump to `chain` from a built-in hook."""
    return [line.strip() for line in listing.splitlines()
            if line.startswith(("-A PREROUTING ", "-A OUTPUT ")) and line.rstrip().endswith(f"-j {chain}")]


def render_removal(chain: str, jumps: Sequence[str], chain_exists: bool) -> str:
    lines = ["*nat"]
    lines += ["-D" + rule[2:] for rule in jumps]
    if chain_exists:
        lines += [f"-F {chain}", f"-X {chain}"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class IptablesRouter(Router):
    name = "iptables"

    def check(self) -> None:
        self.tools = {}
        for family in self.families():
            tool, _ = TOOLS[family]
            self.tools[family] = (need_tool(tool, "iptables"), need_tool(tool + "-restore", "iptables"))
        if not has_net_admin():
            raise RouterUnavailable(NET_ADMIN_HINT)
        for family in self.families():
            probe = self.run([self.tools[family][0], "-t", "nat", "-S"])
            if probe.returncode != 0:
                raise RouterUnavailable(f"{TOOLS[family][0]} does not work here: {probe.stderr.strip()}")

    def _listing(self, family: int) -> str:
        result = self.run([self.tools[family][0], "-w", XTABLES_WAIT, "-t", "nat", "-S"])
        if result.returncode != 0:
            raise RouteError(f"{TOOLS[family][0]} -S failed: {result.stderr.strip()}")
        return result.stdout

    def _restore(self, family: int, text: str) -> None:
        result = self.run([self.tools[family][1], "-w", XTABLES_WAIT, "--noflush"], input=text)
        if result.returncode != 0:
            raise RouteError(f"{TOOLS[family][0]}-restore rejected the rules: {result.stderr.strip()}")

    def apply(self, table: dict[int, int] | None) -> None:
        chain = chain_name(self.instance)
        for family in self.families():
            jumps = jumps_in(self._listing(family), chain)
            self._restore(family, render_chain(self.instance, self.binds, family, table, jumps))

    def drain(self) -> None:
        # Only a chain of ours that exists: restoring into a nat table that
        # has none would create iptables' base chains where there were none.
        chain = chain_name(self.instance)
        for family in self.families():
            listing = self._listing(family)
            if f"-N {chain}" in listing.splitlines():
                self._restore(family, render_chain(self.instance, self.binds, family, None,
                                                   jumps_in(listing, chain)))

    def remove(self) -> None:
        chain = chain_name(self.instance)
        for family in TOOLS:
            if family not in getattr(self, "tools", {}):
                continue
            listing = self._listing(family)
            exists = f"-N {chain}" in listing.splitlines()
            jumps = jumps_in(listing, chain)
            if exists or jumps:
                self._restore(family, render_removal(chain, jumps, exists))

    def describe(self) -> dict:
        return {"router": self.name, "chain": chain_name(self.instance)}
