import socket

import pytest

from ipserve.config import parse_bind
from ipserve.routing import iptables, nft
from ipserve.routing.slots import mask, slot_of

V4 = parse_bind("0.0.0.0:8000")
V6 = parse_bind("[::]:8000")
HOST = parse_bind("198.18.0.1:80")


def test_slot_math():
    assert mask(8) == 7
    assert slot_of("198.18.0.21", 4) == 1
    assert slot_of("fd00::1f", 16) == 15
    assert slot_of("10.0.0.7", 1) == 0
    with pytest.raises(ValueError):
        mask(6)


def test_nft_table_v4_and_v6():
    script = nft.render_table("web", [V4, V6], {0: 40000, 1: 40001})
    # The old tables are replaced in the same transaction.
    assert script.startswith("table ip ipserve_web\ndelete table ip ipserve_web\n")
    assert "delete table ip6 ipserve_web" in script
    assert "elements = { 0.0.0.0 : 40000, 0.0.0.1 : 40001 }" in script
    assert "elements = { :: : 40000, ::1 : 40001 }" in script
    assert "fib daddr type local tcp dport 8000 redirect to :ip saddr & 0.0.0.1 map @slots" in script
    assert "redirect to :ip6 saddr & ::1 map @slots" in script
    assert script.count("type nat hook prerouting") == 2 and script.count("type nat hook output") == 2


def test_nft_specific_host_matches_daddr():
    script = nft.render_table("web", [HOST], {0: 1, 1: 2, 2: 3, 3: 4})
    assert "ip daddr 198.18.0.1 tcp dport 80 redirect to :ip saddr & 0.0.0.3 map @slots" in script
    assert "table ip6 ipserve_web {" not in script


def test_nft_table_name_is_one_to_one():
    # '-' and '.' are kept: web-1, web.1 and web_1 are three tables, not one.
    assert nft.table_name("ipserve-8000") == "ipserve_ipserve-8000"
    assert len({nft.table_name(n) for n in ("web-1", "web.1", "web_1")}) == 3
    assert "table ip ipserve_web.1 {" in nft.render_table("web.1", [V4], {0: 1})
    with pytest.raises(ValueError):
        nft.table_name("x;delete table inet mine")
    with pytest.raises(ValueError):
        iptables.chain_name("../x")


def test_iptables_chain_and_jumps():
    text = iptables.render_chain("web", [V4], socket.AF_INET, {0: 40000, 1: 40001}, existing_jumps=[])
    lines = text.splitlines()
    assert lines[:2] == ["*nat", ":IPS-web - [0:0]"]
    assert "-A IPS-web -p tcp -m tcp --dport 8000 -s 0.0.0.1/0.0.0.1 -j REDIRECT --to-ports 40001" in lines
    assert "-A PREROUTING -m addrtype --dst-type LOCAL -j IPS-web" in lines
    assert "-A OUTPUT -m addrtype --dst-type LOCAL -j IPS-web" in lines
    assert lines[-1] == "COMMIT"


def test_iptables_existing_jumps_are_not_duplicated():
    jumps = [iptables.jump_rule(h, "IPS-web") for h in iptables.HOOKS]
    text = iptables.render_chain("web", [V4], socket.AF_INET, {0: 1}, existing_jumps=jumps)
    assert "PREROUTING" not in text and "OUTPUT" not in text


def test_iptables_v6_uses_v6_masks():
    text = iptables.render_chain("web", [V4, V6], socket.AF_INET6, {0: 5, 1: 6, 2: 7, 3: 8}, [])
    assert "-s ::3/::3 -j REDIRECT --to-ports 8" in text
    assert "0.0.0." not in text


def test_iptables_jumps_read_from_S_output():
    listing = ("-P PREROUTING ACCEPT\n-N IPS-web\n"
               "-A PREROUTING -m addrtype --dst-type LOCAL -j IPS-web\n"
               "-A OUTPUT -j IPS-webby\n"
               "-A IPS-web -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 1\n")
    assert iptables.jumps_in(listing, "IPS-web") == ["-A PREROUTING -m addrtype --dst-type LOCAL -j IPS-web"]
    removal = iptables.render_removal("IPS-web", iptables.jumps_in(listing, "IPS-web"), True)
    assert removal.splitlines() == ["*nat", "-D PREROUTING -m addrtype --dst-type LOCAL -j IPS-web",
                                    "-F IPS-web", "-X IPS-web", "COMMIT"]
