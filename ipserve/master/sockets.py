"""The sockets a slot's worker accepts on, one strategy per kind of router.

The master opens every listening socket itself and keeps a copy for as long
as the socket may be routed to: a worker that crashes or hangs leaves a port
that still queues its slot's connections for the replacement, instead of a
closed one that refuses them. The port a slot is routed to therefore always
comes from a socket the master opened (or, after a takeover, one whose inode
it recorded), never from what a worker says.

* NAT routers (nft, iptables, iptc): each worker gets a fresh listener on an
  ephemeral port; a generation switch rewrites the rules to the new ports.
  The public address:port itself is *reserved*: bound, never listened on,
  for the master's whole life, so no other program can take it, and a
  connection that reaches it while no rule is in place is refused at once
  (RST) rather than left hanging in a queue nobody accepts from.
* reuseport: slot i's socket is socket i of the SO_REUSEPORT group on the
  public port; every worker of the slot accepts on that same socket, so a
  switch is only a matter of who calls accept().
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
from typing import Sequence

from ipserve.config import Bind
from ipserve.errors import UsageError
from ipserve.routing.base import RouterUnavailable
from ipserve.routing.reuseport import ReuseportRouter, address_text, explain


@dataclasses.dataclass(eq=False)
class Listeners:
    """The listening sockets (one per bind family) of one slot's worker."""
    sockets: list[socket.socket]
    port: int
    inodes: tuple[int, ...]
    owned: bool          # False: they belong to the reuseport group, never closed here

    @classmethod
    def of(cls, sockets: list[socket.socket], owned: bool) -> "Listeners":
        return cls(sockets, sockets[0].getsockname()[1] if sockets else 0,
                   tuple(os.fstat(s.fileno()).st_ino for s in sockets), owned)

    def fds(self) -> list[int]:
        return [s.fileno() for s in self.sockets]

    def close(self) -> None:
        if self.owned:
            for sock in self.sockets:
                sock.close()
            self.sockets = []


def open_listeners(families: Sequence[int], backlog: int) -> list[socket.socket]:
    """Listen on the wildcard of every family, on one ephemeral port shared by all
    (a REDIRECT rewrites to the incoming interface's address, so bind the wildcard)."""
    for _ in range(50):
        sockets: list[socket.socket] = []
        port = 0
        try:
            for family in families:
                sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sockets.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
                port = sock.getsockname()[1]
                sock.listen(backlog)
            return sockets
        except OSError as exc:
            for sock in sockets:
                sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no port is free in every family")


def reserve(bind: Bind) -> socket.socket:
    """Bind the public address without listening and without SO_REUSEADDR:
    no other socket can bind a conflicting address while we hold it, and a
    connection that reaches it with no rule in place gets RST. Raises UsageError."""
    sock = socket.socket(bind.family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        if bind.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind.host, bind.port))
    except OSError as exc:
        sock.close()
        raise UsageError(explain(exc, bind)) from None
    return sock


def reservation_matches(sock: socket.socket, bind: Bind) -> bool:
    """A socket handed over by the previous master really reserves `bind`."""
    try:
        host, port = sock.getsockname()[:2]
        return (sock.family == bind.family and sock.type == socket.SOCK_STREAM
                and host == bind.host and port == bind.port
                and not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class NatSockets:
    """A fresh listener per worker; the public binds reserved for life."""

    shared = False
    resizable = True

    def __init__(self, binds: Sequence[Bind], backlog: int):
        self.binds = tuple(binds)
        self.families = sorted({b.family for b in binds})
        self.backlog = backlog
        self.reserved: list[socket.socket] = []

    def prepare(self, slots: int, handed_over: Sequence[socket.socket] = ()) -> None:
        """Reserve every public bind, taking the previous master's reservations
        when it handed them over. Raises UsageError if an address is in use or
        not local."""
        kept = []
        for bind in self.binds:
            match = next((s for s in handed_over if reservation_matches(s, bind) and s not in kept),
                         None)
            kept.append(match if match is not None else reserve(bind))
        for sock in handed_over:
            if sock not in kept:
                sock.close()
        self.reserved = kept

    def open(self, slot: int) -> Listeners:
        return Listeners.of(open_listeners(self.families, self.backlog), owned=True)

    def take_back(self, sockets: list[socket.socket], inodes: Sequence[int]) -> Listeners | None:
        """A worker of a previous master handed its listeners back: keep them
        only if they are the very sockets recorded (same inodes) and listen."""
        if not inodes or sorted(os.fstat(s.fileno()).st_ino for s in sockets) != sorted(inodes):
            return None
        if not all(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) for s in sockets):
            return None
        return Listeners.of(sockets, owned=True)

    def handover_sockets(self) -> list[socket.socket]:
        return list(self.reserved)

    def describe(self) -> list[dict]:
        return [{"reserved": str(b)} for b in self.binds if self.reserved]

    def close(self) -> None:
        for sock in self.reserved:
            sock.close()
        self.reserved = []


class ReuseportSockets:
    """Slot i accepts on socket i of the router's SO_REUSEPORT group."""

    shared = True
    resizable = False      # closing a socket of the group reshuffles the others

    def __init__(self, router: ReuseportRouter, backlog: int):
        self.router = router
        self.backlog = backlog

    def prepare(self, slots: int, handed_over: Sequence[socket.socket] = ()) -> None:
        for sock in handed_over:
            sock.close()
        if not self.router.prepared:
            self.router.prepare(slots, self.backlog)

    def open(self, slot: int) -> Listeners:
        return Listeners.of([group[slot] for group in self.router.groups], owned=False)

    def take_back(self, sockets: list[socket.socket], inodes: Sequence[int]) -> Listeners | None:
        """Copies of the group's sockets handed back by a previous master's
        worker; ours to close once the group is rebuilt from them."""
        if not inodes or sorted(os.fstat(s.fileno()).st_ino for s in sockets) != sorted(inodes):
            return None
        return Listeners.of(sockets, owned=True)

    def rebuild_group(self, by_slot: dict[int, Listeners]) -> None:
        """After a takeover the group lives on only in the workers: rebuild the
        router's group from one handed-back copy per slot. Every slot's is
        needed, in slot order. Raises RouterUnavailable."""
        if not by_slot or sorted(by_slot) != list(range(len(by_slot))):
            raise RouterUnavailable(f"the workers handed back the sockets of slots "
                                    f"{sorted(by_slot)} only; every slot's is needed")
        dups = [[os.dup(fd) for fd in by_slot[slot].fds()] for slot in range(len(by_slot))]
        try:
            self.router.adopt(dups)
        except BaseException:
            for fds in dups:
                for fd in fds:
                    os.close(fd)
            raise

    def handover_sockets(self) -> list[socket.socket]:
        return []

    def describe(self) -> list[dict]:
        return [{"slot": slot, "fd": sock.fileno(), "address": address_text(bind, self.router.port)}
                for bind, group in zip(self.router.binds, self.router.groups)
                for slot, sock in enumerate(group)]

    def close(self) -> None:
        self.router.close()


SlotSockets = NatSockets | ReuseportSockets


def for_router(router, binds: Sequence[Bind], backlog: int) -> SlotSockets:
    if isinstance(router, ReuseportRouter):
        return ReuseportSockets(router, backlog)
    return NatSockets(binds, backlog)
