"""The pure part of the iptc backend: which rules, which jumps, which bytes.

No root, no kernel, and python-iptables is not needed (the one test that
needs `import iptc` to fail runs in a child interpreter).
"""

import socket
import subprocess
import sys

import pytest

from ipserve.config import parse_bind
from ipserve.routing import iptc as iptc_backend
from ipserve.routing.iptc import (EXACT_JUMP, NOTE, HookRule, IptcRouter, Redirect,
                                  jump_plan, patch_entry, port_offsets, redirect_rules,
                                  removal_plan, tables_instantiated)

V4 = parse_bind("0.0.0.0:8000")
V4_HOST = parse_bind("198.18.0.1:8000")
V6 = parse_bind("[::]:8000")
V6_HOST = parse_bind("[fd00::1]:8000")


def test_one_rule_per_bind_and_slot_in_order():
    rules = redirect_rules([V4, V4_HOST], socket.AF_INET, {0: 40000, 1: 40001, 2: 40002, 3: 40003})
    assert [r.argv("IPS-web") for r in rules[:2]] == [
        ["-A", "IPS-web", "-p", "tcp", "-m", "tcp", "--dport", "8000",
         "-s", "0.0.0.0/0.0.0.3", "-j", "REDIRECT", "--to-ports", "40000"],
        ["-A", "IPS-web", "-p", "tcp", "-m", "tcp", "--dport", "8000",
         "-s", "0.0.0.1/0.0.0.3", "-j", "REDIRECT", "--to-ports", "40001"],
    ]
    assert len(rules) == 8
    assert [r.dst for r in rules] == [None] * 4 + ["198.18.0.1"] * 4
    assert [r.src for r in rules[4:]] == ["0.0.0.0", "0.0.0.1", "0.0.0.2", "0.0.0.3"]
    assert {r.src_mask for r in rules} == {"0.0.0.3"}


def test_same_rules_as_the_iptables_backend_renders():
    from ipserve.routing.iptables import render_chain
    table = {0: 40000, 1: 40001}
    text = render_chain("web", [V4, V4_HOST], socket.AF_INET, table, existing_jumps=[])
    chain_lines = [line for line in text.splitlines() if line.startswith("-A IPS-web ")]
    ours = [" ".join(r.argv("IPS-web")) for r in redirect_rules([V4, V4_HOST], socket.AF_INET, table)]

    def canon(line):          # same options, maybe in another order
        return sorted(line.replace(" -m tcp", "").split(" -")[1:])
    assert [canon(line) for line in chain_lines] == [canon(line) for line in ours]


def test_ipv6_rules_and_family_filter():
    table = {0: 40000, 1: 40001}
    rules = redirect_rules([V4, V6_HOST], socket.AF_INET6, table)
    assert [(r.src, r.src_mask, r.dst, r.dport, r.to_port) for r in rules] == [
        ("::", "::1", "fd00::1", 8000, 40000),
        ("::1", "::1", "fd00::1", 8000, 40001),
    ]
    assert redirect_rules([V6], socket.AF_INET, table) == []


def test_single_slot_matches_every_source():
    (rule,) = redirect_rules([V4], socket.AF_INET, {0: 40000})
    assert (rule.src, rule.src_mask) == ("0.0.0.0", "0.0.0.0")


def test_256_slots():
    rules = redirect_rules([V4], socket.AF_INET, {i: 20000 + i for i in range(256)})
    assert len(rules) == 256
    assert rules[255].src == "0.0.0.255" and rules[255].src_mask == "0.0.0.255"
    assert rules[255].to_port == 20255


def test_empty_table_gives_an_empty_chain():
    assert redirect_rules([V4], socket.AF_INET, {}) == []


@pytest.mark.parametrize("table, message", [
    ({0: 1, 1: 2, 2: 3}, "power of two"),
    ({0: 1, 2: 2}, "cover slots 0..1"),
    ({0: 70000}, "between 1 and 65535"),
    ({0: 0}, "between 1 and 65535"),
    ({0: "8000"}, "between 1 and 65535"),
])
def test_bad_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        redirect_rules([V4], socket.AF_INET, table)


# -------------------------------------------------------------- jumps

OTHER = HookRule(interfaces_any=False, matches=EXACT_JUMP.matches)   # -i eth0 ... -j IPS-x


def test_jump_added_when_missing():
    assert jump_plan([]) == (True, [])
    assert jump_plan([(3, OTHER)]) == (True, [])
    assert jump_plan([(0, None)]) == (True, [])          # unreadable: not ours


def test_jump_kept_once_and_duplicates_deleted_highest_first():
    assert jump_plan([(2, EXACT_JUMP)]) == (False, [])
    assert jump_plan([(1, EXACT_JUMP), (4, OTHER), (5, EXACT_JUMP), (7, EXACT_JUMP)]) == (False, [7, 5])


def test_exact_jump_means_nothing_but_addrtype_local():
    assert HookRule(matches=(("addrtype", (("dst-type", ("LOCAL",)),)),)) == EXACT_JUMP
    assert HookRule(goto=True, matches=EXACT_JUMP.matches) != EXACT_JUMP
    assert HookRule(protocol_any=False, matches=EXACT_JUMP.matches) != EXACT_JUMP
    assert HookRule(matches=(("addrtype", (("dst-type", ("UNICAST",)),)),)) != EXACT_JUMP
    assert HookRule() != EXACT_JUMP


def test_removal_deletes_every_jump_to_the_chain():
    assert removal_plan([(1, EXACT_JUMP), (4, OTHER), (6, None)]) == [6, 4, 1]
    assert removal_plan([]) == []


def test_tables_instantiated():
    assert tables_instantiated("nat\nfilter\n") == {"nat", "filter"}
    assert tables_instantiated("") == set()


# -------------------------------------------------------------- entry bytes

def test_port_offsets_finds_every_copy_of_the_port():
    base = bytes(8) + (0x1234).to_bytes(2, "big") + bytes(2) + (0x1234).to_bytes(2, "big")
    other = bytes(8) + (0x5678).to_bytes(2, "big") + bytes(2) + (0x5678).to_bytes(2, "big")
    assert port_offsets(base, other, 0x1234, 0x5678) == [8, 12]


def test_port_offsets_refuses_anything_else():
    base = bytes(4) + (0x1234).to_bytes(2, "big")
    assert port_offsets(base, base, 0x1234, 0x5678) is None                       # no difference
    assert port_offsets(base, b"\x01" + base[1:4] + (0x5678).to_bytes(2, "big"),
                        0x1234, 0x5678) is None                                   # extra byte differs
    assert port_offsets(base, bytes(4) + (0x5678).to_bytes(2, "little"),
                        0x1234, 0x5678) is None                                   # not big-endian
    assert port_offsets(base, base + b"\x00", 0x1234, 0x5678) is None             # other length
    assert port_offsets(base, base, 0x1234, 0x1278) is None                       # probe ports too alike


def test_patch_entry_sets_source_and_ports():
    template = bytes(16) + (0x1234).to_bytes(2, "big") + bytes(2)
    out = patch_entry(template, bytes([0, 0, 0, 7]), [16], 40007)
    assert out[:4] == bytes([0, 0, 0, 7])
    assert out[16:18] == (40007).to_bytes(2, "big")
    assert out[4:16] == template[4:16] and out[18:] == template[18:]
    assert len(out) == len(template)


# -------------------------------------------------------------- the router object

def test_describe_says_where_the_rules_are():
    router = IptcRouter("web", [V4])
    assert router.name == "iptc"
    assert router.describe() == {"router": "iptc", "chain": "IPS-web",
                                 "note": "rules visible to iptables-legacy only"}
    assert NOTE == "rules visible to iptables-legacy only"


def test_one_family_per_router():
    assert IptcRouter("web", [V4, V4_HOST])._family() == socket.AF_INET
    assert IptcRouter("web", [V6])._family() == socket.AF_INET6
    with pytest.raises(iptc_backend.RouterUnavailable, match="use router nft or iptables"):
        IptcRouter("web", [V4, V6])._family()


def test_redirect_dataclass_argv_with_destination():
    r = Redirect(socket.AF_INET6, "::1", "::3", "fd00::1", 443, 40001)
    assert r.argv("IPS-x") == ["-A", "IPS-x", "-p", "tcp", "-m", "tcp", "--dport", "443",
                               "-d", "fd00::1", "-s", "::1/::3", "-j", "REDIRECT",
                               "--to-ports", "40001"]


def _child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=__file__.rsplit("/tests/", 1)[0])


def test_module_imports_without_python_iptables_and_check_says_how_to_install():
    proc = _child(
        "import sys; sys.modules['iptc'] = None\n"       # as if not installed
        "from ipserve.config import parse_bind\n"
        "from ipserve.routing.iptc import IptcRouter\n"
        "from ipserve.routing.base import RouterUnavailable, RouteError\n"
        "r = IptcRouter('web', [parse_bind('0.0.0.0:8000')])\n"
        "try:\n"
        "    r.check()\n"
        "except RouterUnavailable as e:\n"
        "    print('check:', e)\n"
        "try:\n"
        "    r.apply({0: 40000})\n"
        "except RouteError as e:\n"
        "    print('apply:', e)\n"
        "assert 'iptc' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    assert proc.returncode == 0, proc.stderr
    assert "check: python-iptables is not installed: pip install 'ipserve[iptc]'" in proc.stdout
    assert "apply: iptc: python-iptables is not installed" in proc.stdout


def test_importing_the_backend_does_not_import_python_iptables():
    proc = _child("import sys, ipserve.routing.iptc; print('iptc' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
