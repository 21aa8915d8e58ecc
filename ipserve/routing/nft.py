"""nftables backend: one table of our own, one map `saddr & mask -> port`.

Every change rewrites the whole table in one `nft -f` transaction, so the
kernel never holds half a routing table, and a table left by a crashed run of
the same name is replaced by the first write.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Sequence

from ipserve.config import Bind
from ipserve.routing.base import (NET_ADMIN_HINT, RouteError, Router, RouterUnavailable,
                                  has_net_admin, need_tool)
from ipserve.routing.slots import mask

FAMILIES = {socket.AF_INET: ("ip", "ipv4_addr", ipaddress.IPv4Address),
            socket.AF_INET6: ("ip6", "ipv6_addr", ipaddress.IPv6Address)}


def table_name(instance: str) -> str:
    from ipserve.names import nft_table
    return nft_table(instance)


def render_remove(instance: str) -> str:
    # "add table" first so that "delete table" cannot fail when it is absent.
    out = []
    for fam, _, _ in FAMILIES.values():
        out += [f"table {fam} {table_name(instance)}", f"delete table {fam} {table_name(instance)}"]
    return "\n".join(out) + "\n"


# While draining (a graceful stop), no new connection is redirected, but the
# established ones must stay translated: a rule that uses conntrack keeps the
# kernel tracking (and un-NATing) them. With no such rule left in the network
# namespace, conntrack stops and every redirected connection is cut (measured).
DRAIN_RULE = "    ct state established accept"


def render_table(instance: str, binds: Sequence[Bind], table: dict[int, int] | None) -> str:
    """The nft script that replaces our tables with ones routing `table`
    (None: draining, routing nothing new)."""
    script = render_remove(instance)
    for family in sorted({b.family for b in binds}):
        fam, key_type, addr = FAMILIES[family]
        if table is None:
            rules_text, slot_map = DRAIN_RULE, ""
        else:
            slot_mask = mask(len(table))
            elements = ", ".join(f"{addr(slot)} : {port}" for slot, port in sorted(table.items()))
            slot_map = (f"  map slots {{\n    type {key_type} : inet_service\n"
                        f"    elements = {{ {elements} }}\n  }}\n")
            rules = []
            for b in binds:
                if b.family != family:
                    continue
                dst = "fib daddr type local" if b.is_wildcard else f"{fam} daddr {b.host}"
                rules.append(f"    {dst} tcp dport {b.port} redirect to :{fam} saddr & "
                             f"{addr(slot_mask)} map @slots")
            rules_text = "\n".join(rules)
        script += (
            f"table {fam} {table_name(instance)} {{\n"
            f"{slot_map}"
            # Remote clients arrive through prerouting; local clients connecting
            # to a local address go through output.
            f"  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n"
            f"{rules_text}\n  }}\n"
            f"  chain output {{\n    type nat hook output priority -100; policy accept;\n"
            f"{rules_text}\n  }}\n"
            f"}}\n"
        )
    return script


class NftRouter(Router):
    name = "nft"

    def check(self) -> None:
        self.nft = need_tool("nft", "nftables")
        if not has_net_admin():
            raise RouterUnavailable(NET_ADMIN_HINT)
        probe = self.run([self.nft, "list", "tables"])
        if probe.returncode != 0:
            raise RouterUnavailable(f"nft does not work here: {probe.stderr.strip()}")

    def _load(self, script: str) -> None:
        result = self.run([self.nft, "-f", "-"], input=script)
        if result.returncode != 0:
            raise RouteError(f"nft rejected the rules: {result.stderr.strip()}")

    def apply(self, table: dict[int, int]) -> None:
        self._load(render_table(self.instance, self.binds, table))

    def drain(self) -> None:
        self._load(render_table(self.instance, self.binds, None))

    def remove(self) -> None:
        self._load(render_remove(self.instance))

    def describe(self) -> dict:
        return {"router": self.name, "table": table_name(self.instance)}
