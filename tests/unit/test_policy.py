from dataclasses import dataclass

from ipserve.master import policy


@dataclass
class W:
    slot: int
    generation: int
    state: str = "active"
    port: int | None = None


def test_routes_prefer_newest_active_generation():
    workers = [W(0, 1, port=100), W(0, 2, port=200), W(1, 1, port=101), W(1, 2, "booting", None)]
    assert policy.routable_ports(workers, 2) == {0: 200, 1: 101}


def test_retiring_and_booting_workers_get_no_new_connections():
    workers = [W(0, 1, "retiring", 100), W(1, 1, port=101)]
    assert policy.desired_routes(workers, 2) == {0: 101, 1: 101}


def test_slots_to_spawn():
    workers = [W(0, 1), W(1, 1, "booting"), W(2, 0), W(3, 1, "retiring")]
    assert policy.slots_to_spawn(workers, 4) == [3]


def test_respawn_backoff():
    assert [policy.respawn_delay(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 30, 30]


@dataclass
class R:
    slot: int
    generation: int
    state: str = "active"
    retired_at: float | None = None


def test_superseded_by_newer_active_worker_only():
    old, new_booting = R(0, 1), R(0, 2, "booting")
    assert policy.superseded([old, new_booting], 2) == []
    new_active = R(0, 2)
    assert policy.superseded([old, new_active, R(1, 1)], 2) == [old]


def test_superseded_when_slot_count_shrinks():
    workers = [R(0, 1), R(1, 1), R(2, 1), R(3, 1)]
    assert policy.superseded(workers, 2) == workers[2:]


def test_adopted_generations_raise_the_next_number():
    assert policy.next_generation(1, [R(0, 7), R(1, 3)]) == 8
    assert policy.next_generation(4, []) == 5


def test_overdue_retirees():
    workers = [R(0, 1, "retiring", 10.0), R(1, 1, "retiring", 95.0), R(2, 2)]
    assert policy.overdue_retirees(workers, 100.0, None) == []
    assert policy.overdue_retirees(workers, 100.0, 60.0) == [workers[0]]


@dataclass
class H:
    slot: int = 0
    generation: int = 1
    state: str = "active"
    rss: int = 0
    connections: int = 0
    spawned_at: float = 0.0
    requests: int = 0
    max_requests: int = 0
    busy_since: float | None = None
    replacing: str | None = None
    serial: int = 0
    last_seen: float = 0.0


MiB = 1 << 20


def test_replacement_outranks_predecessor_within_a_generation():
    old, new = H(serial=1), H(serial=2)
    assert policy.superseded([old, new], 1) == [old]
    old.port, new.port = 100, 200
    assert policy.routable_ports([old, new], 1) == {0: 200}


def test_health_replacements():
    fat = H(rss=300 * MiB)
    worn = H(slot=1, requests=50, max_requests=50)
    busy = H(slot=2, busy_since=10.0)
    calm = H(slot=3, rss=10 * MiB, requests=3, max_requests=50)
    already = H(slot=4, rss=300 * MiB, replacing="memory")
    out = policy.health_replacements([fat, worn, busy, calm, already], now=60.0,
                                     worker_memory=200 * MiB, max_requests=True, busy_retire_after=45.0)
    assert [(w, limited) for w, _, limited in out] == [(fat, True), (worn, False), (busy, True)]
    assert "worker_memory" in out[0][1] and "max_requests" in out[1][1] and "busy" in out[2][1]


def test_busy_not_long_enough_is_kept():
    assert policy.health_replacements([H(busy_since=30.0)], now=60.0, worker_memory=None,
                                      max_requests=False, busy_retire_after=45.0) == []


def test_cluster_memory_under_80_percent_does_nothing():
    assert policy.cluster_memory_actions([H(rss=70 * MiB)], 100 * MiB) == []
    assert policy.cluster_memory_actions([H(rss=700 * MiB)], None) == []


def test_cluster_memory_asks_retiring_in_order():
    a = H(state="retiring", rss=20 * MiB, connections=5, spawned_at=1)
    b = H(state="retiring", rss=10 * MiB, connections=0, spawned_at=2)   # fewest connections
    c = H(state="retiring", rss=30 * MiB, connections=0, spawned_at=3)   # same, larger: first
    active = H(rss=30 * MiB)
    actions = policy.cluster_memory_actions([a, b, c, active], 100 * MiB)   # 90% of the limit
    assert actions == [("close", c)]   # 90 - 30 = 60 MiB, under 80%: stop there


def test_cluster_memory_above_95_percent_kills():
    a = H(state="retiring", rss=40 * MiB, connections=1)
    b = H(state="retiring", rss=40 * MiB, connections=2)
    actions = policy.cluster_memory_actions([a, b, H(rss=20 * MiB)], 100 * MiB)
    assert actions == [("kill", a)]   # 100 - 40 = 60 MiB fits under 80%


def test_cluster_memory_exceeded_without_retiring_replaces_largest_active():
    small, large = H(rss=40 * MiB), H(slot=1, rss=70 * MiB)
    assert policy.cluster_memory_actions([small, large], 100 * MiB) == [("replace", large)]


def test_hung_workers():
    fresh, silent, booting = H(last_seen=95.0), H(last_seen=50.0), H(state="booting", last_seen=0.0)
    assert policy.hung([fresh, silent, booting], now=100.0, timeout=30.0) == [silent]
