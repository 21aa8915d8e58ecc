"""iptc backend: our own chain in the *legacy* nat table, through python-iptables.

python-iptables (`import iptc`) drives libiptc in-process: it reads the whole
legacy nat table into a handle, edits the handle, and writes the table back
with one setsockopt(IPT_SO_SET_REPLACE), which the kernel swaps in atomically.
So every `apply()` is one batch: refresh the handle (python-iptables'
replace_rule() skips final_check(), and a handle kept across batches goes
stale), flush and refill chain IPS-<instance>, add the jumps from PREROUTING
and OUTPUT that are missing, commit once. Any failure before the commit throws
the handle away and the kernel keeps the previous rules.

Legacy tables only. On a host whose `iptables` is the nf_tables variant
(Debian 11+, Ubuntu 21.04+, RHEL 8+) these rules live in the kernel's legacy
x_tables and are visible with `iptables-legacy -t nat -S` (IPv6:
`ip6tables-legacy`), NOT with `iptables -S` / `nft list ruleset`, which only
print a warning that legacy tables are present. Both kinds of nat table work
side by side (verified on Linux 6.18: a legacy REDIRECT takes effect next to
an nft nat table in the same namespace). Kernels built without
CONFIG_IP_NF_IPTABLES_LEGACY / CONFIG_IP_NF_NAT cannot run this backend;
check() says so.

One address family per process: libxtables registers the REDIRECT target
(libxt_NAT.so) only for the family that loads it first, and python-iptables
cannot load it again for the other family (re-running the extension's init
makes libxtables exit() the whole process with "already registered";
ldx/python-iptables#316, #325). So this backend serves IPv4-only or
IPv6-only binds; check() refuses mixed binds and points to nft / iptables.

python-iptables writes without iptables' /run/xtables.lock; we take that lock
around each batch so `iptables-legacy -w` and we never interleave.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import ipaddress
import os
import socket
import threading
import time
from typing import Any, Iterator, Sequence

from ipserve.config import Bind
from ipserve.routing.base import (NET_ADMIN_HINT, RouteError, Router, RouterUnavailable,
                                  has_net_admin)
from ipserve.routing.iptables import HOOKS, chain_name
from ipserve.routing.slots import mask

NOTE = "rules visible to iptables-legacy only"
INSTALL_HINT = ("python-iptables is not installed: pip install 'ipserve[iptc]' "
                "(it builds a small C helper, so it needs gcc)")
LIBS_HINT = ("install libip4tc2, libip6tc2 and libxtables12 (Debian/Ubuntu: apt-get install "
             "iptables); if the extensions directory is unusual, set XTABLES_LIBDIR")
MIXED_HINT = ("router iptc serves one address family per process (libxtables registers "
              "the REDIRECT target for the first family that loads it; see "
              "ldx/python-iptables#316): use router nft or iptables for binds of both "
              "IPv4 and IPv6")
LOCK_TIMEOUT = 10.0

_FAMILY_NAMES = {socket.AF_INET: "IPv4", socket.AF_INET6: "IPv6"}
_ADDR = {socket.AF_INET: ipaddress.IPv4Address, socket.AF_INET6: ipaddress.IPv6Address}
_LEGACY_TOOL = {socket.AF_INET: "iptables-legacy", socket.AF_INET6: "ip6tables-legacy"}
_TABLES_NAMES = {socket.AF_INET: "/proc/net/ip_tables_names",
                 socket.AF_INET6: "/proc/net/ip6_tables_names"}

# python-iptables keeps process-wide state (one cached handle per table, the
# current xtables family): one batch at a time.
_lock = threading.Lock()


# ------------------------------------------------------------------ pure part

@dataclasses.dataclass(frozen=True)
class Redirect:
    """One rule of our chain:
    -p tcp -m tcp --dport DPORT [-d DST] -s SRC/SRC_MASK -j REDIRECT --to-ports TO_PORT
    """
    family: int
    src: str
    src_mask: str
    dst: str | None      # None: any local address (wildcard bind)
    dport: int
    to_port: int

    def argv(self, chain: str) -> list[str]:
        """The same rule as iptables arguments (for messages and humans)."""
        dst = ["-d", self.dst] if self.dst else []
        return ["-A", chain, "-p", "tcp", "-m", "tcp", "--dport", str(self.dport), *dst,
                "-s", f"{self.src}/{self.src_mask}", "-j", "REDIRECT",
                "--to-ports", str(self.to_port)]


def redirect_rules(binds: Sequence[Bind], family: int, table: dict[int, int]) -> list[Redirect]:
    """Our chain's rules for `family`: one per (bind, slot), binds in order, slots ascending.

    `table` maps every slot 0..n-1 (n a power of two) to a port; {} gives an
    empty chain (no worker ready: nothing to redirect to). Raises ValueError
    for a table that is not a whole slot table or has a port out of range.
    """
    if not table:
        return []
    addr = _ADDR[family]
    slot_mask = addr(mask(len(table)))
    if sorted(table) != list(range(len(table))):
        raise ValueError(f"route table must cover slots 0..{len(table) - 1}, "
                         f"got {sorted(table)}")
    for slot, port in table.items():
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"slot {slot}: port {port!r} is not between 1 and 65535")
    rules = []
    for b in binds:
        if b.family != family:
            continue
        dst = None if b.is_wildcard else b.host
        for slot, port in sorted(table.items()):
            rules.append(Redirect(family, str(addr(slot)), str(slot_mask), dst, b.port, port))
    return rules


@dataclasses.dataclass(frozen=True)
class HookRule:
    """What matters about a rule of PREROUTING/OUTPUT that targets our chain."""
    goto: bool = False
    src_any: bool = True              # no -s
    dst_any: bool = True              # no -d
    protocol_any: bool = True         # no -p
    interfaces_any: bool = True       # no -i / -o
    matches: tuple = ()               # ((name, ((param, (values...)), ...)), ...)


EXACT_JUMP = HookRule(matches=(("addrtype", (("dst-type", ("LOCAL",)),)),))


def jump_plan(hook_rules: Sequence[tuple[int, HookRule | None]]) -> tuple[bool, list[int]]:
    """Given the rules of one hook that jump to our chain, as (position,
    description or None if unreadable), decide: whether to append our jump
    (-m addrtype --dst-type LOCAL -j CHAIN), and which positions to delete
    (exact copies beyond the first). Other jumps to our chain are left alone,
    as the iptables backend does. Positions to delete come highest first.
    """
    exact = [pos for pos, rule in hook_rules if rule == EXACT_JUMP]
    return (not exact, sorted(exact[1:], reverse=True))


def removal_plan(hook_rules: Sequence[tuple[int, HookRule | None]]) -> list[int]:
    """Every rule of a hook that jumps to our chain goes; highest position first."""
    return sorted((pos for pos, _ in hook_rules), reverse=True)


def tables_instantiated(names_text: str) -> set[str]:
    """Parse /proc/net/ip_tables_names (one table name per line)."""
    return {line.strip() for line in names_text.splitlines() if line.strip()}


# Building a rule through python-iptables costs ~0.6 ms (extension lookup,
# option parsing, final_check() re-parsing its own output), so 256 slots took
# ~150-250 ms. The rules of one bind differ only in the source address, which
# sits at a fixed place (the first field of ipt_entry / ip6t_entry, uapi), and
# in the REDIRECT port, whose place we find by building the rule twice with
# different ports and diffing the bytes. Each template is verified against a
# third rule built by the library; if anything differs we build every rule
# through the library instead.
PROBE_PORTS = (0x1234, 0x5678, 0x9ABC)


def port_offsets(first: bytes, second: bytes, port1: int, port2: int) -> list[int] | None:
    """Offsets where `first` holds port1 and `second` port2 (big-endian u16),
    if that is the only difference between the two; None otherwise.

    Both bytes of port1 must differ from those of port2, so that every port
    field shows up whole in the diff.
    """
    if len(first) != len(second) or port1 >> 8 == port2 >> 8 or port1 & 255 == port2 & 255:
        return None
    p1, p2 = port1.to_bytes(2, "big"), port2.to_bytes(2, "big")
    offsets: list[int] = []
    for i in range(len(first)):
        if first[i] == second[i] or (offsets and i == offsets[-1] + 1):
            continue
        if first[i:i + 2] != p1 or second[i:i + 2] != p2:
            return None
        offsets.append(i)
    return offsets or None


def patch_entry(template: bytes, src: bytes, offsets: Sequence[int], port: int) -> bytes:
    """`template` with the source address (first field of the entry) and the
    port fields replaced."""
    buf = bytearray(template)
    buf[:len(src)] = src
    for i in offsets:
        buf[i:i + 2] = port.to_bytes(2, "big")
    return bytes(buf)


# ------------------------------------------------------------------ side effects

def _import_iptc() -> Any:
    """`import iptc`, turning its failures into RouterUnavailable."""
    try:
        import iptc  # noqa: PLC0415 (optional dependency, loaded on demand)
        import iptc.xtables  # noqa: F401,PLC0415
    except ModuleNotFoundError as exc:
        if exc.name == "iptc":
            raise RouterUnavailable(INSTALL_HINT) from None
        raise RouterUnavailable(f"python-iptables cannot be imported ({exc}); "
                                f"reinstall it: pip install --force-reinstall "
                                f"'ipserve[iptc]'") from None
    except Exception as exc:  # noqa: BLE001 - ctypes reports missing libraries in many ways
        raise RouterUnavailable(f"python-iptables is installed but cannot load the iptables "
                                f"libraries ({type(exc).__name__}: {exc}): {LIBS_HINT}") from None
    return iptc


@contextlib.contextmanager
def _xtables_lock(timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold iptables' own lock (what `iptables-legacy -w` waits for), if we can open it."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        yield                       # no lock file to share: nobody else can wait on it
        return
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise RouteError(f"cannot lock {path}: {exc}") from None
                if time.monotonic() >= deadline:
                    raise RouteError(f"another iptables process has held {path} for "
                                     f"{timeout:g}s") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)                # releases the flock


class IptcRouter(Router):
    name = "iptc"

    # -- helpers --------------------------------------------------------

    def _family(self) -> int:
        families = self.families()
        if len(families) != 1:
            raise RouterUnavailable(MIXED_HINT if families else "router iptc: no binds")
        return families[0]

    def _table(self, iptc: Any, family: int) -> Any:
        """The nat table handle, re-read from the kernel, in batch mode."""
        cls = iptc.Table if family == socket.AF_INET else iptc.Table6
        table = cls("nat", autocommit=False)   # cached per process; freshly read if new
        table.autocommit = False
        table.refresh()                          # autocommit off: frees, never commits
        return table

    def _new_rule(self, iptc: Any, family: int) -> Any:
        return iptc.Rule() if family == socket.AF_INET else iptc.Rule6()

    def _build_redirect(self, iptc: Any, spec: Redirect) -> Any:
        rule = self._new_rule(iptc, spec.family)
        rule.protocol = "tcp"
        rule.src = f"{spec.src}/{spec.src_mask}"
        if spec.dst:
            rule.dst = spec.dst
        match = rule.create_match("tcp")
        match.dport = str(spec.dport)
        target = rule.create_target("REDIRECT")
        target.to_ports = str(spec.to_port)
        return rule

    def _checked_bytes(self, iptc: Any, spec: Redirect) -> bytes:
        rule = self._build_redirect(iptc, spec)
        rule.final_check()
        return bytes(rule.rule)

    def _redirect_entries(self, iptc: Any, specs: Sequence[Redirect]) -> list[Any]:
        """Final-checked ipt_entry buffers for `specs` (see PROBE_PORTS)."""
        import ctypes  # noqa: PLC0415

        out: list[bytes] = []
        templates: dict[tuple, tuple[bytes, list[int]] | None] = {}
        for spec in specs:
            shape = (spec.family, spec.src_mask, spec.dst, spec.dport)
            if shape not in templates:
                templates[shape] = self._template(iptc, spec)
            template = templates[shape]
            if template is None:
                out.append(self._checked_bytes(iptc, spec))
            else:
                src = ipaddress.ip_address(spec.src).packed
                out.append(patch_entry(template[0], src, template[1], spec.to_port))
        return [(ctypes.c_ubyte * len(b)).from_buffer_copy(b) for b in out]

    def _template(self, iptc: Any, spec: Redirect) -> tuple[bytes, list[int]] | None:
        p1, p2, p3 = PROBE_PORTS
        first = self._checked_bytes(iptc, dataclasses.replace(spec, to_port=p1))
        second = self._checked_bytes(iptc, dataclasses.replace(spec, to_port=p2))
        offsets = port_offsets(first, second, p1, p2)
        if offsets is None:
            return None
        # Verify on a rule with another source address and port.
        probe = dataclasses.replace(spec, src=spec.src_mask, to_port=p3)
        src = ipaddress.ip_address(probe.src).packed
        if patch_entry(first, src, offsets, p3) != self._checked_bytes(iptc, probe):
            return None
        return first, offsets

    def _build_jump(self, iptc: Any, family: int, chain: str) -> Any:
        rule = self._new_rule(iptc, family)
        match = rule.create_match("addrtype")
        match.dst_type = "LOCAL"
        # Target "" (the standard target) renamed to the chain: libiptc turns a
        # standard target named after a chain into a jump. create_target(chain)
        # would make python-iptables open every table (filter, mangle, raw,
        # security) to find out whether `chain` is a chain.
        target = rule.create_target("")
        target.standard_target = chain
        return rule

    @staticmethod
    def _describe(iptc: Any, family: int, table: Any, hook: str, entry: Any) -> HookRule | None:
        try:
            rule = table.create_rule(entry, iptc.Chain(table, hook))
            zero = "0.0.0.0/0.0.0.0" if family == socket.AF_INET else "::/::"
            matches = tuple(
                (m.name, tuple(sorted((k, tuple(v) if isinstance(v, list) else (v,))
                                      for k, v in m.get_all_parameters().items())))
                for m in rule.matches)
            return HookRule(goto=bool(rule.target.goto),
                            src_any=rule.src in (zero, "0.0.0.0/0", "::/0"),
                            dst_any=rule.dst in (zero, "0.0.0.0/0", "::/0"),
                            protocol_any=rule.protocol in ("ip", "all", "0", ""),
                            interfaces_any=not rule.in_interface and not rule.out_interface,
                            matches=matches)
        except Exception:  # noqa: BLE001 - an extension we cannot parse: not ours
            return None

    @staticmethod
    def _jumps_to(iptc: Any, family: int, table: Any, hook: str, chain: str
                  ) -> list[tuple[int, HookRule | None]]:
        found = []
        entry = table.first_rule(hook)
        pos = 0
        while entry:
            target = table.get_target(entry)
            if target is not None and target.decode(errors="replace") == chain:
                found.append((pos, IptcRouter._describe(iptc, family, table, hook, entry)))
            entry = table.next_rule(entry)
            pos += 1
        return found

    @staticmethod
    def _delete_at(table: Any, hook: str, position: int) -> None:
        # python-iptables binds iptc_delete_num_entry but does not wrap it.
        if table._iptc.iptc_delete_num_entry(hook.encode(), position, table._handle) != 1:
            raise RouteError(f"cannot delete rule {position + 1} of {hook}: {table.strerror()}")

    def _discard(self, table: Any) -> None:
        with contextlib.suppress(Exception):
            table.refresh()       # autocommit is off: the pending batch is dropped

    # -- Router ---------------------------------------------------------

    def check(self) -> None:
        iptc = _import_iptc()
        family = self._family()
        if not has_net_admin():
            raise RouterUnavailable(NET_ADMIN_HINT)
        tool = _LEGACY_TOOL[family]
        with _lock:
            try:
                self._table(iptc, family)
            except Exception as exc:  # noqa: BLE001
                raise RouterUnavailable(
                    f"the kernel's legacy {_FAMILY_NAMES[family]} nat table cannot be opened "
                    f"({exc}): this kernel needs CONFIG_IP{'6' if family == socket.AF_INET6 else ''}"
                    f"_NF_IPTABLES_LEGACY and the nat table (try `{tool} -t nat -S`); "
                    f"use router nft otherwise") from None
            try:
                zero = str(_ADDR[family](0))
                self._build_redirect(iptc, Redirect(family, zero, zero, None, 1, 1)).final_check()
                self._build_jump(iptc, family, chain_name(self.instance)).final_check()
            except Exception as exc:  # noqa: BLE001
                hint = (f"the xtables extensions libxt_tcp, libxt_NAT (REDIRECT) and "
                        f"libxt_addrtype must be installed ({LIBS_HINT}); a REDIRECT that "
                        f"is installed but not found means this process already loaded it "
                        f"for the other address family: {MIXED_HINT}")
                raise RouterUnavailable(f"python-iptables cannot build the {_FAMILY_NAMES[family]} "
                                        f"rules ({exc}): {hint}") from None

    def apply(self, table: dict[int, int]) -> None:
        try:
            specs = redirect_rules(self.binds, self._family(), table)
        except (RouterUnavailable, ValueError) as exc:
            raise RouteError(f"iptc: {exc}") from None
        self._rewrite(lambda iptc, family: self._redirect_entries(iptc, specs))

    def drain(self) -> None:
        # Nothing new is redirected; a conntrack rule keeps the established
        # redirected connections translated (see routing/iptables.py).
        self._rewrite(lambda iptc, family: [self._drain_entry(iptc, family)])

    def _drain_entry(self, iptc: Any, family: int) -> Any:
        import ctypes  # noqa: PLC0415

        rule = self._new_rule(iptc, family)
        match = rule.create_match("conntrack")
        match.ctstate = "ESTABLISHED"
        rule.create_target("RETURN")
        rule.final_check()
        raw = bytes(rule.rule)
        return (ctypes.c_ubyte * len(raw)).from_buffer_copy(raw)

    def _rewrite(self, build_entries) -> None:
        """Chain IPS-<instance> holds exactly the entries `build_entries`
        makes, with one jump from each hook: one commit, or nothing changes."""
        chain = chain_name(self.instance)
        try:
            iptc = _import_iptc()
            family = self._family()
        except (RouterUnavailable, ValueError) as exc:
            raise RouteError(f"iptc: {exc}") from None
        with _lock:
            # Build every rule before touching the table: an extension that
            # rejects a value fails here.
            try:
                entries = build_entries(iptc, family)
                jump = self._build_jump(iptc, family, chain)
            except Exception as exc:  # noqa: BLE001
                raise RouteError(f"iptc: cannot build the rules of chain {chain}, previous "
                                 f"rules kept: {type(exc).__name__}: {exc}") from None
            with _xtables_lock():
                try:
                    nat = self._table(iptc, family)
                except Exception as exc:  # noqa: BLE001
                    raise RouteError(f"iptc: cannot read the legacy nat table: {exc}") from None
                try:
                    if nat.is_chain(chain):
                        nat.flush_entries(chain)
                    else:
                        nat.create_chain(chain)
                    for entry in entries:
                        nat.append_entry(chain, entry)
                    for hook in HOOKS:
                        append, delete = jump_plan(self._jumps_to(iptc, family, nat, hook, chain))
                        for pos in delete:
                            self._delete_at(nat, hook, pos)
                        if append:
                            iptc.Chain(nat, hook).append_rule(jump)
                    nat.commit()
                except Exception as exc:  # noqa: BLE001
                    self._discard(nat)
                    if isinstance(exc, RouteError):
                        raise
                    raise RouteError(f"iptc: rewriting chain {chain} failed, previous rules "
                                     f"kept: {type(exc).__name__}: {exc}") from None

    def remove(self) -> None:
        chain = chain_name(self.instance)
        try:
            iptc = _import_iptc()
        except RouterUnavailable as exc:
            raise RouteError(f"iptc: cannot remove chain {chain}: {exc}") from None
        for family in self.families():
            if not self._legacy_nat_loaded(family):
                continue          # no legacy nat table here: nothing of ours, create none
            with _lock, _xtables_lock():
                try:
                    nat = self._table(iptc, family)
                except Exception as exc:  # noqa: BLE001
                    raise RouteError(f"iptc: cannot read the legacy nat table: {exc}") from None
                try:
                    changed = False
                    for hook in HOOKS:
                        for pos in removal_plan(self._jumps_to(iptc, family, nat, hook, chain)):
                            self._delete_at(nat, hook, pos)
                            changed = True
                    if nat.is_chain(chain):
                        nat.flush_entries(chain)
                        nat.delete_chain(chain)
                        changed = True
                    if changed:
                        nat.commit()
                except Exception as exc:  # noqa: BLE001
                    self._discard(nat)
                    if isinstance(exc, RouteError):
                        raise
                    raise RouteError(f"iptc: removing chain {chain} failed: "
                                     f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _legacy_nat_loaded(family: int) -> bool:
        try:
            with open(_TABLES_NAMES[family]) as fh:
                return "nat" in tables_instantiated(fh.read())
        except OSError:
            return True           # cannot tell: look (this may instantiate the table)

    def describe(self) -> dict:
        return {"router": self.name, "chain": chain_name(self.instance), "note": NOTE}
