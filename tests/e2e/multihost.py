"""Several ipserve hosts behind an L4 balancer, in network namespaces (issue 11).

No pytest in here (like netns.py, whose helpers it builds on).

Topology (every name ends with the bed's tag)::

    client ns ips-cl-<tag>            balancer ns ips-lb-<tag>              host ns ips-h<i>-<tag>
      cl-<tag> 198.18.0.64..127 <-> lbc-<tag> 198.18.0.1
                                      lb<i>-<tag> 198.18.<i+1>.1  <->  h<i>-<tag> 198.18.<i+1>.2

Clients reach the virtual address VIP:8000 (198.19.0.80, assigned to no
interface: the client's route sends it to the balancer). The balancer DNATs
each new connection to a host chosen by ``jhash ip saddr`` (nftables), with
forwarding on and no SNAT, so the host sees the client's own address; each
host's default route goes back through the balancer, whose conntrack un-DNATs
the answers. The host's own ipserve then pins by the low bits of that address.
The 64 client addresses have low 6 bits 0..63: every slot of every host gets
some of them.

A host may run no server at all (then its clients are refused: a RST tells
which host the balancer chose without anything listening).

Everything is recorded in netns's registry (/run/ipserve-tests/<tag>.json),
so a killed run's namespaces are swept by the next one; close() removes the
processes, the namespaces (and with them every nft table in them) and the
temporary files, also after a failure.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import netns
from netns import IP, HarnessError, IpserveProcess

VIP = "198.19.0.80"
PORT = 8000
BALANCER_CLIENT_IP = "198.18.0.1"
FIRST_CLIENT_HOST = 64                 # 198.18.0.64 .. 198.18.0.127: low 6 bits 0..63
LB_TABLE = "scaleout_lb"
# An explicit seed: without one the kernel draws a random seed each time the
# rule is loaded, and every rewrite of the ruleset reshuffles every client.
DEFAULT_SEED = 0x1B5E_0011
APPS_DIR = os.path.join(netns.REPO_ROOT, "tests", "apps")

# probe.py for everything, bind_hold.py's /hold (a request the test releases).
APP_SOURCE = f"""\
import sys
sys.path.insert(0, {APPS_DIR!r})
import bind_hold
import probe


def application(environ, start_response):
    if environ.get("PATH_INFO") == "/hold":
        return bind_hold.application(environ, start_response)
    return probe.application(environ, start_response)
"""


# --------------------------------------------------------------------------- #
# Pure: the balancer's ruleset, and nftables' jhash as the kernel computes it
# --------------------------------------------------------------------------- #

def render_balancer(backends: Sequence[str], *, vip: str = VIP, port: int = PORT,
                    seed: int = DEFAULT_SEED) -> str:
    """The nft script that replaces the balancer's table with one sending a
    new connection to VIP:port to ``backends[jhash(saddr) mod len(backends)]``.

    One transaction (``nft -f``): the kernel never holds half a table.
    Established connections keep the DNAT conntrack recorded for them."""
    if not backends:
        raise ValueError("at least one backend")
    elements = ", ".join(f"{i} : {addr}" for i, addr in enumerate(backends))
    return (f"table ip {LB_TABLE}\n"
            f"delete table ip {LB_TABLE}\n"
            f"table ip {LB_TABLE} {{\n"
            f"  chain prerouting {{\n"
            f"    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {vip} tcp dport {port} "
            f"dnat to jhash ip saddr mod {len(backends)} seed {seed:#x} map {{ {elements} }}\n"
            f"  }}\n"
            f"}}\n")


def _rol32(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & 0xFFFFFFFF


def jhash_4bytes(data: bytes, seed: int) -> int:
    """Linux's jhash() (Bob Jenkins' lookup3) of a 4-byte key, as nft_jhash
    calls it for ``ip saddr``: the bytes in network order, read little-endian."""
    assert len(data) == 4
    a = b = c = (0xDEADBEEF + 4 + seed) & 0xFFFFFFFF
    a = (a + int.from_bytes(data, "little")) & 0xFFFFFFFF
    # __jhash_final(a, b, c): (x, y, z, k) is "x ^= y; x -= rol32(y, k)"
    v = {"a": a, "b": b, "c": c}
    for x, y, k in (("c", "b", 14), ("a", "c", 11), ("b", "a", 25), ("c", "b", 16),
                    ("a", "c", 4), ("b", "a", 14), ("c", "b", 24)):
        v[x] = ((v[x] ^ v[y]) - _rol32(v[y], k)) & 0xFFFFFFFF
    return v["c"]


def jhash_bucket(address: str, modulus: int, seed: int = DEFAULT_SEED) -> int:
    """The bucket ``jhash ip saddr mod <modulus> seed <seed>`` picks: nft_jhash
    scales the hash into [0, modulus) with reciprocal_scale (h * n >> 32), not
    with a remainder, so bucket k is the k-th slice of the hash range."""
    h = jhash_4bytes(ipaddress.IPv4Address(address).packed, seed)
    return (h * modulus) >> 32


# --------------------------------------------------------------------------- #
# The bed
# --------------------------------------------------------------------------- #

@dataclass
class Host:
    index: int
    label: str              # "A", "B", ...
    ns: str
    ip: str                 # the host's address: what the balancer DNATs to
    balancer_ip: str        # the balancer's end of the host's link: its default route
    dev: str
    balancer_dev: str


class _HostSeat:
    """What IpserveProcess needs of a Testbed: the namespace to start in and
    somewhere to record temporary paths."""

    def __init__(self, bed: ScaleOutBed, host: Host):
        self.server_ns = host.ns
        self.add_path = bed.add_path


class ScaleOutBed:
    """A client namespace with `n_addrs` addresses, a balancer namespace and
    `n_hosts` host namespaces (see the module docstring). close() is
    idempotent and also runs at interpreter exit."""

    __test__ = False

    def __init__(self, n_hosts: int = 2, n_addrs: int = 64):
        if not 1 <= n_hosts <= 8:
            raise ValueError("n_hosts must be 1..8")
        if not 1 <= n_addrs <= 64:
            raise ValueError("n_addrs must be 1..64")
        self.tag = netns.Testbed._claim_tag(None)
        t = self.tag
        self.client_ns = f"ips-cl-{t}"
        self.balancer_ns = f"ips-lb-{t}"
        self.client_dev, self.balancer_client_dev = f"cl-{t}", f"lbc-{t}"
        self.client_ips = [f"198.18.0.{FIRST_CLIENT_HOST + i}" for i in range(n_addrs)]
        self.hosts = [Host(index=i, label=chr(ord("A") + i), ns=f"ips-h{i}-{t}",
                           ip=f"198.18.{i + 1}.2", balancer_ip=f"198.18.{i + 1}.1",
                           dev=f"h{i}-{t}", balancer_dev=f"lb{i}-{t}")
                      for i in range(n_hosts)]
        self.namespaces = [self.client_ns, self.balancer_ns, *(h.ns for h in self.hosts)]
        self.servers: list[IpserveProcess] = []
        self._paths: list[str] = []
        self._created: list[str] = []
        self._closed = False
        self._lock = threading.Lock()
        self.workdir = tempfile.mkdtemp(prefix="ips-so-")
        self._paths.append(self.workdir)
        self.app_path = os.path.join(self.workdir, "scaleout_app.py")
        with open(self.app_path, "w") as f:
            f.write(APP_SOURCE)
        netns._LIVE.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    @property
    def app(self) -> str:
        return self.app_path + ":application"

    def host(self, label: str) -> Host:
        return next(h for h in self.hosts if h.label == label)

    def _record(self) -> None:
        netns._registry_write(self.tag, self.namespaces, self._paths)

    def add_path(self, path: str) -> None:
        self._paths.append(path)
        self._record()

    def _create(self) -> None:
        self._record()                       # before creating: a crash leaves a record
        for ns in self.namespaces:
            netns.sh([IP, "netns", "add", ns])
            self._created.append(ns)
        # Explicit ifindexes, different at the two ends (see Testbed._create).
        netns.sh([IP, "link", "add", self.balancer_client_dev, "index", "100",
                  "netns", self.balancer_ns, "type", "veth",
                  "peer", "name", self.client_dev, "index", "200", "netns", self.client_ns])
        lb_cmds = ["link set lo up",
                   f"addr add {BALANCER_CLIENT_IP}/24 dev {self.balancer_client_dev}",
                   f"link set {self.balancer_client_dev} up"]
        client_cmds = ["link set lo up"]
        client_cmds += [f"addr add {ip}/24 dev {self.client_dev}" for ip in self.client_ips]
        client_cmds += [f"link set {self.client_dev} up",
                        f"route add {VIP}/32 via {BALANCER_CLIENT_IP}"]
        netns.sh([IP, "-n", self.client_ns, "-batch", "-"], input="\n".join(client_cmds) + "\n")
        for h in self.hosts:
            netns.sh([IP, "link", "add", h.balancer_dev, "index", str(101 + h.index),
                      "netns", self.balancer_ns, "type", "veth",
                      "peer", "name", h.dev, "index", "200", "netns", h.ns])
            lb_cmds += [f"addr add {h.balancer_ip}/24 dev {h.balancer_dev}",
                        f"link set {h.balancer_dev} up"]
            # The way back to every client is through the balancer: its
            # conntrack must see the answers to undo the DNAT.
            host_cmds = ["link set lo up", f"addr add {h.ip}/24 dev {h.dev}",
                         f"link set {h.dev} up", f"route add default via {h.balancer_ip}"]
            netns.sh([IP, "-n", h.ns, "-batch", "-"], input="\n".join(host_cmds) + "\n")
        netns.sh([IP, "-n", self.balancer_ns, "-batch", "-"], input="\n".join(lb_cmds) + "\n")
        netns.call_in(self.balancer_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])

    # -- the balancer --
    def set_backends(self, backends: Sequence[str], seed: int = DEFAULT_SEED) -> str:
        """Replace the balancer's table (one nft transaction); returns the script."""
        script = render_balancer(backends, seed=seed)
        netns.call_in(self.balancer_ns, [_nft(), "-f", "-"], input=script)
        return script

    def balancer_ruleset(self) -> str:
        return netns.call_in(self.balancer_ns, [_nft(), "list", "ruleset"]).stdout

    def wait_paths(self, timeout: float = 10.0) -> None:
        """Until a SYN from the first client address through the balancer to
        each host in turn is answered (refused, before any server runs); then
        the balancer spreads over every host (mod len(hosts))."""
        for h in self.hosts:
            self.set_backends([h.ip])
            deadline = time.monotonic() + timeout
            while True:
                try:
                    netns.tcp_connect(self.client_ns, self.client_ips[0], VIP, PORT,
                                      timeout=0.5).close()
                    break                     # something listens: the path works too
                except ConnectionRefusedError:
                    break
                except OSError as exc:
                    if time.monotonic() > deadline:
                        raise HarnessError(f"no path {self.client_ips[0]} -> {VIP} -> "
                                           f"{h.ip}: {exc}") from None
        self.set_backends([h.ip for h in self.hosts])

    # -- servers --
    def start_ipserve(self, host: Host, args: Sequence[str], **kwargs) -> IpserveProcess:
        """The real ipserve command in `host`'s namespace (netns.IpserveProcess),
        killed with its workers by close()."""
        proc = netns.start_ipserve(_HostSeat(self, host), args, **kwargs)
        self.servers.append(proc)
        return proc

    # -- teardown --
    def close(self, grace: float = 0.5) -> None:
        """Kill every server and every process in every namespace, delete the
        namespaces (their nft tables go with them) and the temporary files.
        Tries every step; raises the first error at the end."""
        with self._lock, netns._deferred_interrupts():
            if self._closed:
                return
            errors: list[BaseException] = []
            for proc in reversed(self.servers):
                try:
                    proc.cleanup(grace=grace)
                except Exception as exc:        # noqa: BLE001
                    errors.append(exc)
            for ns in self._created:
                try:
                    netns.kill_ns_processes(ns, grace=grace)
                except Exception as exc:        # noqa: BLE001
                    errors.append(exc)
            if self.balancer_ns in self._created and netns.ns_exists(self.balancer_ns):
                # Explicitly, so the links go even if a stray socket keeps a
                # namespace object alive after its name is deleted.
                for dev in [self.balancer_client_dev, *(h.balancer_dev for h in self.hosts)]:
                    netns.call_in(None, [IP, "-n", self.balancer_ns, "link", "del", dev],
                                  check=False)
            for ns in self._created:
                try:
                    netns.delete_ns(ns)
                except Exception as exc:        # noqa: BLE001
                    errors.append(exc)
            for p in self._paths:
                shutil.rmtree(p, ignore_errors=True)
            if not errors:
                netns._registry_remove(self.tag)
                self._closed = True
                netns._LIVE.discard(self)
            if errors:
                raise errors[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ScaleOutBed {self.balancer_ns} hosts={[h.ns for h in self.hosts]}>"


def _nft() -> str:
    path = shutil.which("nft", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if not path:
        raise HarnessError("nft is not installed (apt-get install nftables)")
    return path
