"""IptcRouter against the real kernel, inside throwaway network namespaces.

Every test gets its own namespace (created here, always deleted), and every
rule write and every `iptables-legacy` read runs inside it through
`ip netns exec`, in a child interpreter: the host's own tables are never
touched (a module fixture checks that the host's list of legacy tables is
the same after the tests as before). A child interpreter per run also keeps
python-iptables' process-wide state (cached table handles, the libxtables
family) from leaking between tests.

python-iptables writes the *legacy* x_tables; on this host `iptables` is the
nf_tables variant, so rules are read back with `iptables-legacy -S`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import NEEDS_ROOT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IP = shutil.which("ip") or "/usr/sbin/ip"
SBIN = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return NEEDS_ROOT
    if importlib.util.find_spec("iptc") is None:
        return "python-iptables is not installed (pip install 'ipserve[iptc]')"
    for tool in ("ip", "iptables-legacy", "ip6tables-legacy"):
        if shutil.which(tool, path=SBIN) is None:
            return f"{tool} is not installed (apt-get install iptables iproute2)"
    if not os.path.exists("/proc/net/ip_tables_names"):
        return "this kernel has no legacy iptables (CONFIG_IP_NF_IPTABLES_LEGACY)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")

POLICIES = ["-P PREROUTING ACCEPT", "-P INPUT ACCEPT", "-P OUTPUT ACCEPT",
            "-P POSTROUTING ACCEPT"]


def jumps(chain: str) -> list[str]:
    return [f"-A PREROUTING -m addrtype --dst-type LOCAL -j {chain}",
            f"-A OUTPUT -m addrtype --dst-type LOCAL -j {chain}"]


# ------------------------------------------------------------------ namespace

def _host_legacy_tables() -> tuple[str, str]:
    def read(path: str) -> str:
        try:
            with open(path) as fh:
                return fh.read()
        except OSError:
            return "(unreadable)"
    return read("/proc/net/ip_tables_names"), read("/proc/net/ip6_tables_names")


@pytest.fixture(scope="module", autouse=True)
def host_tables_untouched():
    before = _host_legacy_tables()
    yield
    assert _host_legacy_tables() == before, "a test instantiated a legacy table on the host"


@pytest.fixture
def ns():
    name = f"ipsiptc-{secrets.token_hex(4)}"
    subprocess.run([IP, "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run([IP, "netns", "exec", name, IP, "link", "set", "lo", "up"],
                       check=True, capture_output=True)
        yield name
    finally:
        subprocess.run([IP, "netns", "del", name], capture_output=True)
        assert not os.path.exists(f"/run/netns/{name}"), f"namespace {name} left behind"


def in_ns(ns: str, argv: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, PATH=SBIN)
    proc = subprocess.run([IP, "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} in {ns} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def listing(ns: str, six: bool = False) -> list[str]:
    tool = "ip6tables-legacy" if six else "iptables-legacy"
    return in_ns(ns, [tool, "-w", "-t", "nat", "-S"]).stdout.splitlines()


def legacy_tables_in(ns: str) -> str:
    return in_ns(ns, ["cat", "/proc/net/ip_tables_names", "/proc/net/ip6_tables_names"]).stdout


# ------------------------------------------------------------------ driver

DRIVER = textwrap.dedent("""
    import json, sys, time
    from ipserve.config import parse_bind
    from ipserve.routing.base import RouteError, RouterUnavailable
    from ipserve.routing.iptc import IptcRouter
    out = []
    for instance, binds, op, arg in json.loads(sys.argv[1]):
        router = IptcRouter(instance, [parse_bind(b) for b in binds])
        t0 = time.perf_counter()
        try:
            if op == "apply":
                router.apply({int(k): v for k, v in arg.items()})
            else:
                getattr(router, op)()
            out.append({"op": op, "ok": True, "ms": (time.perf_counter() - t0) * 1000})
        except (RouteError, RouterUnavailable) as exc:
            out.append({"op": op, "ok": False, "error": type(exc).__name__, "message": str(exc)})
    print(json.dumps(out))
""")


def run_ops(ns: str, *ops, prefix: list[str] = ()) -> list[dict]:
    """Run (instance, binds, op, arg) steps with one IptcRouter each, in one child."""
    proc = in_ns(ns, [*prefix, sys.executable, "-c", DRIVER, json.dumps(ops)])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ok(results: list[dict]) -> list[dict]:
    bad = [r for r in results if not r["ok"]]
    assert not bad, bad
    return results


V4 = ["0.0.0.0:8000", "127.0.0.1:8000"]
T1 = {0: 9000, 1: 9001}
T2 = {0: 9101, 1: 9100}


def chain_v4(chain: str, table: dict[int, int]) -> list[str]:
    rules = []
    for dst in ("", " -d 127.0.0.1/32"):
        for slot, port in sorted(table.items()):
            rules.append(f"-A {chain} -s 0.0.0.{slot}/0.0.0.1{dst} -p tcp -m tcp --dport 8000 "
                         f"-j REDIRECT --to-ports {port}")
    return rules


# ------------------------------------------------------------------ tests

def test_check_passes_and_apply_writes_exactly_our_chain_and_two_jumps(ns):
    ok(run_ops(ns, ("web", V4, "check", None), ("web", V4, "apply", T1)))
    assert listing(ns) == POLICIES + ["-N IPS-web"] + jumps("IPS-web") + [
        "-A IPS-web -s 0.0.0.0/0.0.0.1 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9000",
        "-A IPS-web -s 0.0.0.1/0.0.0.1 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9001",
        "-A IPS-web -s 0.0.0.0/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 8000 "
        "-j REDIRECT --to-ports 9000",
        "-A IPS-web -s 0.0.0.1/0.0.0.1 -d 127.0.0.1/32 -p tcp -m tcp --dport 8000 "
        "-j REDIRECT --to-ports 9001",
    ]
    # Only the nat table was opened: python-iptables did not instantiate the
    # legacy filter/mangle/raw/security tables in the namespace.
    assert legacy_tables_in(ns).split() == ["nat"]


def test_applying_again_rewrites_the_chain_and_never_duplicates_jumps(ns):
    ok(run_ops(ns, ("web", V4, "apply", T1), ("web", V4, "apply", T2)))
    ok(run_ops(ns, ("web", V4, "apply", T2)))                 # a new process, same state
    assert listing(ns) == POLICIES + ["-N IPS-web"] + jumps("IPS-web") + chain_v4("IPS-web", T2)


def test_two_instances_keep_their_own_chains(ns):
    ok(run_ops(ns, ("a", V4, "apply", T1), ("b", V4, "apply", T2), ("a", V4, "remove", None)))
    assert listing(ns) == POLICIES + ["-N IPS-b"] + jumps("IPS-b") + chain_v4("IPS-b", T2)


def test_duplicate_jumps_collapse_and_foreign_jumps_stay_until_remove(ns):
    ok(run_ops(ns, ("web", V4, "apply", T1)))
    in_ns(ns, ["iptables-legacy", "-w", "-t", "nat", "-A", "PREROUTING", "-m", "addrtype",
               "--dst-type", "LOCAL", "-j", "IPS-web"])
    in_ns(ns, ["iptables-legacy", "-w", "-t", "nat", "-I", "OUTPUT", "1", "-m", "addrtype",
               "--dst-type", "LOCAL", "-j", "IPS-web"])
    in_ns(ns, ["iptables-legacy", "-w", "-t", "nat", "-A", "OUTPUT", "-o", "lo", "-j", "IPS-web"])
    ok(run_ops(ns, ("web", V4, "apply", T2)))
    assert listing(ns) == POLICIES + ["-N IPS-web"] + jumps("IPS-web") + [
        "-A OUTPUT -o lo -j IPS-web"] + chain_v4("IPS-web", T2)
    ok(run_ops(ns, ("web", V4, "remove", None)))
    assert listing(ns) == POLICIES


def test_remove_leaves_nothing_and_is_idempotent(ns):
    ok(run_ops(ns, ("web", V4, "remove", None)))              # nothing there yet
    assert legacy_tables_in(ns).split() == [], "remove() must not create the legacy nat table"
    ok(run_ops(ns, ("web", V4, "apply", T1), ("web", V4, "remove", None),
               ("web", V4, "remove", None)))
    assert listing(ns) == POLICIES
    ok(run_ops(ns, ("web", V4, "remove", None)))
    assert listing(ns) == POLICIES


def test_a_failed_apply_keeps_the_previous_rules(ns):
    ok(run_ops(ns, ("web", V4, "apply", T1)))
    before = listing(ns)
    results = run_ops(ns, ("web", V4, "apply", {0: 70000, 1: 9001}),   # port out of range
                      ("web", V4, "apply", {0: 1, 1: 2, 2: 3}))        # not a power of two
    assert [r["error"] for r in results] == ["RouteError"] * 2, results
    assert listing(ns) == before


def test_256_slots(ns, record_property):
    table = {i: 20000 + i for i in range(256)}
    runs = ok(run_ops(ns, *[("big", ["0.0.0.0:8000"], "apply", table)] * 6,
                      ("big", ["0.0.0.0:8000"], "remove", None)))
    ms = [round(r["ms"], 1) for r in runs[:-1]]
    record_property("apply_256_ms", ms)
    print(f"\napply() of 256 slots: {ms} ms; remove(): {runs[-1]['ms']:.1f} ms")
    assert max(ms) < 2000
    ok(run_ops(ns, ("big", ["0.0.0.0:8000"], "apply", table)))
    expected = [f"-A IPS-big -s 0.0.0.{s}/0.0.0.255 -p tcp -m tcp --dport 8000 "
                f"-j REDIRECT --to-ports {20000 + s}" for s in range(256)]
    assert listing(ns) == POLICIES + ["-N IPS-big"] + jumps("IPS-big") + expected


BYTES_CHECK = textwrap.dedent("""
    import socket, sys
    from ipserve.config import parse_bind
    from ipserve.routing.iptc import IptcRouter, redirect_rules, _import_iptc
    binds = [parse_bind(b) for b in sys.argv[1:]]
    family = binds[0].family
    iptc = _import_iptc()
    router = IptcRouter("web", binds)
    for slots in (1, 2, 16, 256):
        table = {s: 30000 + 7 * s for s in range(slots)}
        specs = redirect_rules(binds, family, table)
        assert router._template(iptc, specs[0]) is not None, "template path not taken"
        fast = [bytes(e) for e in router._redirect_entries(iptc, specs)]
        slow = [router._checked_bytes(iptc, s) for s in specs[:40] + specs[-3:]]
        assert fast[:40] + fast[-3:] == slow, slots
    print("same")
""")


@pytest.mark.parametrize("binds", [["0.0.0.0:8000", "198.18.0.1:8000"],
                                   ["[::]:8000", "[fd00::1]:8000"]], ids=["ipv4", "ipv6"])
def test_patched_entries_equal_what_python_iptables_builds(ns, binds):
    assert in_ns(ns, [sys.executable, "-c", BYTES_CHECK, *binds]).stdout.strip() == "same"


TRAFFIC = textwrap.dedent("""
    import json, socket, subprocess, sys
    from ipserve.config import parse_bind
    from ipserve.routing.iptc import IptcRouter
    bind, sources, dst = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    six = ":" in dst
    fam = socket.AF_INET6 if six else socket.AF_INET
    listeners = {}
    for port in (9000, 9001):
        s = socket.socket(fam)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::" if six else "0.0.0.0", port)); s.listen(16); s.settimeout(3)
        listeners[port] = s

    def land(src, port=8000):
        c = socket.socket(fam); c.settimeout(3); c.bind((src, 0))
        try:
            c.connect((dst, port))
        except OSError as exc:
            return type(exc).__name__
        for p, s in listeners.items():
            s.setblocking(False)
            try:
                a, peer = s.accept()
            except BlockingIOError:
                continue
            a.close(); c.close()
            return p
        return "nowhere"

    router = IptcRouter("web", [parse_bind(bind)])
    out = {}
    router.check()
    router.apply({0: 9000, 1: 9001})
    out["first"] = [land(s) for s in sources]
    router.apply({0: 9001, 1: 9000})
    out["swapped"] = [land(s) for s in sources]
    if len(sys.argv) > 4:
        out["nft"] = land(sources[0], int(sys.argv[4]))
    router.remove()
    out["removed"] = [land(s) for s in sources]
    print(json.dumps(out))
""")


@pytest.mark.parametrize("with_nft_nat", [False, True], ids=["legacy-only", "beside-nft-nat"])
def test_connections_land_on_their_slots_port(ns, with_nft_nat):
    """The legacy REDIRECT takes effect on this kernel, also next to an nft nat table."""
    extra = []
    if with_nft_nat:
        if shutil.which("nft", path=SBIN) is None:
            pytest.skip("nft is not installed")
        in_ns(ns, ["nft", "-f", "-"], input=textwrap.dedent("""
            table ip ipstest {
                chain out { type nat hook output priority -100; tcp dport 7999 redirect to :9000; }
            }
        """))
        extra = ["7999"]
    proc = in_ns(ns, [sys.executable, "-c", TRAFFIC, "127.0.0.1:8000",
                      "127.0.0.2,127.0.0.3", "127.0.0.1", *extra])
    out = json.loads(proc.stdout)
    # 127.0.0.2 & 1 == 0 -> slot 0; 127.0.0.3 -> slot 1.
    assert out["first"] == [9000, 9001]
    assert out["swapped"] == [9001, 9000]
    assert out["removed"] == ["ConnectionRefusedError"] * 2
    if with_nft_nat:
        assert out["nft"] == 9000


def test_ipv6_chain_jumps_and_connections(ns):
    for addr in ("fd00::2", "fd00::3"):
        in_ns(ns, [IP, "-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad"])
    ok(run_ops(ns, ("web", ["[::]:8000", "[::1]:8000"], "check", None),
               ("web", ["[::]:8000", "[::1]:8000"], "apply", T1),
               ("web", ["[::]:8000", "[::1]:8000"], "apply", T1)))
    assert listing(ns, six=True) == POLICIES + ["-N IPS-web"] + jumps("IPS-web") + [
        "-A IPS-web -s ::/::1 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9000",
        "-A IPS-web -s ::1/::1 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9001",
        "-A IPS-web -s ::/::1 -d ::1/128 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9000",
        "-A IPS-web -s ::1/::1 -d ::1/128 -p tcp -m tcp --dport 8000 -j REDIRECT --to-ports 9001",
    ]
    assert "nat" not in in_ns(ns, ["cat", "/proc/net/ip_tables_names"]).stdout.split()
    ok(run_ops(ns, ("web", ["[::]:8000", "[::1]:8000"], "remove", None)))
    assert listing(ns, six=True) == POLICIES

    proc = in_ns(ns, [sys.executable, "-c", TRAFFIC, "[::1]:8000", "fd00::2,fd00::3", "::1"])
    out = json.loads(proc.stdout)
    assert out["first"] == [9000, 9001]          # fd00::2 -> slot 0, fd00::3 -> slot 1
    assert out["swapped"] == [9001, 9000]
    assert out["removed"] == ["ConnectionRefusedError"] * 2


def test_both_families_in_one_process_are_refused_not_fatal(ns):
    """libxtables registers REDIRECT for the first family that loads it; the
    other family must get a clear RouterUnavailable, and the process lives on."""
    results = run_ops(ns, ("four", ["0.0.0.0:8000"], "check", None),
                      ("four", ["0.0.0.0:8000"], "apply", T1),
                      ("six", ["[::]:8000"], "check", None),
                      ("six", ["[::]:8000"], "apply", T1),
                      ("both", ["0.0.0.0:8000", "[::]:8000"], "check", None),
                      ("four", ["0.0.0.0:8000"], "remove", None))
    assert [r["ok"] for r in results] == [True, True, False, False, False, True], results
    assert "other address family" in results[2]["message"]
    assert "REDIRECT" in results[3]["message"] and "previous rules kept" in results[3]["message"]
    assert "use router nft or iptables" in results[4]["message"]
    assert listing(ns, six=True) == POLICIES          # the IPv6 batch never reached the table


def test_check_without_net_admin(ns):
    if shutil.which("setpriv", path=SBIN) is None:
        pytest.skip("setpriv (util-linux) is not installed")
    results = run_ops(ns, ("web", V4, "check", None),
                      prefix=["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"])
    assert results[0]["error"] == "RouterUnavailable"
    assert "CAP_NET_ADMIN" in results[0]["message"]
    assert legacy_tables_in(ns).split() == []


def test_check_when_the_iptables_libraries_cannot_load(ns):
    if shutil.which("unshare", path=SBIN) is None:
        pytest.skip("unshare (util-linux) is not installed")
    import ctypes.util
    name = ctypes.util.find_library("ip4tc")
    if name is None:
        pytest.skip("libip4tc is not installed at all")
    real = subprocess.run(["sh", "-c", f"ldconfig -p | awk '$1 == \"{name}\" {{print $NF; exit}}'"],
                          capture_output=True, text=True).stdout.strip()
    real = os.path.realpath(real or f"/usr/lib/x86_64-linux-gnu/{name}")
    # A private mount namespace (inside `ip netns exec`'s own) where the
    # library is an empty file: dlopen fails as it would with a broken install.
    script = (f"mount --bind /dev/null {shlex.quote(real)} && exec "
              + shlex.join([sys.executable, "-c", DRIVER, json.dumps([["web", V4, "check", None]])]))
    proc = in_ns(ns, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[0]["error"] == "RouterUnavailable"
    assert "cannot load the iptables libraries" in results[0]["message"]
    assert "libip4tc2" in results[0]["message"]
    assert os.path.getsize(real) > 0, "the bind mount leaked out of its namespace"
