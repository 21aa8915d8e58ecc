"""End-to-end tests of scaling out past one host (issue 11).

Two host namespaces each run the real `ipserve` command (`-w 4`, nft router)
behind a balancer namespace that spreads clients with nftables
(`dnat to jhash ip saddr mod 2 seed S map { 0 : A, 1 : B }`), forwarding,
no SNAT; 64 client addresses (198.18.0.64-127) in one client namespace
connect to the virtual address 198.19.0.80:8000, each socket bound to its
source address (harness: multihost.py). What is asserted:

* every client address reaches the same host and the same worker (the active
  worker of slot `address & 3` on that host) on every new connection;
* a HUP on host A drops nothing: WebSockets, keep-alive connections and held
  requests from all 64 addresses, and new connections made throughout, all
  succeed; host B's workers are the same processes before and after;
* host A leaves the balancer by mapping its bucket to B (mod 2 kept): only A's
  clients move (to the worker of their slot on B), B's clients keep their
  worker, and connections A held keep working (conntrack keeps their DNAT);
  A's bucket mapped back returns every client to its first host;
* the jhash caveat, measured against the kernel: nft scales the hash into
  [0, N) (bucket = hash * N >> 32), so changing N moves clients between hosts
  that did not change, while refining the buckets (N -> k*N, same hosts)
  moves nobody and reassigning buckets moves only their clients.

No durations are compared: waits are bounded polls; what is asserted is who
answered (host, slot, pid, generation), status codes and echoes.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import multihost
import netns
import pytest
from conftest import NEEDS_ROOT
from backends import backend_unavailable, routed_workers, slot_of
from multihost import PORT, VIP, jhash_bucket
from netns import Bg, HttpClient, ws_connect

WORKERS = 4
HOST_ARGS = ["-w", str(WORKERS), "--router", "nft", "-b", f"0.0.0.0:{PORT}",
             # Keep-alive connections are held idle across the HUP and the
             # balancer change: longer than the test, never the server's cut.
             "--keepalive", "120", "--graceful-timeout", "5"]

pytestmark = pytest.mark.skipif(bool(backend_unavailable("nft")),
                                reason=backend_unavailable("nft") or "")


# --------------------------------------------------------------------------- #
# The cluster
# --------------------------------------------------------------------------- #

class Cluster:
    """A ScaleOutBed whose hosts A and B serve (extra hosts serve nothing)."""

    def __init__(self, bed: multihost.ScaleOutBed):
        self.bed = bed
        self.servers = {h.label: bed.start_ipserve(h, [bed.app, *HOST_ARGS])
                        for h in bed.hosts[:2]}
        self.label_of = {srv.name: label for label, srv in self.servers.items()}
        self.tables = {label: wait_routed(srv) for label, srv in self.servers.items()}

    @property
    def sources(self) -> list[str]:
        return self.bed.client_ips

    def whoami(self, src: str, path: str = "/") -> dict:
        """One request on a fresh connection from `src` to the VIP: who answered."""
        data = netns.http_json(self.bed.client_ns, src, VIP, PORT, path, timeout=10)
        return self.describe(src, data)

    def describe(self, src: str, data: dict) -> dict:
        w = data["worker"]
        assert data["remote_addr"] == src, f"{src} seen as {data['remote_addr']}: SNAT?"
        assert data["pid"] == w["pid"], data
        return {"host": self.label_of[w["name"]], "slot": w["slot"], "pid": w["pid"],
                "generation": w["generation"]}

    def expect_worker(self, src: str, host: str, answer: dict, table=None) -> None:
        """`answer` came from the active worker of src's slot on `host`."""
        table = table or self.tables[host]
        slot = slot_of(src, WORKERS)
        where = f"{src} (slot {slot}): {answer}"
        assert answer["host"] == host, where
        assert answer["slot"] == slot, where
        assert answer["pid"] == table[slot]["pid"], where

    def assignment(self) -> dict[str, dict]:
        return {src: self.whoami(src) for src in self.sources}


def wait_routed(srv, generation: int | None = None) -> dict[int, dict]:
    gen = "" if generation is None else f" of generation {generation}"
    st = srv.wait_for(lambda st: routed_workers(st, WORKERS, generation) is not None,
                      timeout=30, what=f"{WORKERS} slots routed to active workers{gen}")
    return routed_workers(st, WORKERS, generation)


def make_cluster(n_hosts: int = 2) -> Cluster:
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    bed = multihost.ScaleOutBed(n_hosts=n_hosts)
    try:
        bed.wait_paths()
        return Cluster(bed)
    except BaseException:
        bed.close()
        raise


@pytest.fixture
def cluster(request):
    c = make_cluster(getattr(request, "param", 2))
    try:
        yield c
    finally:
        # Captured output: pytest shows it only when the test failed.
        for label, srv in c.servers.items():
            state = "running" if srv.running() else f"exit code {srv.returncode}"
            print(f"--- host {label}: ipserve {srv.name} ({state}), last lines:\n"
                  f"{srv.log_tail(40)}")
        c.bed.close()


def report(what: str, **figures) -> None:
    """The figures docs/scale-out.md quotes (visible with pytest -s)."""
    print(f"\n[scale-out] {what}: {json.dumps(figures, sort_keys=True)}")


def split_by_host(assignment: dict[str, dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for src, a in assignment.items():
        out.setdefault(a["host"], []).append(src)
    return out


# --------------------------------------------------------------------------- #
# 1. Every client address: always the same host, the same worker
# --------------------------------------------------------------------------- #

def test_each_address_keeps_its_host_and_worker(cluster):
    rounds = 4
    seen: dict[str, set[tuple[str, int]]] = {}
    for _ in range(rounds):
        for src in cluster.sources:
            a = cluster.whoami(src)
            seen.setdefault(src, set()).add((a["host"], a["pid"]))
            cluster.expect_worker(src, a["host"], a)
    assert all(len(v) == 1 for v in seen.values()), {s: v for s, v in seen.items() if len(v) > 1}
    by_host = split_by_host({s: {"host": next(iter(v))[0]} for s, v in seen.items()})
    # Both hosts serve, and on each every slot has clients: 8 workers in all.
    assert sorted(by_host) == ["A", "B"], by_host
    for host, srcs in by_host.items():
        assert {slot_of(s, WORKERS) for s in srcs} == set(range(WORKERS)), (host, srcs)
    assert len({pid for v in seen.values() for _, pid in v}) == 2 * WORKERS
    # Keep-alive: many requests on one connection stay with that worker too.
    for src in (cluster.sources[0], cluster.sources[-1]):
        with HttpClient(cluster.bed.client_ns, src, VIP, PORT) as c:
            pids = {cluster.describe(src, c.json("/"))["pid"] for _ in range(5)}
            assert pids == {next(iter(seen[src]))[1]} and c.connects == 1
    report("stickiness", addresses=len(seen), connections=rounds * len(seen),
           per_host={h: len(s) for h, s in by_host.items()}, distinct_workers=2 * WORKERS,
           moved=0)


# --------------------------------------------------------------------------- #
# 2. A HUP on one host drops nothing; the other host is untouched
# --------------------------------------------------------------------------- #

class FreshConnections(threading.Thread):
    """Rounds of one new connection from every source (Connection: close)
    until stopped (bounded by `limit` seconds); every failure is recorded."""

    def __init__(self, cluster: Cluster, limit: float = 60.0):
        super().__init__(daemon=True)
        self.cluster, self.limit = cluster, limit
        self.halt = threading.Event()
        self.rounds = 0
        self.answers: list[tuple[str, dict]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.halt.is_set() and time.monotonic() < deadline:
            for src in self.cluster.sources:
                try:
                    self.answers.append((src, self.cluster.whoami(src)))
                except Exception as exc:        # noqa: BLE001 - counted, asserted empty
                    self.failures.append(f"{src}: {exc!r}")
            self.rounds += 1

    def wait_rounds(self, n: int, timeout: float = 30) -> None:
        target = self.rounds + n
        deadline = time.monotonic() + timeout
        while self.rounds < target and self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.rounds >= target, f"fresh connections made {self.rounds} rounds, not {target}"

    def finish(self) -> None:
        self.halt.set()
        self.join(30)
        assert not self.is_alive(), "the fresh-connection thread did not stop"


def wait_files(paths, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        assert time.monotonic() < deadline, f"{len(missing)} held requests never started"
        time.sleep(0.05)


def test_hup_on_one_host_drops_nothing(cluster):
    bed, srv_a, srv_b = cluster.bed, cluster.servers["A"], cluster.servers["B"]
    before = cluster.assignment()
    b_before = srv_b.status()
    b_pids = sorted(w["pid"] for w in b_before["workers"])
    errors: list[str] = []
    sockets, keepalive, holds = {}, {}, {}
    flags = {src: os.path.join(bed.workdir, f"hold-{src}") for src in cluster.sources}
    fresh = FreshConnections(cluster)
    try:
        # From every address: a WebSocket, a keep-alive connection, a held request.
        for src in cluster.sources:
            sockets[src] = ws_connect(bed.client_ns, src, VIP, PORT, "/ws", timeout=10)
            sockets[src].send(f"before {src}")
            assert sockets[src].recv() == f"before {src}"
            keepalive[src] = HttpClient(bed.client_ns, src, VIP, PORT, timeout=10)
            assert cluster.describe(src, keepalive[src].json("/"))["pid"] == before[src]["pid"]
            holds[src] = Bg(lambda src=src: netns.http_get(
                bed.client_ns, src, VIP, PORT, f"/hold?f={flags[src]}", timeout=60))
        wait_files([f + ".started" for f in flags.values()])
        fresh.start()
        fresh.wait_rounds(1)
        srv_a.send_signal(signal.SIGHUP)
        new_a = wait_routed(srv_a, generation=2)
        fresh.wait_rounds(2)                          # new connections after the switch too
        fresh.finish()
        # Everything held across the HUP still works, served by the worker it had.
        for src in cluster.sources:
            try:
                sockets[src].send(f"after {src}")
                if sockets[src].recv() != f"after {src}":
                    errors.append(f"{src}: WebSocket echo wrong")
                a = cluster.describe(src, keepalive[src].json("/"))
                if a["pid"] != before[src]["pid"] or keepalive[src].connects != 1:
                    errors.append(f"{src}: keep-alive answered by {a}, "
                                  f"{keepalive[src].connects} connections")
            except Exception as exc:            # noqa: BLE001 - counted, asserted empty
                errors.append(f"{src}: held connection: {exc!r}")
        for flag in flags.values():
            open(flag, "w").close()
        for src, bg in holds.items():
            try:
                status, _, body = bg.value(timeout=30)
                data = json.loads(body)
                if status != 200 or not data["released"] or data["pid"] != before[src]["pid"]:
                    errors.append(f"{src}: held request: {status} {data}")
            except Exception as exc:            # noqa: BLE001 - counted, asserted empty
                errors.append(f"{src}: held request: {exc!r}")
    finally:
        fresh.halt.set()
        for ws in sockets.values():
            ws.close()
        for c in keepalive.values():
            c.close()
        for flag in flags.values():
            with open(flag, "w"):
                pass
    assert fresh.failures == [], f"{len(fresh.failures)} new connections failed: {fresh.failures[:5]}"
    assert errors == [], f"{len(errors)} held connections failed: {errors[:5]}"
    # After the switch: A's clients reach the new generation's worker of their
    # slot on A; B's clients the very processes they had.
    after = cluster.assignment()
    for src in cluster.sources:
        host = before[src]["host"]
        cluster.expect_worker(src, host, after[src], table=new_a if host == "A" else None)
        assert after[src]["generation"] == (2 if host == "A" else 1), after[src]
    # What the fresh-connection rounds saw during the reload: only the host
    # each address always had, and on it a worker of its own slot.
    for src, a in fresh.answers:
        assert a["host"] == before[src]["host"] and a["slot"] == slot_of(src, WORKERS), (src, a)
        if a["host"] == "B":
            assert a["pid"] == before[src]["pid"], (src, a)
    # Host B: untouched (same workers, same generation, no reload).
    b_after = srv_b.status()
    assert sorted(w["pid"] for w in b_after["workers"]) == b_pids
    assert b_after["master"]["generation"] == b_before["master"]["generation"] == 1
    by_host = split_by_host(before)
    report("hup", addresses=len(cluster.sources), websockets=len(sockets),
           keepalive=len(keepalive), held_requests=len(holds),
           new_connections=len(fresh.answers) + len(fresh.failures),
           errors=len(errors) + len(fresh.failures),
           hup_host_clients=len(by_host["A"]), other_host_clients=len(by_host["B"]))


# --------------------------------------------------------------------------- #
# 3. A host leaves the balancer: only its clients move
# --------------------------------------------------------------------------- #

def test_removing_a_host_moves_only_its_clients(cluster):
    bed = cluster.bed
    A, B = bed.host("A"), bed.host("B")
    before = cluster.assignment()
    by_host = split_by_host(before)
    held_ka, held_ws = {}, {}
    try:
        for src in by_host["A"]:        # connections A holds while it leaves
            held_ka[src] = HttpClient(bed.client_ns, src, VIP, PORT, timeout=10)
            assert cluster.describe(src, held_ka[src].json("/"))["pid"] == before[src]["pid"]
            held_ws[src] = ws_connect(bed.client_ns, src, VIP, PORT, "/ws", timeout=10)
        # A's bucket now points at B; the modulus (and the seed) stay.
        bed.set_backends([B.ip, B.ip])
        during = cluster.assignment()
        for src in cluster.sources:
            cluster.expect_worker(src, "B", during[src])
            if before[src]["host"] == "B":
                assert during[src]["pid"] == before[src]["pid"], (src, during[src])
        moved = [s for s in cluster.sources if during[s]["host"] != before[s]["host"]]
        assert sorted(moved) == sorted(by_host["A"])
        # Established connections keep their DNAT (conntrack) and their worker on A.
        for src in by_host["A"]:
            a = cluster.describe(src, held_ka[src].json("/"))
            assert a["host"] == "A" and a["pid"] == before[src]["pid"], (src, a)
            assert held_ka[src].connects == 1
            held_ws[src].send(src)
            assert held_ws[src].recv() == src
        # With two hosts, `mod 1 map { 0 : B }` is the same: everyone on B.
        bed.set_backends([B.ip])
        assert cluster.assignment() == during
    finally:
        for c in held_ka.values():
            c.close()
        for ws in held_ws.values():
            ws.close()
    # A back in its bucket: every address is where it was at first.
    bed.set_backends([A.ip, B.ip])
    back = cluster.assignment()
    assert back == before
    report("remove-host", addresses=len(cluster.sources), moved=len(moved),
           removed_host_clients=len(by_host["A"]), kept=len(by_host["B"]),
           held_on_removed_host={"keepalive": len(held_ka), "websockets": len(held_ws)},
           returned_after_readd=sum(back[s] == before[s] for s in cluster.sources))


# --------------------------------------------------------------------------- #
# 4. The jhash caveat, measured: changing N versus reassigning buckets
# --------------------------------------------------------------------------- #

def hosts_seen(cluster: Cluster) -> dict[str, str]:
    """Which host each address reaches: A or B by who answers; C (serving
    nothing) by the refusal its RST brings."""
    out = {}
    for src in cluster.sources:
        try:
            out[src] = cluster.whoami(src)["host"]
        except ConnectionRefusedError:
            out[src] = "C"
    return out


@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_jhash_modulus_change_moves_clients_of_unchanged_hosts(cluster):
    bed = cluster.bed
    ips = {h.label: h.ip for h in bed.hosts}

    def apply(labels: str) -> dict[str, str]:
        bed.set_backends([ips[x] for x in labels])
        seen = hosts_seen(cluster)
        # The kernel's choice is nftables' jhash, scaled: bucket = hash * N >> 32.
        model = {s: labels[jhash_bucket(s, len(labels))] for s in cluster.sources}
        assert seen == model
        return seen

    def moves(a: dict[str, str], b: dict[str, str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in cluster.sources:
            if a[s] != b[s]:
                out[f"{a[s]}->{b[s]}"] = out.get(f"{a[s]}->{b[s]}", 0) + 1
        return out

    two = apply("AB")
    # Adding C by growing the modulus: clients move between A and B as well.
    naive = apply("ABC")
    naive_moves = moves(two, naive)
    assert set(naive_moves) - {"A->C", "B->C"}, naive_moves
    # Refining the buckets first (mod 2 -> mod 6, same hosts) moves nobody...
    refined = apply("AAABBB")
    assert refined == two
    # ...then giving C one bucket of each host moves only clients to C.
    planned = apply("AACBBC")
    planned_moves = moves(two, planned)
    assert set(planned_moves) <= {"A->C", "B->C"}, planned_moves
    report("jhash", addresses=len(cluster.sources), model_matches_kernel=True,
           mod2_to_mod3_moves=naive_moves, mod2_to_mod6_moves=planned_moves)
