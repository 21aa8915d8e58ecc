"""Routing backends behind one interface (see base.Router).

`choose()` picks and checks the backend named by the `router` setting; `auto`
tries nft, then iptables-restore, then python-iptables, then reuseport, and
reports why each one it passed over could not be used. A process without
CAP_NET_ADMIN cannot use any NAT backend: there `auto` goes straight to
reuseport, which needs no privilege.
"""

from __future__ import annotations

from typing import Sequence

from ipserve.config import Bind
from ipserve.routing import base
from ipserve.routing.base import RouteError, Router, RouterUnavailable

__all__ = ["RouteError", "Router", "RouterUnavailable", "backend_class", "choose", "make"]

AUTO_ORDER = ("nft", "iptables", "iptc")   # the NAT backends (ipservectl cleanup walks these)
AUTO_FALLBACK = "reuseport"                # no kernel rules, no privilege


def backend_class(kind: str) -> type[Router]:
    if kind == "nft":
        from ipserve.routing.nft import NftRouter
        return NftRouter
    if kind == "iptables":
        from ipserve.routing.iptables import IptablesRouter
        return IptablesRouter
    if kind == "iptc":
        from ipserve.routing.iptc import IptcRouter
        return IptcRouter
    if kind == "reuseport":
        from ipserve.routing.reuseport import ReuseportRouter
        return ReuseportRouter
    raise ValueError(f"unknown router {kind!r}")


def make(kind: str, instance: str, binds: Sequence[Bind], slots: int | None = None,
         adopting: bool = False) -> Router:
    """An unchecked backend; reuseport is told the slot count when it is known,
    and whether a previous master's workers still hold its sockets."""
    cls = backend_class(kind)
    if kind == "reuseport":
        return cls(instance, binds, slots=slots, adopting=adopting)
    return cls(instance, binds)


def choose(kind: str, instance: str, binds: Sequence[Bind],
           slots: int | None = None, adopting: bool = False) -> tuple[Router, str]:
    """The checked backend and a sentence saying why it was chosen.

    Raises RouterUnavailable with the reasons if none can be used.
    """
    if kind != "auto":
        router = make(kind, instance, binds, slots, adopting)
        router.check()
        return router, f"router {kind} (chosen by the router setting)"
    if not base.has_net_admin():
        router = make(AUTO_FALLBACK, instance, binds, slots, adopting)
        try:
            router.check()
        except RouterUnavailable as exc:
            raise RouterUnavailable(
                f"no routing backend works here: {', '.join(AUTO_ORDER)}: no CAP_NET_ADMIN "
                f"({base.NET_ADMIN_HINT}); {AUTO_FALLBACK}: {exc}") from None
        return router, (f"router {AUTO_FALLBACK} (auto: no CAP_NET_ADMIN, so no NAT backend "
                        f"can run; {AUTO_FALLBACK} needs no privilege)")
    reasons = []
    for candidate in (*AUTO_ORDER, AUTO_FALLBACK):
        router = make(candidate, instance, binds, slots, adopting)
        try:
            router.check()
        except RouterUnavailable as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        passed = f"; passed over {'; '.join(reasons)}" if reasons else ""
        return router, f"router {candidate} (auto: first that works here{passed})"
    raise RouterUnavailable("no routing backend works here: " + "; ".join(reasons))
