"""The reuseport backend without a kernel: its BPF program, its messages, auto selection."""

import errno
import ipaddress
import random
import socket
import struct

import pytest

from ipserve import config, routing
from ipserve.config import Bind, parse_bind
from ipserve.routing import reuseport
from ipserve.routing.reuseport import SKF_NET_OFF, ReuseportRouter, bpf_program, pack_filter
from ipserve.routing.slots import slot_of

SLOT_COUNTS = [1, 2, 4, 8, 16, 256, 1024]

LD_W_ABS = 0x20    # BPF_LD | BPF_W | BPF_ABS
AND_K = 0x54       # BPF_ALU | BPF_AND | BPF_K
RET_A = 0x16       # BPF_RET | BPF_A


def signed(k: int) -> int:
    return struct.unpack("=i", struct.pack("=I", k))[0]


# ---------------------------------------------------------------- the program

@pytest.mark.parametrize("slots", SLOT_COUNTS)
def test_ipv4_program(slots):
    prog = bpf_program(socket.AF_INET, slots)
    assert len(prog) == 3
    # A = 32 bits at network header + 12: the IPv4 source address.
    assert prog[0] == (LD_W_ABS, 0, 0, 0xFFF0000C)
    assert signed(prog[0][3]) == SKF_NET_OFF + 12 == -0x100000 + 12
    assert prog[1] == (AND_K, 0, 0, slots - 1)
    assert prog[2] == (RET_A, 0, 0, 0)


@pytest.mark.parametrize("slots", SLOT_COUNTS)
def test_ipv6_program(slots):
    prog = bpf_program(socket.AF_INET6, slots)
    assert len(prog) == 3
    # A = 32 bits at network header + 8 + 12: the last 4 bytes of the source.
    assert prog[0] == (LD_W_ABS, 0, 0, 0xFFF00014)
    assert signed(prog[0][3]) == SKF_NET_OFF + 20
    assert prog[1] == (AND_K, 0, 0, slots - 1)
    assert prog[2] == (RET_A, 0, 0, 0)


@pytest.mark.parametrize("slots", [0, 3, 6, 12, -4])
def test_program_needs_a_power_of_two(slots):
    with pytest.raises(ValueError):
        bpf_program(socket.AF_INET, slots)


def test_program_needs_an_ip_family():
    with pytest.raises(ValueError):
        bpf_program(socket.AF_UNIX, 4)


def test_packed_layout_is_struct_sock_filter():
    raw = pack_filter(bpf_program(socket.AF_INET, 8))
    assert len(raw) == 3 * 8
    assert struct.unpack("=HBBI", raw[0:8]) == (0x20, 0, 0, 0xFFF0000C)
    assert struct.unpack("=HBBI", raw[8:16]) == (0x54, 0, 0, 7)
    assert struct.unpack("=HBBI", raw[16:24]) == (0x16, 0, 0, 0)


# A classic-BPF interpreter for the three instructions used, over a packet as
# the reuseport hook sees it: negative offsets from SKF_NET_OFF address the
# network header; non-negative ones the TCP payload.

def run_cbpf(prog, network_header: bytes, payload: bytes = b"") -> int:
    a = 0
    for code, jt, jf, k in prog:
        if code == LD_W_ABS:
            off = signed(k)
            if off >= 0:
                data = payload[off:off + 4]
            else:
                assert off >= SKF_NET_OFF, "only SKF_NET_OFF-relative loads are modelled"
                data = network_header[off - SKF_NET_OFF:off - SKF_NET_OFF + 4]
            if len(data) < 4:
                return 0   # out of bounds: the kernel aborts the program with 0
            a = struct.unpack("!I", data)[0]
        elif code == AND_K:
            a &= k
        elif code == RET_A:
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program fell off its end")


def ipv4_header(src: str, dst: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 1, 0x4000, 64, socket.IPPROTO_TCP, 0,
                       socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst))


def ipv6_header(src: str, dst: str) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, 20, socket.IPPROTO_TCP, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))


@pytest.mark.parametrize("slots", SLOT_COUNTS)
def test_program_picks_the_slot_of_the_source_address(slots):
    rng = random.Random(slots)
    v4 = bpf_program(socket.AF_INET, slots)
    v6 = bpf_program(socket.AF_INET6, slots)
    for _ in range(200):
        src4 = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        # The destination differs in every low bit: a load at the wrong offset shows.
        dst4 = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address(src4)) ^ 0xFFFFFFFF))
        assert run_cbpf(v4, ipv4_header(src4, dst4), b"GET / HTTP/1.1") == slot_of(src4, slots)
        src6 = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        dst6 = str(ipaddress.IPv6Address(int(ipaddress.IPv6Address(src6)) ^ (2**128 - 1)))
        assert run_cbpf(v6, ipv6_header(src6, dst6)) == slot_of(src6, slots)


# ---------------------------------------------------------------- messages, limits

V4 = parse_bind("0.0.0.0:8000")
LOW = parse_bind("0.0.0.0:80")
V6 = parse_bind("[::]:8000")


def test_privileged_port_message(monkeypatch):
    monkeypatch.setattr(reuseport, "unprivileged_port_start", lambda: 1024)
    msg = reuseport.explain(OSError(errno.EACCES, "Permission denied"), LOW)
    assert "\n" not in msg
    assert "0.0.0.0:80" in msg
    assert "use a port of 1024 or above, or grant CAP_NET_BIND_SERVICE" in msg


def test_address_in_use_names_the_address():
    msg = reuseport.explain(OSError(errno.EADDRINUSE, "Address already in use"), V6)
    assert "\n" not in msg and "[::]:8000" in msg and "in use" in msg


def test_foreign_address_and_fd_exhaustion_messages():
    msg = reuseport.explain(OSError(errno.EADDRNOTAVAIL, "x"), parse_bind("192.0.2.7:8000"))
    assert "192.0.2.7 is not an address of this host" in msg
    msg = reuseport.explain(OSError(errno.EMFILE, "Too many open files"), V4, slots=1024)
    assert "1024 listening sockets" in msg and "ulimit -n" in msg


def test_slot_count_limits(monkeypatch):
    with pytest.raises(routing.RouterUnavailable, match="power of two"):
        reuseport.check_slot_count(6, 1)
    with pytest.raises(routing.RouterUnavailable, match="at most 32768"):
        reuseport.check_slot_count(65536, 1)
    monkeypatch.setattr(reuseport.resource, "getrlimit", lambda which: (1024, 1024))
    reuseport.check_slot_count(512, 1)
    with pytest.raises(routing.RouterUnavailable, match="hard limit is 1024") as info:
        reuseport.check_slot_count(512, 2)
    assert "\n" not in str(info.value)


def test_before_prepare():
    router = ReuseportRouter("t", [V4], slots=4)
    with pytest.raises(RuntimeError, match="prepare"):
        router.listener_fds(0)[0]
    with pytest.raises(routing.RouteError):
        router.apply({0: 8000})
    router.remove()   # idempotent, closes nothing
    assert router.describe() == {"router": "reuseport", "slots": 4, "sockets": [], "table": {}}


# ---------------------------------------------------------------- selection

# Port 0 is never probed: check() then touches no socket.
NOWHERE = Bind("127.0.0.1", 0, socket.AF_INET)


def test_reuseport_is_a_router_setting():
    assert "reuseport" in config.ROUTERS
    assert routing.backend_class("reuseport") is ReuseportRouter


def test_auto_without_net_admin_chooses_reuseport(monkeypatch):
    monkeypatch.setattr(routing.base, "has_net_admin", lambda: False)
    router, why = routing.choose("auto", "t", [NOWHERE], slots=8)
    assert isinstance(router, ReuseportRouter)
    assert router.slots == 8
    assert "no CAP_NET_ADMIN" in why


def test_auto_without_net_admin_reports_both_reasons(monkeypatch):
    monkeypatch.setattr(routing.base, "has_net_admin", lambda: False)
    with pytest.raises(routing.RouterUnavailable) as info:
        routing.choose("auto", "t", [NOWHERE], slots=6)
    assert "no CAP_NET_ADMIN" in str(info.value) and "reuseport: " in str(info.value)


def test_auto_with_net_admin_falls_back_to_reuseport(monkeypatch):
    monkeypatch.setattr(routing.base, "has_net_admin", lambda: True)

    class Unavailable(routing.Router):
        def check(self):
            raise routing.RouterUnavailable("not here")

    real = routing.backend_class
    monkeypatch.setattr(routing, "backend_class",
                        lambda kind: real(kind) if kind == "reuseport" else Unavailable)
    router, why = routing.choose("auto", "t", [NOWHERE])
    assert isinstance(router, ReuseportRouter)
    assert "passed over nft: not here; iptables: not here; iptc: not here" in why
