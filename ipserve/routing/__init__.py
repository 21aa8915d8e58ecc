"""Routing backends behind one interface (see base.Router).

`choose()` picks and checks the backend named by the `router` setting; `auto`
tries nft, then iptables-restore, then python-iptables, and reports why each
one it passed over could not be used.
"""

from __future__ import annotations

from typing import Sequence

from ipserve.config import Bind
from ipserve.routing.base import RouteError, Router, RouterUnavailable

__all__ = ["RouteError", "Router", "RouterUnavailable", "backend_class", "choose"]

AUTO_ORDER = ("nft", "iptables", "iptc")


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
    raise ValueError(f"unknown router {kind!r}")


def choose(kind: str, instance: str, binds: Sequence[Bind]) -> tuple[Router, str]:
    """The checked backend and a sentence saying why it was chosen.

    Raises RouterUnavailable with the reasons if none can be used.
    """
    if kind != "auto":
        router = backend_class(kind)(instance, binds)
        router.check()
        return router, f"router {kind} (chosen by the router setting)"
    reasons = []
    for candidate in AUTO_ORDER:
        router = backend_class(candidate)(instance, binds)
        try:
            router.check()
        except RouterUnavailable as exc:
            reasons.append(f"{candidate}: {exc}")
            continue
        passed = f"; passed over {'; '.join(reasons)}" if reasons else ""
        return router, f"router {candidate} (auto: first that works here{passed})"
    raise RouterUnavailable("no routing backend works here: " + "; ".join(reasons))
