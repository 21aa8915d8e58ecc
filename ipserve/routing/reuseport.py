"""reuseport backend: one SO_REUSEPORT socket per slot, chosen by a classic BPF program.

The master opens, for every bind, N listening sockets on the public address
with SO_REUSEPORT, calling listen() on them in slot order: the kernel numbers
the sockets of a reuseport group in the order they joined it (at listen()
for TCP). A classic BPF program attached to the group returns
`saddr & (N - 1)`, the index of the socket that gets the connection. A
worker receives its slot's socket (fd passing) and accepts on it; handing a
slot to a new worker is only a matter of who calls accept(). Nothing here
needs a privilege (unless the port is below ip_unprivileged_port_start).

Kernel facts this module relies on (net/core/sock_reuseport.c):
* The program runs with skb->data at the TCP *payload* (the kernel pulls the
  transport header first), so the source address is loaded at a negative
  offset from the network header: SKF_NET_OFF + 12 (IPv4), SKF_NET_OFF + 20
  (IPv6: the last 4 bytes of the 16-byte source at offset 8).
* A result >= the number of sockets in the group makes the kernel fall back
  to its hash: while the group is incomplete, clients are spread at random.
* When a socket leaves the group (its *last* file reference is closed, or
  shutdown() is called on it), the group's last socket takes its index: the
  slots reshuffle. So the master keeps every socket open for its whole life,
  workers get duplicates, and nobody calls shutdown() on a listener.
* Sockets of the same uid with SO_REUSEPORT on the same address join the
  group: before opening it, a probe bind without SO_REUSEPORT makes sure
  nothing else listens there, or our indexes would be shifted.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import socket
import struct
from typing import Sequence

from ipserve.config import Bind
from ipserve.routing.base import RouteError, Router, RouterUnavailable, Runner, run_command
from ipserve.routing.slots import mask

# <asm-generic/socket.h>; the same value on x86, arm and most other arches.
SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)

# <linux/filter.h>: negative load offsets relative to the network header.
SKF_NET_OFF = -0x100000

# Classic BPF opcodes (<linux/bpf_common.h>).
BPF_LD, BPF_ALU, BPF_RET = 0x00, 0x04, 0x06
BPF_W, BPF_ABS = 0x00, 0x20
BPF_AND, BPF_K, BPF_A = 0x50, 0x00, 0x10

# Offset of the low 32 bits of the source address from the network header.
SADDR_LOW32 = {socket.AF_INET: 12, socket.AF_INET6: 8 + 12}

# A group starts with room for 128 sockets and doubles while the size fits
# in a u16 (reuseport_grow): 32768 sockets at most.
MAX_GROUP = 32768

DEFAULT_BACKLOG = 2048
FD_HEADROOM = 64   # descriptors the master needs besides the listeners

Instruction = tuple[int, int, int, int]   # (code, jt, jf, k) as in struct sock_filter


# ---------------------------------------------------------------- pure parts

def bpf_program(family: int, slots: int) -> list[Instruction]:
    """The classic BPF program that returns `saddr & (slots - 1)`.

        ld  [SKF_NET_OFF + off]    ; A = low 32 bits of the source address
        and #slots-1               ; A &= mask
        ret a                      ; index of the socket in the group
    """
    if family not in SADDR_LOW32:
        raise ValueError(f"no reuseport program for address family {family}")
    k = (SKF_NET_OFF + SADDR_LOW32[family]) & 0xFFFFFFFF
    return [
        (BPF_LD | BPF_W | BPF_ABS, 0, 0, k),
        (BPF_ALU | BPF_AND | BPF_K, 0, 0, mask(slots)),
        (BPF_RET | BPF_A, 0, 0, 0),
    ]


def pack_filter(program: Sequence[Instruction]) -> bytes:
    """The program as an array of struct sock_filter {u16 code; u8 jt, jf; u32 k}."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in program)


def fds_needed(slots: int, binds: int) -> int:
    return slots * binds + FD_HEADROOM


def address_text(bind: Bind, port: int | None = None) -> str:
    port = bind.port if port is None else port
    return f"[{bind.host}]:{port}" if bind.family == socket.AF_INET6 else f"{bind.host}:{port}"


def unprivileged_port_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1024


def explain(exc: OSError, bind: Bind, port: int | None = None, slots: int | None = None) -> str:
    """One line for the user: what went wrong with `bind`, and what to do."""
    where = address_text(bind, port)
    code = exc.errno
    if code == errno.EACCES:
        start = unprivileged_port_start()
        return (f"cannot listen on {where}: port {port or bind.port} is privileged (below "
                f"{start}, net.ipv4.ip_unprivileged_port_start) and this process lacks "
                f"CAP_NET_BIND_SERVICE: use a port of {start} or above, or grant "
                f"CAP_NET_BIND_SERVICE (e.g. systemd AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    if code == errno.EADDRINUSE:
        return (f"address {where} is already in use (another server, or an ipserve still "
                f"running on it, is listening there): stop it or choose another port")
    if code == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: {bind.host} is not an address of this host; "
                f"use a local address or the wildcard {bind.wildcard}")
    if code == errno.EAFNOSUPPORT:
        return f"cannot listen on {where}: IPv6 is not available on this host"
    if code in (errno.EMFILE, errno.ENFILE):
        return (f"cannot open {slots} listening sockets on {where}: out of file descriptors "
                f"({exc.strerror}); raise the open-files limit (ulimit -n, systemd "
                f"LimitNOFILE=) or use fewer workers")
    if code == errno.ENOMEM:
        return (f"the kernel could not grow the reuseport group of {where} to {slots} sockets "
                f"(out of memory); use fewer workers")
    if code in (errno.ENOPROTOOPT, errno.EINVAL) and slots is not None:
        return (f"the kernel refused the reuseport BPF program on {where} ({exc.strerror}); "
                f"reuseport routing needs Linux 4.5 or later")
    return f"cannot listen on {where}: {exc.strerror or exc}"


def check_slot_count(slots: int, binds: int) -> None:
    """Raise RouterUnavailable if a group of `slots` sockets per bind cannot be held."""
    try:
        mask(slots)
    except ValueError as exc:
        raise RouterUnavailable(str(exc)) from None
    if slots > MAX_GROUP:
        raise RouterUnavailable(f"{slots} slots: a reuseport group holds at most "
                                f"{MAX_GROUP} sockets; use fewer workers")
    need = fds_needed(slots, binds)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        raise RouterUnavailable(
            f"{slots} slots on {binds} address(es) need about {need} open files, but the hard "
            f"limit is {hard}: raise it (ulimit -Hn, systemd LimitNOFILE=) or use fewer workers")


# ---------------------------------------------------------------- side effects

def attach_program(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """setsockopt(SO_ATTACH_REUSEPORT_CBPF, struct sock_fprog {len, filter *})."""
    raw = pack_filter(program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def probe(bind: Bind, port: int) -> None:
    """Bind (not listen) a plain socket: fails if anyone listens on the address,
    if the port is privileged, or if the address is not local. Raises OSError."""
    if port == 0:
        return
    sock = socket.socket(bind.family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR: TIME_WAIT leftovers do not count; listeners still do.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if bind.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((bind.host, port))
    finally:
        sock.close()


def ensure_fd_budget(need: int) -> None:
    """Raise the soft RLIMIT_NOFILE up to the hard limit if `need` descriptors
    would not fit (check_slot_count has made sure the hard limit allows it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 0
    if soft == resource.RLIM_INFINITY or soft >= need + in_use:
        return
    target = need + in_use if hard == resource.RLIM_INFINITY else min(hard, need + in_use)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        pass   # the EMFILE that may follow is explained by explain()


def open_group(bind: Bind, port: int, slots: int, backlog: int) -> list[socket.socket]:
    """N listening sockets on bind.host:port forming one reuseport group, the
    program attached; socket i has index i in the group. Raises OSError."""
    program = bpf_program(bind.family, slots)
    sockets: list[socket.socket] = []
    try:
        for slot in range(slots):
            sock = socket.socket(bind.family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if bind.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if slot == 0:
                # Attached before the group exists, the program is in force
                # from the first listen() on (as in the kernel's selftest).
                attach_program(sock, program)
            sock.bind((bind.host, port))
            port = sock.getsockname()[1]   # port 0: every socket takes the first one's
            sock.listen(backlog)
    except BaseException:
        # Highest index first: each close removes the group's last socket,
        # so nothing is reshuffled while we back out.
        for sock in reversed(sockets):
            sock.close()
        raise
    return sockets


class ReuseportRouter(Router):
    """Slot i of every bind is socket i of that bind's reuseport group.

    `check()` validates that the binds can be opened; `prepare(slots)` opens
    the groups (before the first worker is spawned); `listener_fds(slot)` are
    the sockets a slot's worker accepts on; `close()` at master exit.
    """

    name = "reuseport"

    def __init__(self, instance: str, binds: Sequence[Bind], runner: Runner = run_command, *,
                 slots: int | None = None, backlog: int = DEFAULT_BACKLOG, adopting: bool = False):
        super().__init__(instance, binds, runner)
        self.adopting = adopting   # a previous master's workers hold the group
        self.slots = slots
        self.backlog = backlog
        self.port: int | None = None
        self.groups: list[list[socket.socket]] = []   # one per bind, in bind order
        self.table: dict[int, int] = {}

    @property
    def prepared(self) -> bool:
        return bool(self.groups)

    # ------------------------------------------------------------ interface
    def check(self) -> None:
        if not self.binds:
            raise RouterUnavailable("reuseport needs at least one bind address")
        if self.slots is not None:
            check_slot_count(self.slots, len(self.binds))
        if self.prepared or self.adopting:
            return   # our own (or the adopted) group holds the port; the probe would fail
        for bind in self.binds:
            try:
                probe(bind, bind.port)
            except OSError as exc:
                raise RouterUnavailable(explain(exc, bind)) from None

    def prepare(self, slots: int | None = None, backlog: int | None = None) -> None:
        """Open every bind's group of `slots` sockets. Idempotent for the same
        slot count; the count cannot change while the group is open (removing
        a socket would reshuffle the others)."""
        slots = self.slots if slots is None else slots
        if slots is None:
            raise ValueError("prepare() needs the slot count")
        if self.prepared:
            if slots != self.slots:
                raise RouterUnavailable(
                    f"the reuseport group is open for {self.slots} slots; it cannot change to "
                    f"{slots} without restarting the master")
            return
        check_slot_count(slots, len(self.binds))
        self.slots = slots
        if backlog is not None:
            self.backlog = backlog
        ensure_fd_budget(fds_needed(slots, len(self.binds)))
        port = self.binds[0].port
        groups: list[list[socket.socket]] = []
        try:
            for bind in self.binds:
                try:
                    probe(bind, port)
                    group = open_group(bind, port, slots, self.backlog)
                except OSError as exc:
                    raise RouterUnavailable(explain(exc, bind, port or None, slots)) from None
                groups.append(group)
                port = group[0].getsockname()[1]
        except BaseException:
            for group in reversed(groups):
                for sock in reversed(group):
                    sock.close()
            raise
        self.groups = groups
        self.port = port

    def adopt(self, fds: Sequence[Sequence[int]]) -> None:
        """Take over a group opened by an earlier master: `fds[slot]` are the
        slot's sockets (one per bind, in bind order), e.g. received from the
        workers over SCM_RIGHTS. This router owns them afterwards. The slot
        order cannot be read back from the kernel: it is the caller's word."""
        if self.prepared:
            raise RouterUnavailable("the reuseport group is already open")
        slots = len(fds)
        check_slot_count(slots, len(self.binds))
        groups: list[list[socket.socket]] = [[] for _ in self.binds]
        try:
            for slot, slot_fds in enumerate(fds):
                if len(slot_fds) != len(self.binds):
                    raise RouterUnavailable(f"slot {slot}: {len(slot_fds)} sockets handed over, "
                                            f"{len(self.binds)} binds configured")
                for i, (bind, fd) in enumerate(zip(self.binds, slot_fds)):
                    sock = socket.socket(fileno=fd)
                    groups[i].append(sock)
                    host, port = sock.getsockname()[:2]
                    if (sock.family != bind.family or sock.type != socket.SOCK_STREAM
                            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                            or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
                            or host != bind.host or (bind.port and port != bind.port)):
                        raise RouterUnavailable(f"slot {slot}: handed-over fd {fd} is not a "
                                                f"reuseport listener on {address_text(bind)}")
            for bind, group in zip(self.binds, groups):
                attach_program(group[0], bpf_program(bind.family, slots))
        except OSError as exc:
            for group in groups:
                for sock in group:
                    sock.detach()
            raise RouterUnavailable(f"cannot adopt the handed-over sockets: {exc}") from None
        except BaseException:
            for group in groups:
                for sock in group:
                    sock.detach()   # not ours to close
            raise
        self.slots = slots
        self.groups = groups
        self.port = groups[0][0].getsockname()[1]

    def listener_fds(self, slot: int) -> list[int]:
        """The listening sockets (one per bind, in bind order) of `slot`."""
        if not self.prepared:
            raise RuntimeError("ReuseportRouter.prepare(slots) must run before workers are spawned")
        if not 0 <= slot < len(self.groups[0]):
            raise IndexError(f"slot {slot} out of range 0..{len(self.groups[0]) - 1}")
        return [group[slot].fileno() for group in self.groups]

    def apply(self, table: dict[int, int]) -> None:
        # A slot's connections go to whoever accepts on its socket, and wait
        # in its backlog while nobody does: there is nothing to write.
        if not self.prepared:
            raise RouteError("the reuseport group is not open (prepare(slots) was not called)")
        self.table = dict(table)

    def remove(self) -> None:
        # Closing sockets while the master lives would reshuffle the group.
        # close() does it, at master exit.
        self.table = {}

    def close(self) -> None:
        """Close every socket (highest slot first). Workers holding copies keep
        theirs working until they close them too."""
        for group in reversed(self.groups):
            for sock in reversed(group):
                sock.close()
        self.groups = []
        self.table = {}

    def describe(self) -> dict:
        sockets = []
        for bind, group in zip(self.binds, self.groups):
            for slot, sock in enumerate(group):
                sockets.append({"slot": slot, "fd": sock.fileno(),
                                "address": address_text(bind, self.port)})
        return {"router": self.name, "slots": self.slots, "sockets": sockets,
                "table": {str(slot): port for slot, port in sorted(self.table.items())}}
